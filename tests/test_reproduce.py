"""``watch afl --reproduce`` (``pfcollector.watch._reproduce``).

Rules: the target is AFL++'s own command line (after ``--``, or after afl-fuzz's options),
relative paths from where afl-fuzz ran, ``@@`` replaced by the crash file, else the input on
stdin; the run is bounded (timeout with the whole process group killed, CPU, output size,
address space for targets without a sanitizer); never as root; a crash that does not reproduce
is still sent, and says so. Targets are the real C targets of tests/targets (clang needed:
skipped with the reason otherwise) and small system programs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from pfcollector import bugs
from pfcollector.config import Config
from pfcollector.daemon import Daemon
from pfcollector.devmaster import DevMaster
from pfcollector.report import parse
from pfcollector.watch import AflWatcher, Sink, StateFile
from pfcollector.watch._reproduce import (
    Limits,
    Reproducer,
    ReproduceRefused,
    run_as,
    target_argv,
)
from tests import sanitizer_targets as targets
from tests.conftest import start_daemon

EXPECTED = json.loads(targets.EXPECTED.read_text())
NOBODY = 65534
#: A Python others may run (the venv's may live under a private home).
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/usr/local/bin")
needs_clang = pytest.mark.usefixtures("clang")  # conftest: skipped, or failed in CI, without


def test_target_argv_from_afl_command_lines() -> None:
    assert target_argv("afl-fuzz -i in -o out -V 4 -- ./t @@") == (["./t", "@@"], "out", None)
    assert target_argv("afl-fuzz -i in -oout -m none ./t -x @@") == (["./t", "-x", "@@"], "out",
                                                                     None)  # fmt: skip
    assert target_argv("afl-fuzz -i in -o o -f cur.input -d -- ./t cur.input") == (
        ["./t", "cur.input"], "o", "cur.input"
    )  # fmt: skip
    assert target_argv("afl-fuzz -i in -o out") == ([], "out", None)
    assert target_argv("afl-fuzz -i 'in -o out -- ./t") == (["./t"], "out", None)
    assert target_argv("") == ([], None, None)


def test_a_root_owned_output_directory_is_refused_by_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can be refused")
    afl_dir(tmp_path, "afl-fuzz -o out -- /bin/true", b"x")
    with pytest.raises(ReproduceRefused):
        Reproducer(tmp_path / "out")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root changes user")
def test_root_runs_the_target_as_the_fuzzers_user(tmp_path: Path) -> None:
    crash = afl_dir(tmp_path, "afl-fuzz -o out -- /bin/sh -c 'id -u; exit 3'", b"x")
    hand_over(tmp_path)
    fields = Reproducer(tmp_path / "out").run(crash.parent.parent, crash, b"x")
    assert fields["output"].splitlines()[1] == str(NOBODY)  # what `id -u` printed
    assert fields["output"].startswith("reproduced: exited with 3")


@settings(deadline=None)
@given(st.text(max_size=200))
def test_target_argv_never_raises(command_line: str) -> None:
    argv, out_dir, input_file = target_argv(command_line)
    assert isinstance(argv, list)
    assert out_dir is None or isinstance(out_dir, str)
    assert input_file is None or isinstance(input_file, str)


def test_never_as_root() -> None:
    assert run_as(owner_uid=1000, euid=1000) is None  # not root: stay who we are
    assert run_as(owner_uid=1000, euid=0) == 1000  # root: become the fuzzer's owner
    with pytest.raises(ReproduceRefused, match="owned by root"):
        run_as(owner_uid=0, euid=0)


def afl_dir(root: Path, command_line: str, crash: bytes, name: str = "default") -> Path:
    """A minimal AFL++ output directory (``root/out``) with one crash file."""
    inst = root / "out" / name
    (inst / "crashes").mkdir(parents=True, exist_ok=True)
    (inst / "queue").mkdir(exist_ok=True)
    (inst / "fuzzer_stats").write_text(f"afl_version : ++4.04c\ncommand_line : {command_line}\n")
    number = len(list((inst / "crashes").glob("id:*")))
    path = inst / "crashes" / f"id:{number:06d},sig:06,src:000000,time:1,execs:1,op:havoc,rep:1"
    path.write_bytes(crash)
    return path


def hand_over(root: Path) -> None:
    """Give the tree to an unprivileged user when the tests run as root, as a fuzzer's would
    be: the reproducer refuses to run a target as root."""
    if os.geteuid() != 0:
        return
    for path in [root, *root.rglob("*")]:
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)


@pytest.fixture
def tmp_path(tmp_path: Path) -> Iterator[Path]:
    """A directory others can enter (pytest's own are 0700 under root's base directory)."""
    path = Path(tempfile.mkdtemp(prefix="pf-repro-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def built(clang: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return targets.build(tmp_path_factory.mktemp("build"), ("asan",))["asan"]


@pytest.fixture
def asan_target(built: Path, tmp_path: Path) -> Path:
    """The target, where the fuzzer's user can run it."""
    target = tmp_path / "asan"
    shutil.copy(built, target)
    target.chmod(0o755)
    return target


