"""``pfcollector watch afl``: AFL++ file names, ``fuzzer_stats`` mapping, instance discovery,
and a watcher that never loses its place (state advances only after acks, survives restarts,
crash ids are stable). Unit tests use synthetic output directories and a recording sink; the
integration test runs the watcher (in a worker thread: it blocks) against a live in-process
daemon; the end-to-end test runs real ``afl-fuzz`` with ``pfcollector watch afl`` as a
subprocess and a daemon delivering to a DevMaster. A missing afl++ skips that test
(``require_tool`` in conftest.py; it fails under ``PFCOLLECTOR_REQUIRE_TOOLCHAINS=1``, as in
CI). Real clock; every wait is bounded by ``trio.fail_after``."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from pfclient import DaemonUnavailable
from pfcollector.config import Config
from pfcollector.daemon import Daemon
from pfcollector.devmaster import DevMaster
from pfcollector.events import Kind
from pfcollector.watch import (
    AflWatcher,
    Sink,
    StateFile,
    find_instances,
    parse_crash_name,
    parse_fuzzer_stats,
    signal_type,
    stats_fields,
)

STATS = """start_time        : 1795721404
last_update       : 1795721408
fuzzer_pid        : 14671
execs_done        : 9843
execs_per_sec     : 2389.66
corpus_count      : 3
stability         : 100.00%
bitmap_cvg        : 60.00%
saved_crashes     : 2
saved_hangs       : 0
peak_rss_mb       : 3
edges_found       : 6
total_edges       : 10
afl_version       : ++4.04c
command_line      : afl-fuzz -i in -o out -V 4 -- ./t
"""
CRASH = "id:000000,sig:11,src:000000,time:43,execs:212,op:havoc,rep:4"


class FakeSink(Sink):
    """Records what would be sent; ``fail_on`` makes the n-th send raise DaemonUnavailable."""

    def __init__(self, job_id: str = "job-1") -> None:
        super().__init__(None, job_id)
        self.sent: list[tuple[str, str, dict[str, Any], str | None]] = []
        self.fail_on: int | None = None

    def send(
        self, fuzzer: str, kind: str, fields: dict[str, Any], event_id: str | None = None
    ) -> None:
        if self.fail_on is not None and len(self.sent) + 1 >= self.fail_on:
            raise DaemonUnavailable("no daemon (test)")
        self.sent.append((fuzzer, kind, fields, event_id))

    def flush(self) -> None:
        pass


def make_instance(out: Path, name: str, crashes: int = 1, queue: int = 2) -> Path:
    inst = out / name
    for sub in ("crashes", "queue", "hangs"):
        (inst / sub).mkdir(parents=True, exist_ok=True)
    (inst / "crashes" / "README.txt").write_text("not a crash")
    for n in range(crashes):
        (
            inst / "crashes" / f"id:{n:06d},sig:{11 if n % 2 == 0 else 6},src:000000,op:havoc"
        ).write_bytes(f"{name}-crash-{n}".encode())
    for n in range(queue):
        (inst / "queue" / f"id:{n:06d},time:0,execs:0,orig:seed{n}").write_bytes(b"q" * (n + 1))
    (inst / "fuzzer_stats").write_text(STATS)
    return inst


def watcher(out: Path, sink: Sink, state_path: Path) -> AflWatcher:
    return AflWatcher(out, sink, StateFile(state_path, out), settle=0.0)


def test_crash_names_and_signals() -> None:
    assert parse_crash_name(CRASH) == (0, 11)
    assert parse_crash_name("id:000012,src:000001,time:5,execs:9,op:flip1,pos:0") == (12, 0)
    assert parse_crash_name("README.txt") is None
    assert parse_crash_name("id:000003,sig:06,src:000002") == (3, 6)
    assert [signal_type(n) for n in (11, 6, 8, 0, 77)] == [
        "SIGSEGV",
        "SIGABRT",
        "SIGFPE",
        "crash",
        "SIG77",
    ]


def test_fuzzer_stats_mapping() -> None:
    raw = parse_fuzzer_stats(STATS)
    assert raw["command_line"] == "afl-fuzz -i in -o out -V 4 -- ./t"
    assert stats_fields(raw) == {
        "executions": 9843,
        "exec_per_second": 2389.66,
        "total_edges": 10,
        "covered_edges": 6,
        "coverage_percent": 60.0,
        "unique_crashes": 2,
        "total_crashes": 2,
        "corpus_size": 3,
        "memory_usage": 3 * 1024 * 1024,
    }
    old_afl = parse_fuzzer_stats("execs_done : 5\nunique_crashes : 4\npaths_total : 9\n")
    assert stats_fields(old_afl)["unique_crashes"] == 4
    assert stats_fields(old_afl)["corpus_size"] == 9


def test_finds_main_secondaries_and_single_layout(tmp_path: Path) -> None:
    make_instance(tmp_path / "multi", "main")
    make_instance(tmp_path / "multi", "sec1")
    (tmp_path / "multi" / "not-an-instance").mkdir()
    assert [n for n, _ in find_instances(tmp_path / "multi")] == ["main", "sec1"]
    make_instance(tmp_path / "single", "default")
    assert [n for n, _ in find_instances(tmp_path / "single")] == ["default"]
    assert find_instances(tmp_path / "missing") == []


def test_scan_sends_each_thing_once_and_survives_restart(tmp_path: Path) -> None:
    out, state = tmp_path / "out", tmp_path / "state.json"
    make_instance(out, "main", crashes=2, queue=3)
    make_instance(out, "sec1", crashes=1, queue=1)
    sink = FakeSink()
    assert watcher(out, sink, state).scan() == 3 + 2 * 3  # crashes; corpus, stats, coverage
    crashes = [s for s in sink.sent if s[1] == "crash"]
    assert [(c[0], c[2]["type"], c[2]["signal"]) for c in crashes] == [
        ("afl++/main", "SIGSEGV", 11),
        ("afl++/main", "SIGABRT", 6),
        ("afl++/sec1", "SIGSEGV", 11),
    ]
    assert crashes[0][2]["input"] == b"main-crash-0"
    corpus = next(s for s in sink.sent if s[1] == "corpus" and s[0] == "afl++/main")
    assert corpus[2]["files"][0].startswith("main/queue/id:000000") and corpus[2]["total_size"] == 6
    cov = next(s for s in sink.sent if s[1] == "coverage")
    assert cov[2] == {"edges": 6, "new_edges": 6, "exec_count": 9843}

    again = FakeSink()
    assert watcher(out, again, state).scan() == 0  # a restart: nothing resent
    saved = json.loads(state.read_text())
    assert saved["version"] == 1 and saved["instances"]["main"]["crashes"]["next"] == 2

    (out / "main" / "crashes" / "id:000002,sig:11,src:000001").write_bytes(b"new")
    (out / "main" / "queue" / "id:000003,src:000001,+cov").write_bytes(b"n")
    stats = out / "main" / "fuzzer_stats"
    stats.write_text(STATS.replace("1795721408", "1795721999").replace(": 6\n", ": 9\n"))
    third = FakeSink()
    watcher(out, third, state).scan()
    assert [(s[1], s[0]) for s in third.sent] == [
        ("crash", "afl++/main"),
        ("corpus", "afl++/main"),
        ("stats", "afl++/main"),
        ("coverage", "afl++/main"),
    ]
    assert third.sent[3][2]["new_edges"] == 3


def test_crash_ids_are_stable_and_state_waits_for_the_daemon(tmp_path: Path) -> None:
    out, state = tmp_path / "out", tmp_path / "state.json"
    make_instance(out, "main", crashes=3, queue=2)
    failing = FakeSink()
    failing.fail_on = 3  # the third crash: the daemon went away
    with pytest.raises(DaemonUnavailable):
        watcher(out, failing, state).scan()
    saved = json.loads(state.read_text())["instances"]["main"]
    assert saved["crashes"]["next"] == 2 and saved.get("queue", {}).get("next", 0) == 0
    retry = FakeSink()
    watcher(out, retry, state).scan()
    assert [s[2]["input"] for s in retry.sent if s[1] == "crash"] == [b"main-crash-2"]
    assert any(s[1] == "corpus" for s in retry.sent)  # the queue was not skipped
    fresh = FakeSink()  # no state at all: everything again, under the same ids
    watcher(out, fresh, tmp_path / "other.json").scan()
    ids = [s[3] for s in failing.sent + retry.sent if s[1] == "crash"]
    assert ids == [s[3] for s in fresh.sent if s[1] == "crash"] and len(set(ids)) == 3


def test_unsettled_files_wait_and_a_new_crashes_dir_restarts_numbering(tmp_path: Path) -> None:
    out, state = tmp_path / "out", tmp_path / "state.json"
    make_instance(out, "default", crashes=1, queue=0)
    sink = FakeSink()
    w = AflWatcher(out, sink, StateFile(state, out), settle=60.0)
    w.scan()
    assert not [s for s in sink.sent if s[1] == "crash"]  # written just now: not yet
    old = time.time() - 120
    crash = next((out / "default" / "crashes").glob("id:*"))
    os.utime(crash, (old, old))
    w.scan()
    assert [s[1] for s in sink.sent].count("crash") == 1
    # AFL++ resuming moves crashes/ away and starts again at id:000000 in a new directory
    (out / "default" / "crashes").rename(out / "default" / "crashes.2025-01-01")
    (out / "default" / "crashes").mkdir()
    (out / "default" / "crashes" / CRASH).write_bytes(b"after resume")
    os.utime(out / "default" / "crashes" / CRASH, (old, old))
    w.scan()
    crashes = [s for s in sink.sent if s[1] == "crash"]
    assert len(crashes) == 2 and crashes[1][2]["input"] == b"after resume"
    assert crashes[0][3] != crashes[1][3]


async def test_live_daemon_stores_crash_with_stable_id(
    local_daemon: Daemon, tmp_path: Path
) -> None:
    out, state = tmp_path / "out", tmp_path / "state.json"
    make_instance(out, "main", crashes=2, queue=2)
    sock = local_daemon.config.socket_path

    def scan(state_path: Path) -> int:
        sink = Sink(sock, "job-afl")
        try:
            return watcher(out, sink, state_path).scan()
        finally:
            sink.close()

    with trio.fail_after(20):
        assert await trio.to_thread.run_sync(scan, state) == 5
        rows = [r.event for r in local_daemon.spool.read_after(0, 100)]
        crashes = [e for e in rows if e.kind is Kind.CRASH]
        assert len(crashes) == 2 and {e.fuzzer for e in crashes} == {"afl++/main"}
        assert crashes[0].fields["hash"] == hashlib.sha256(b"main-crash-0").hexdigest()
        assert crashes[0].fields["signal"] == 11 and crashes[0].fields["type"] == "SIGSEGV"
        assert await trio.to_thread.run_sync(scan, state) == 0
        # state lost: resent under the same ids, and the spool keeps one copy of each
        assert await trio.to_thread.run_sync(scan, tmp_path / "lost.json") == 5
        again = [r.event for r in local_daemon.spool.read_after(0, 100)]
        assert sorted(e.id for e in again if e.kind is Kind.CRASH) == sorted(e.id for e in crashes)


TARGET = r"""
#include <string.h>
#include <unistd.h>
int main(void) {
    char buf[64];
    ssize_t n = read(0, buf, sizeof buf);
    if (n > 0 && buf[0] == 'C') *(volatile int *)0 = 1;  /* SIGSEGV */
    return 0;
}
"""


@pytest.mark.slow
async def test_e2e_real_afl_crash_reaches_master(
    afl_tools: tuple[str, str],
    make_config: Callable[..., Config],
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    afl_fuzz, afl_cc = afl_tools
    (tmp_path / "t.c").write_text(TARGET)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "seed").write_bytes(b"hello")
    build = await trio.run_process(
        [afl_cc, "-o", str(tmp_path / "t"), str(tmp_path / "t.c")],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr.decode(errors="replace")[-2000:]

    master = DevMaster().start()
    try:
        config = make_config(master_url=master.url, bot_id="bot-e2e", flush_interval=0.2)
        daemon: Daemon = await nursery.start(
            lambda task_status: Daemon(config).run(handle_signals=False, task_status=task_status)
        )
        out = tmp_path / "out"
        env = {
            **os.environ,
            "AFL_NO_UI": "1",
            "AFL_SKIP_CPUFREQ": "1",
            "AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES": "1",
            "AFL_NO_AFFINITY": "1",
            "AFL_SKIP_BIN_CHECK": "1",
            "AFL_BENCH_UNTIL_CRASH": "1",
        }
        watch_cmd = [
            sys.executable,
            "-m",
            "pfcollector",
            "watch",
            "afl",
            str(out),
            "--job",
            "job-e2e",
            "--socket",
            str(config.socket_path),
            "--state",
            str(tmp_path / "state.json"),
            "--interval",
            "0.2",
            "--settle",
            "0.2",
            "--log-level",
            "warning",
        ]
        watch = await trio.lowlevel.open_process(watch_cmd)
        try:
            with trio.fail_after(40):
                fuzz = await trio.run_process(
                    [
                        afl_fuzz,
                        "-i",
                        str(tmp_path / "in"),
                        "-o",
                        str(out),
                        "-V",
                        "8",
                        "--",
                        str(tmp_path / "t"),
                    ],
                    env=env,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                crash_files = sorted((out / "default" / "crashes").glob("id:*"))
                assert crash_files, (
                    "afl-fuzz found no crash:\n" + fuzz.stdout.decode(errors="replace")[-3000:]
                )
                while len(master.rows("crash")) < len(crash_files):
                    await trio.sleep(0.1)
                watch.send_signal(signal.SIGTERM)
                assert await watch.wait() == 0
        finally:
            if watch.returncode is None:
                watch.kill()
                with trio.CancelScope(shield=True):
                    await watch.wait()
        rows = {r["hash"]: r for r in master.rows("crash")}
        for path in crash_files:
            row = rows[hashlib.sha256(path.read_bytes()).hexdigest()]
            assert row["signal"] == 11 and row["type"] == "SIGSEGV"
            assert row["job_id"] == "job-e2e" and row["bot_id"] == "bot-e2e"
        saved = json.loads((tmp_path / "state.json").read_text())
        assert saved["instances"]["default"]["crashes"]["next"] == len(crash_files)
        daemon.stop()
    finally:
        master.stop()


@pytest.mark.parametrize("code", ["spool_full", "disk_full", "spool_write_failed"])
def test_not_now_refusals_are_retried_not_skipped(
    monkeypatch: pytest.MonkeyPatch, code: str
) -> None:
    from pfclient import EventRejected
    from pfcollector.watch import _sink

    sink = Sink(None, "job-1")
    monkeypatch.setattr(Sink, "_client", lambda self, fuzzer: object())

    def refuse(*args: Any, **kwargs: Any) -> str:
        raise EventRejected(code, "not now", 1)

    monkeypatch.setattr(_sink, "submit", refuse)
    with pytest.raises(EventRejected):  # the watcher backs off; its place is not advanced
        sink.send("afl++/main", "crash", {"type": "SIGSEGV", "input": b"x"}, "id-1")
    assert sink.rejected == 0


def test_a_bad_event_is_poison_and_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    from pfclient import EventRejected
    from pfcollector.watch import _sink

    sink = Sink(None, "job-1")
    monkeypatch.setattr(Sink, "_client", lambda self, fuzzer: object())

    def refuse(*args: Any, **kwargs: Any) -> str:
        raise EventRejected("wrong_type", "field 'signal' must be an integer", 1)

    monkeypatch.setattr(_sink, "submit", refuse)
    sink.send("afl++/main", "crash", {"type": "SIGSEGV", "input": b"x"}, "id-1")
    assert sink.rejected == 1
