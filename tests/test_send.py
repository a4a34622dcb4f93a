"""``pfcollector send KIND``: an option for every schema field, the event id printed once the
daemon acknowledged, ``--id`` for idempotent retries, and one line plus exit code 1 when the
daemon is absent or refuses. The CLI runs through typer's CliRunner in a worker thread (it
blocks) against a live in-process daemon; one run is a real subprocess for the exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio
from typer.main import get_command
from typer.testing import CliRunner

from pfcollector.cli import app
from pfcollector.daemon import Daemon
from pfcollector.events import SCHEMAS, Kind


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_every_schema_field_has_an_option() -> None:
    group = get_command(app)
    send = group.commands["send"]  # type: ignore[attr-defined]
    for kind, specs in SCHEMAS.items():
        command = send.commands[kind.value]
        options = {opt for p in command.params for opt in p.opts}
        for spec in specs:
            if spec.name == "contents":
                continue  # optional corpus bytes: pfclient.Client.corpus cannot send them yet
            name = "--file" if spec.name == "files" else "--" + spec.name.replace("_", "-")
            assert name in options, f"send {kind.value} has no {name}"
        assert {"--job", "--fuzzer", "--socket", "--id", "--ts"} <= options


async def test_send_each_kind(local_daemon: Daemon, tmp_path: Path) -> None:
    sock = str(local_daemon.config.socket_path)
    crash_input = tmp_path / "crash.bin"
    crash_input.write_bytes(b"\x00crash\xff")
    common = ["--job", "job-send", "--socket", sock]

    async def run(*args: str) -> tuple[int, str, str]:
        return await trio.to_thread.run_sync(lambda: invoke(*args))

    with trio.fail_after(20):
        code, out, err = await run(
            "send",
            "crash",
            "--type",
            "SIGSEGV",
            "--signal",
            "11",
            "--input",
            str(crash_input),
            "--stack-trace",
            "#0 main",
            "--fuzzer",
            "sh",
            *common,
        )
        assert code == 0, err
        crash_id = out.strip()
        code, out, _ = await run(
            "send",
            "coverage",
            "--edges",
            "7",
            "--new-edges",
            "2",
            "--id",
            "cov-1",
            "--ts",
            "1700000000.5",
            *common,
        )
        assert (code, out.strip()) == (0, "cov-1")
        (tmp_path / "a").write_bytes(b"a")
        (tmp_path / "b").write_bytes(b"b")
        corpus_files = [str(tmp_path / "a"), str(tmp_path / "b")]
        code, _, err = await run(
            "send", "corpus", "--file", corpus_files[0], "--file", corpus_files[1], *common
        )
        assert code == 0, err
        for kind in ("stats", "started", "stopped", "error", "timeout"):
            code, _, err = await run("send", kind, *common)
            assert code == 0, err
        # a retried script with the same --id: acknowledged again, stored once
        again = ["send", "coverage", "--edges", "7", "--new-edges", "2", "--id", "cov-1"]
        assert (await run(*again, *common))[0] == 0
        # the same --id with other content is another event: refused, one line
        code, _, err = await run("send", "coverage", "--edges", "8", "--id", "cov-1", *common)
        assert code == 1 and err.startswith("error: id_conflict:") and err.count("\n") == 1
    events = {r.event.id: r.event for r in local_daemon.spool.read_after(0, 100)}
    crash = events[crash_id]
    assert crash.kind is Kind.CRASH and crash.fuzzer == "sh" and crash.job_id == "job-send"
    assert crash.fields["signal"] == 11 and crash.fields["stack_trace"] == "#0 main"
    assert Path(crash.fields["file_path"]).read_bytes() == b"\x00crash\xff"
    assert events["cov-1"].timestamp_ns == 1_700_000_000_500_000_000
    assert [e.id for e in events.values()].count("cov-1") == 1
    assert next(e for e in events.values() if e.kind is Kind.CORPUS).fields["files"] == corpus_files
    status = await local_daemon.status()
    assert status["events"]["stats"]["accepted"] == 1


async def test_refused_event_is_one_line_and_exit_1(local_daemon: Daemon) -> None:
    sock = str(local_daemon.config.socket_path)
    with trio.fail_after(20):
        code, out, err = await trio.to_thread.run_sync(
            lambda: invoke("send", "started", "--job", "j", "--socket", sock, "--id", "bad id!")
        )
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: bad_id:")


def test_missing_input_and_absent_daemon(tmp_path: Path) -> None:
    code, _, err = invoke(
        "send", "crash", "--type", "X", "--job", "j", "--socket", str(tmp_path / "none.sock")
    )
    assert code == 2 and "--input" in err
    code, _, err = invoke(
        "send",
        "crash",
        "--type",
        "X",
        "--job",
        "j",
        "--input",
        str(tmp_path / "missing"),
        "--socket",
        str(tmp_path / "s"),
    )
    assert code == 2 and err.startswith("error: cannot read --input")
    code, out, err = invoke(
        "send", "corpus", "--file", "/nonexistent", "--job", "j", "--socket", str(tmp_path / "s")
    )
    assert (code, out, err) == (2, "", "error: --file /nonexistent does not exist\n")


@pytest.mark.slow
def test_absent_daemon_subprocess(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pfcollector",
            "send",
            "stats",
            "--job",
            "j",
            "--socket",
            str(tmp_path / "none.sock"),
            "--executions",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "cannot reach the pfcollector daemon" in proc.stderr