@needs_clang
@pytest.mark.parametrize("stdin", [False, True])
def test_a_crash_reproduces_with_its_sanitizer_report(
    tmp_path: Path, asan_target: Path, stdin: bool
) -> None:
    # ./asan: relative to where afl-fuzz ran (the parent of -o out)
    crash = afl_dir(tmp_path, f"afl-fuzz -i in -o out -- ./asan{'' if stdin else ' @@'}", b"hx")
    hand_over(tmp_path)
    fields = Reproducer(tmp_path / "out").run(crash.parent.parent, crash, b"hx")
    assert fields["output"].startswith("reproduced: exited with 1 in ")
    assert "heap-buffer-overflow READ 4" in fields["output"].splitlines()[0]
    assert fields["stack_trace"].startswith("=====")
    assert (
        parse(fields["output"], fields["stack_trace"]).signature
        == (EXPECTED["asan-heap-buffer-overflow"])
    )


@needs_clang
def test_an_input_that_no_longer_crashes_is_marked(tmp_path: Path, asan_target: Path) -> None:
    crash = afl_dir(tmp_path, f"afl-fuzz -i in -o out -- {asan_target} @@", b"zz")
    hand_over(tmp_path)
    fields = Reproducer(tmp_path / "out").run(crash.parent.parent, crash, b"zz")
    assert fields["output"].startswith("not reproduced: exited with 0 in ")
    assert fields["stack_trace"] == ""


def test_a_hanging_target_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    crash = afl_dir(tmp_path, f"afl-fuzz -i in -o out -- /bin/sh -c '{script}'", b"x")
    hand_over(tmp_path)
    fields = Reproducer(tmp_path / "out", Limits(timeout=0.5)).run(crash.parent.parent, crash,
                                                                     b"x")  # fmt: skip
    assert fields["output"].startswith("not reproduced: timed out after 0.5s")
    child = int(pid_file.read_text())
    # SIGKILL to the group is sent; the kernel takes the grandchild down a moment later.
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _gone(child), f"the target's child is still {_state(child)!r}"  # killed with the group


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or _state(pid) == "Z"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]
    except OSError:
        return "Z"


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no python3 in /usr/bin or /usr/local/bin")
def test_memory_is_limited_for_a_target_without_sanitizer(tmp_path: Path) -> None:
    grab = "x = bytearray(512 * 1024 * 1024)"
    crash = afl_dir(tmp_path, f'afl-fuzz -o out -- {SYSTEM_PYTHON} -c "{grab}"', b"x")
    hand_over(tmp_path)
    fields = Reproducer(tmp_path / "out", Limits(memory_mb=128)).run(crash.parent.parent, crash,
                                                                       b"x")  # fmt: skip
    assert fields["output"].startswith("reproduced: exited with 1")
    assert "MemoryError" in fields["output"]


def test_output_is_bounded_and_missing_command_lines_are_said(tmp_path: Path) -> None:
    crash = afl_dir(tmp_path, "afl-fuzz -i in -o out", b"x")
    hand_over(tmp_path)
    fields = Reproducer(tmp_path / "out").run(crash.parent.parent, crash, b"x")
    assert fields == {
        "output": "not reproduced: fuzzer_stats has no command_line with a target",
        "stack_trace": "",
    }
    noisy = afl_dir(tmp_path / "b", "afl-fuzz -o out -- /usr/bin/yes", b"x")
    hand_over(tmp_path)
    fields = Reproducer(tmp_path / "b" / "out", Limits(timeout=1.0)).run(
        noisy.parent.parent, noisy, b"x"
    )
    # yes(1) stops at RLIMIT_FSIZE (SIGXFSZ) or the timeout, whichever comes first.
    assert fields["output"].startswith(("reproduced: killed by signal 25", "not reproduced"))
    assert len(fields["output"]) < 70 * 1024


@needs_clang
async def test_the_watcher_sends_the_report_and_the_daemon_buckets_it(
    local_daemon: Daemon, tmp_path: Path, asan_target: Path
) -> None:
    for data in (b"hx", b"hy", b"ux", b"zz"):
        afl_dir(tmp_path, f"afl-fuzz -i in -o out -- {asan_target} @@", data)
    hand_over(tmp_path)
    sink = Sink(local_daemon.config.socket_path, "job-r")
    state = StateFile(tmp_path / "state.json", tmp_path / "out")
    watcher = AflWatcher(tmp_path / "out", sink, state, settle=0.0,
                         reproducer=Reproducer(tmp_path / "out"))  # fmt: skip
    try:
        assert await trio.to_thread.run_sync(watcher.scan) == 4
    finally:
        sink.close()
    stored = [s.event.fields for s in local_daemon.spool.read_after(0, 100)]
    crashes = [f for f in stored if "type" in f]
    assert sorted(f["type"] for f in crashes) == [
        "SIGABRT",  # "zz" does not crash: sent anyway, marked, bucketed by input
        "heap-buffer-overflow READ 4",
        "heap-use-after-free READ 1",
    ]
    assert all(f["stack_trace"] for f in crashes if f["type"] != "SIGABRT")
    assert any("not reproduced" in f["output"] for f in crashes)
    assert [b["hits"] for b in local_daemon.spool.read(bugs.list_bugs, "job-r")] == [2, 1]


