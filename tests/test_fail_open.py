"""The fail-open client and the outbox against a real daemon that is absent, killed, or hung.

Rules of this module:

* The daemon is a real subprocess (``python -m pfcollector serve``) delivering to an
  in-process :class:`~pfcollector.devmaster.DevMaster` on 127.0.0.1 (``DaemonProcess`` of
  test_kill9.py); harnesses are this process or real client processes using ``pfclient``.
* Nothing is asserted about speed: the slowest non-waiting call is reported and checked only
  against a bound far above the budget (a call that blocked on a dead or stopped daemon would
  take the whole ``timeout``, so the check still fails on the old, blocking client).
* Every wait is bounded; every process is ended in ``finally``.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import pfclient
from pfcollector.devmaster import DevMaster
from tests.test_kill9 import WAIT_LIMIT, DaemonProcess

pytestmark = pytest.mark.slow

#: A non-waiting call slower than this certainly blocked on the daemon.
BLOCKED = 0.5


class GcClock:
    """Seconds this process spent in its garbage collector (``gc.callbacks``).

    A collection may land inside any call and is the interpreter's pause, not the client's:
    the first collection of generation 1 after start-up frees the pure-Python ``datetime``
    classes that ``import datetime`` discards, 10-20 ms here. The tests report a call's own
    time (its duration minus collections inside it) beside the raw figure.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start

    def __enter__(self) -> GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


@pytest.fixture
def master() -> Iterator[DevMaster]:
    with DevMaster() as m:
        yield m


@pytest.fixture
def daemon(tmp_path: Path, sock_dir: Path, master: DevMaster) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(sock_dir / "pf.sock", tmp_path / "data", master.url,
                         tmp_path / "daemon.log")  # fmt: skip
    yield proc
    proc.close()


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_no_daemon_harness_loop_then_all_crashes_delivered_once(
    daemon: DaemonProcess, master: DevMaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PFCOLLECTOR_OUTBOX", str(daemon.data_dir / "outbox"))
    slowest = 0.0
    crash_ids = []
    with pfclient.Client(daemon.socket_path, job_id="job-fo", fuzzer="loop", timeout=2) as pf:
        for i in range(10_000):
            start = time.monotonic()
            pf.stats(executions=i, exec_per_second=100.0)
            pf.coverage(i, exec_count=i)
            slowest = max(slowest, time.monotonic() - start)
            if i % 100 == 0:
                crash_ids.append(pf.crash("SEGV", f"crash {i}".encode(), signal=11))
        assert not pf.connected
        assert pf.outboxed == 100
    print(f"slowest stats+coverage pair with no daemon: {slowest * 1000:.2f} ms")
    assert slowest < BLOCKED
    assert len(set(crash_ids)) == 100
    daemon.start()
    wait_for(lambda: master.ids("crash") >= set(crash_ids), "the outbox's crashes")
    submissions = master.submissions()
    assert all(submissions.get(i) == 1 for i in crash_ids), "a crash was sent twice"
    assert master.count("crash") == 100
    wait_for(lambda: daemon.status()["outbox"]["imported"] == 100, "the files' deletion")
    assert list((daemon.data_dir / "outbox").glob("*.pfev")) == []


HARNESS = textwrap.dedent(
    """
    import sys, time, pfclient
    sock, out, stop, name = sys.argv[1:5]
    log = open(out, "a", buffering=1)
    n = 0
    try:
        with pfclient.Client(sock, job_id=name, fuzzer="harness", timeout=2) as pf:
            import os
            while not os.path.exists(stop):
                n += 1
                pf.stats(executions=n, exec_per_second=1000.0)
                pf.coverage(n)
                if n % 20 == 0:
                    log.write("crash " + pf.crash("SEGV", f"{name}-{n}".encode(), signal=11)
                              + "\\n")
                time.sleep(0.002)
            log.write(f"dropped {dict(pf.dropped)} outboxed {pf.outboxed}\\n")
    except BaseException as exc:
        log.write(f"exception {exc!r}\\n")
        raise
    log.write("done\\n")
    """
)


def test_kill9_of_the_daemon_under_8_harnesses(
    daemon: DaemonProcess, master: DevMaster, tmp_path: Path
) -> None:
    stop = tmp_path / "stop"
    outs = [tmp_path / f"harness-{i}.txt" for i in range(8)]
    env = {**os.environ, "PFCOLLECTOR_OUTBOX": str(daemon.data_dir / "outbox")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        daemon.start()
        for i, out in enumerate(outs):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", HARNESS, str(daemon.socket_path), str(out), str(stop),
                 f"job-{i}"], env=env,
            ))  # fmt: skip
        wait_for(lambda: sum(o.exists() and o.read_text().count("crash ") for o in outs) >= 16,
                 "crashes before the kill")  # fmt: skip
        daemon.kill9()
        time.sleep(2.0)  # the scenario: restarted 2 s later
        daemon.start()
        before = sum(o.read_text().count("crash ") for o in outs)
        wait_for(lambda: sum(o.read_text().count("crash ") for o in outs) >= before + 16,
                 "crashes after the restart")  # fmt: skip
        stop.touch()
        for proc in procs:
            assert proc.wait(timeout=WAIT_LIMIT) == 0
    finally:
        stop.touch()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [line for o in outs for line in o.read_text().splitlines()]
    assert not [line for line in lines if line.startswith("exception")]
    assert lines.count("done") == 8
    crashes = [line.split()[1] for line in lines if line.startswith("crash ")]
    assert len(set(crashes)) == len(crashes)
    wait_for(lambda: master.ids("crash") >= set(crashes), "every reported crash at the master")
    assert master.count("crash") == len(crashes)  # nothing lost, nothing extra
    print(f"{len(crashes)} crashes, {master.count('crash')} at the master")


