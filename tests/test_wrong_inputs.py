"""Every command, given the usual mistakes: one line on stderr, a non-zero exit, no traceback.

The commands run in-process through :func:`pfcollector.cli.run`, the console script's own
entry point (what a user's shell reaches), with stdout and stderr captured. ``{file}`` in a
case is a regular file, ``{missing}`` a path that does not exist, ``{nosock}`` a socket path
with no daemon behind it, ``{dir}`` an empty directory. Logging set up by a command (serve,
watch) is restored after each case.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pfcollector.cli import run

pytestmark = pytest.mark.usefixtures("restore_logging")

# (argv, what the one line must contain)
CASES: list[tuple[list[str], str]] = [
    # the command line itself
    (["nosuch"], "No such command 'nosuch'"),
    (["--bogus"], "No such option: --bogus"),
    (["version", "extra"], "unexpected extra argument"),
    (["status", "--bogus"], "No such option: --bogus"),
    (["status", "--interval", "soon"], "'--interval'"),
    # a daemon that is not there
    (["status", "--socket", "{nosock}"], "no pfcollector daemon at"),
    (["status", "--json", "--socket", "{nosock}"], "no pfcollector daemon at"),
    (["tune", "--batch-size", "5", "--socket", "{nosock}"], "no pfcollector daemon at"),
    (["tune", "--batch-size", "many"], "'--batch-size'"),
    (["flush", "--socket", "{nosock}"], "no pfcollector daemon at"),
    (["dead-letters", "list", "--socket", "{nosock}"], "no pfcollector daemon at"),
    (["dead-letters", "list", "--limit", "0"], "'--limit'"),
    (["dead-letters", "retry", "--id", "x", "--socket", "{nosock}"], "no pfcollector daemon"),
    # settings
    (["config", "check", "{missing}"], "No such file or directory"),
    (["config", "check", "{file}"], "not valid TOML"),
    (["config", "check"], "Missing argument 'file'"),
    (["config", "show", "--batch-size", "0"], "batch_size: must be between 1 and 10000"),
    (["config", "show", "--config", "{missing}"], "no such file"),
    (["config", "show", "--log-level", "loud"], "log_level"),
    (["serve", "--batch-size", "0", "--socket", "{nosock}"], "batch_size"),
    (["serve", "--config", "{file}", "--socket", "{nosock}"], "not valid TOML"),
    (["serve", "--flush-interval", "often"], "'--flush-interval'"),
    (["serve", "--data-dir", "{file}/data", "--socket", "{nosock}"], "Not a directory"),
    # the spool
    (["spool", "check", "--data-dir", "{missing}"], "no spool file"),
    # send
    (["send", "bogus"], "No such command 'bogus'"),
    (["send", "crash", "--job", "j", "--input", "{file}"], "Missing option '--type'"),
    (["send", "crash", "--job", "j", "--type", "X", "--input", "{missing}"], "cannot read"),
    (["send", "crash", "--job", "j", "--type", "X", "--input", "{dir}"], "Is a directory"),
    (["send", "corpus", "--job", "j", "--file", "{missing}"], "does not exist"),
    (["send", "stats", "--job", "j", "--executions", "lots"], "'--executions'"),
    (["send", "stats", "--job", "j", "--socket", "{nosock}"], "{nosock}"),
    (["send", "started", "--socket", "{nosock}"], "Missing option '--job'"),
    # watch
    (["watch", "afl"], "Missing argument"),
    (["watch", "afl", "{file}", "--job", "j", "--once", "--socket", "{nosock}"], "{file}"),
    (["watch", "libfuzzer", "{file}", "--job", "j", "--once", "--socket", "{nosock}"], "{file}"),
    (["watch", "afl", "{dir}", "--job", "j", "--interval", "-1"], "'--interval'"),
    (["watch", "afl", "{dir}", "--job", "j", "--reproduce-timeout", "0"], "--reproduce-timeout"),
    # bugs
    (["bugs", "--data-dir", "{missing}"], "no spool at"),
    (["bugs", "--limit", "0"], "'--limit'"),
    (["bugs", "--bogus"], "No such option"),
    # the reference master
    (["dev-master", "--port", "99999"], "'--port'"),
    (["dev-master", "--port", "0", "--db", "{file}/m.db"], "--db"),
    (["dev-master", "--host", "192.0.2.1", "--port", "0"], "cannot serve on 192.0.2.1"),
]


@pytest.mark.parametrize(("argv", "expect"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_wrong_input_is_one_line_and_non_zero(
    argv: list[str],
    expect: str,
    tmp_path: Path,
    sock_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PFCOLLECTOR_CONFIG", raising=False)
    monkeypatch.setenv("PFCOLLECTOR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PFCOLLECTOR_SOCKET", str(sock_dir / "none.sock"))
    file = tmp_path / "a-file"
    file.write_text("this is not toml = = \n")
    (tmp_path / "empty").mkdir()
    paths = {
        "{file}": str(file),
        "{missing}": str(tmp_path / "missing"),
        "{nosock}": str(sock_dir / "none.sock"),
        "{dir}": str(tmp_path / "empty"),
    }

    def fill(text: str) -> str:
        for key, value in paths.items():
            text = text.replace(key, value)
        return text

    code = run([fill(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code != 0, f"exit 0 for {argv}: {out!r} {err!r}"
    # log lines (key=value, from serve or watch) may come first; the error is one line
    lines = [line for line in err.splitlines() if not line.startswith("ts=")]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert fill(expect) in lines[0], lines[0]
    assert "╭" not in err and "Usage:" not in err  # no rich box, no usage block


def test_no_arguments_shows_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    code = run([])
    out, err = capsys.readouterr()
    assert code == 2 and "Usage: pfcollector" in out + err and "Traceback" not in out + err


def test_version_flag_and_help_without_type_noise(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.startswith("pfcollector ")
    assert run(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "<bool>" not in out  # a flag takes no value: no type label
    assert "[default:" in out  # brackets in help texts survive rich
    assert run(["tune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Events per batch" in out and "Seconds a batch may wait" in out