@pytest.mark.slow
async def test_e2e_real_afl_two_bugs_reach_the_master_with_their_reports(
    afl_tools: tuple[str, str],
    make_config: Callable[..., Config],
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """Done-when of issue 16: afl-fuzz on a target with two bugs, ``watch afl --reproduce``,
    the reference master gets both, typed and with stack traces; every other crash is a hit."""
    afl_fuzz, afl_cc = afl_tools
    build = await trio.run_process(
        [afl_cc, "-g", "-O0", "-fno-omit-frame-pointer", "-o", str(tmp_path / "t"),
         str(targets.TARGETS / "two_bugs.c")],
        env={**os.environ, "AFL_USE_ASAN": "1", "AFL_QUIET": "1"},
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr.decode(errors="replace")[-2000:]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "seed").write_bytes(b"xx")
    hand_over(tmp_path)  # afl-fuzz runs as the fuzzer's user, never root
    as_user = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}
    env = {**os.environ, "AFL_NO_UI": "1", "AFL_SKIP_CPUFREQ": "1", "AFL_NO_AFFINITY": "1",
           "AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES": "1"}  # fmt: skip
    crashes = tmp_path / "out" / "default" / "crashes"
    fuzz = await trio.lowlevel.open_process(
        [afl_fuzz, "-i", "in", "-o", "out", "-V", "90", "--", "./t", "@@"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **as_user,
    )  # fmt: skip
    try:
        with trio.fail_after(100):  # until both bugs have crash files, and a repeat
            while True:
                found = (
                    [p.read_bytes()[:1] for p in crashes.glob("id:*")] if crashes.exists() else []
                )
                if {b"H", b"U"} <= set(found) and len(found) >= 3:
                    break
                assert fuzz.poll() is None, "afl-fuzz ended without finding both bugs"
                await trio.sleep(0.5)
    finally:
        fuzz.send_signal(signal.SIGINT)
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await fuzz.wait()
        if fuzz.returncode is None:
            fuzz.kill()
            await fuzz.wait()
    files = sorted(crashes.glob("id:*"))

    with DevMaster() as master:
        config = make_config(master_url=master.url, bot_id="bot-afl", flush_interval=0.2)
        daemon = await start_daemon(nursery, config)
        watch = await trio.run_process(
            [sys.executable, "-m", "pfcollector", "watch", "afl", str(tmp_path / "out"),
             "--job", "job-afl", "--socket", str(config.socket_path), "--state",
             str(tmp_path / "state.json"), "--settle", "0", "--once", "--reproduce",
             "--log-level", "warning"],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert watch.returncode == 0, watch.stderr.decode(errors="replace")[-3000:]
        with trio.fail_after(20):
            while master.count("crash") < 2:
                await trio.sleep(0.1)
        bug_list = await trio.to_thread.run_sync(daemon.spool.read, bugs.list_bugs, "job-afl")
        daemon.stop()
        rows = master.rows("crash")
    assert sorted(r["type"] for r in rows) == [
        "heap-buffer-overflow READ 4",
        "heap-use-after-free READ 1",
    ]
    for row in rows:
        assert "ERROR: AddressSanitizer" in row["stack_trace"]
        assert row["output"].splitlines()[1].startswith("reproduced: exited with 1")
    assert sum(b["hits"] for b in bug_list) == len(files)
    assert {b["signature"] for b in bug_list} == {
        "heap-buffer-overflow READ 4\npast_the_end",
        "heap-use-after-free READ 1\nafter_free",
    }


def test_a_fifo_or_symlinked_fuzzer_stats_is_not_read(tmp_path: Path) -> None:
    """The output directory is the fuzzer's: a FIFO must not hang the watcher, a symlink
    must not make it read another file as root."""
    crash = afl_dir(tmp_path, "afl-fuzz -o out -- /bin/true", b"x")
    stats = crash.parent.parent / "fuzzer_stats"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("command_line : afl-fuzz -o out -- /bin/false\n")
    for make in (lambda: os.mkfifo(stats), lambda: stats.symlink_to(elsewhere)):
        stats.unlink()
        make()
        hand_over(tmp_path)
        fields = Reproducer(tmp_path / "out").run(crash.parent.parent, crash, b"x")
        assert fields["output"] == "not reproduced: fuzzer_stats has no command_line with a target"