def test_sigstop_blocks_no_call_and_sigcont_delivers(
    daemon: DaemonProcess, master: DevMaster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PFCOLLECTOR_OUTBOX", str(daemon.data_dir / "outbox"))
    daemon.start()
    assert daemon.proc is not None
    with pfclient.Client(daemon.socket_path, job_id="job-stop", fuzzer="f", timeout=1) as pf:
        first = pf.crash("SEGV", b"before", signal=11)
        pf.flush()
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            slowest, own, crash_ids = 0.0, 0.0, []
            with GcClock() as collector:
                for i in range(3000):
                    start, in_gc = time.perf_counter(), collector.total
                    pf.stats(executions=i)
                    pf.coverage(i)
                    took = time.perf_counter() - start
                    slowest = max(slowest, took)
                    own = max(own, took - (collector.total - in_gc))
                    if i % 500 == 0:
                        start = time.perf_counter()
                        crash_ids.append(pf.crash("SEGV", f"stopped {i}".encode(), signal=11))
                        assert time.perf_counter() - start < pf.timeout + BLOCKED
            print(f"slowest non-waiting pair with a stopped daemon: {slowest * 1000:.2f} ms, "
                  f"{own * 1000:.2f} ms without the process's garbage collections")  # fmt: skip
            assert slowest < BLOCKED
            assert pf.outboxed == len(crash_ids)
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        pf.flush(timeout=WAIT_LIMIT)  # the stopped daemon takes the queue once it runs again
        last = pf.stats(executions=99_999)
        pf.flush(timeout=WAIT_LIMIT)
    wanted = {first, *crash_ids}
    wait_for(lambda: master.ids("crash") >= wanted, "crashes after SIGCONT")
    assert master.count("crash") == len(wanted)
    wait_for(lambda: any(r["body"].get("id") == last for r in master.rows("status")),
             "the last stats")  # fmt: skip


@pytest.mark.parametrize("flavour", ["asyncio", "trio"])
def test_async_clients_with_a_stopped_daemon(
    daemon: DaemonProcess, master: DevMaster, monkeypatch: pytest.MonkeyPatch, flavour: str
) -> None:
    """The asyncio and trio clients: no call blocks on a SIGSTOPped daemon beyond its budget
    (crash: its timeout), crashes go to the outbox, and everything arrives after SIGCONT."""
    import asyncio

    import trio

    from pfclient.aio import AsyncClient
    from pfclient.trio_client import open_trio_client

    monkeypatch.setenv("PFCOLLECTOR_OUTBOX", str(daemon.data_dir / "outbox"))
    daemon.start()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    figures: dict[str, object] = {}

    async def harness(pf: object) -> None:
        first = await pf.crash("SEGV", f"{flavour} before".encode(), signal=11)  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGSTOP)
        try:
            slowest, crash_ids = 0.0, [first]
            for i in range(2000):
                start = time.monotonic()
                await pf.stats(executions=i)  # type: ignore[attr-defined]
                slowest = max(slowest, time.monotonic() - start)
                if i % 500 == 0:
                    crash_ids.append(await pf.crash("SEGV", f"{flavour} {i}".encode(),  # type: ignore[attr-defined]
                                                    signal=11))  # fmt: skip
        finally:
            os.kill(pid, signal.SIGCONT)
        figures.update(slowest=slowest, crash_ids=crash_ids)

    async def run_asyncio() -> None:
        async with AsyncClient(daemon.socket_path, job_id=f"job-{flavour}", fuzzer="f",
                               timeout=1) as pf:  # fmt: skip
            await harness(pf)

    async def run_trio() -> None:
        async with open_trio_client(daemon.socket_path, job_id=f"job-{flavour}", fuzzer="f",
                                    timeout=1) as pf:  # fmt: skip
            await harness(pf)

    if flavour == "asyncio":
        asyncio.run(run_asyncio())
    else:
        trio.run(run_trio)
    print(f"{flavour}: slowest stats with a stopped daemon {figures['slowest']}")
    assert figures["slowest"] < BLOCKED  # type: ignore[operator]
    wanted = set(figures["crash_ids"])  # type: ignore[call-overload]
    wait_for(lambda: master.ids("crash") >= wanted, "crashes after SIGCONT")
