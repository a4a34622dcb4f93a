"""The promise under real failures: NOTHING ACKNOWLEDGED IS LOST, and nothing is doubled.

Rules of this module:

* The daemon is a real subprocess (``python -m pfcollector serve``) delivering to an in-process
  :class:`~pfcollector.devmaster.DevMaster` on 127.0.0.1; the producers are real client
  processes using ``pfclient``. Real time, real sockets, real SIGKILL.
* A producer counts an id as acknowledged only when it saw the ack: the id a ``crash()`` call
  returned, or the id of a coverage/corpus/stats event once a later ``flush()`` returned.
  A call that fails (``DaemonUnavailable``, ``FlushTimeout``) forgets what it had not seen
  acknowledged and goes on with a new client.
* Randomness comes from one seeded RNG; the seed is printed (``PFCOLLECTOR_KILL9_SEED`` replays).
* Nothing is asserted about timing (the machine is shared); every wait is bounded, and every
  process, socket and master is closed in ``finally`` blocks.
* Exactly once by id: crash, coverage and corpus rows are keyed by id at the master, so a
  redundant resend is visible only in ``DevMaster.submissions`` (reported, not refused: a kill
  between the master's answer and the spool's commit resends by design). Stats go to the
  append-only ``/results/status``; every acknowledged stats id must be there, and duplicate
  rows (the same at-least-once resend) are reported.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pfclient
from pfcollector.devmaster import DevMaster

pytestmark = pytest.mark.slow

CLIENTS = 8
KILL_ROUNDS = 4
#: Seconds any single wait may take before the test gives up (never a timing assertion).
WAIT_LIMIT = 30.0

# A producer: a mix of crashes (waited for) and coverage/corpus/stats (then flush), recording
# every id it saw acknowledged, one "kind id" line per id, until the stop file appears.
CLIENT_SCRIPT = textwrap.dedent(
    """
    import os, random, sys, time
    import pfclient
    sock, out, stop, seed, name = sys.argv[1:6]
    rng = random.Random(int(seed))
    log = open(out, "a", buffering=1)
    client, pending, retries, n = None, [], 0, 0

    def record(kind, event_id):
        log.write(f"{kind} {event_id}\\n")

    def drop():
        global client
        if client is not None:
            client.timeout = 1.0  # close() flushes: briefly, and what it acks is not counted
            client.close()
            client = None

    stopping = False
    while True:
        if not stopping and os.path.exists(stop):
            stopping = True
        try:
            if client is None:
                client = pfclient.Client(sock, job_id=name, fuzzer="kill9", timeout=5)
            if stopping:
                client.flush()
                for kind, event_id in pending:
                    record(kind, event_id)
                break
            r, n = rng.random(), n + 1
            if r < 0.2:
                data = f"{name}-{n}-".encode() + rng.randbytes(rng.randint(0, 300))  # unique
                record("crash", client.crash("SEGV", data,
                                             signal=11, stack_trace="#0 main"))
            elif r < 0.5:
                pending.append(("coverage", client.coverage(rng.randint(1, 10**6),
                                                            new_edges=rng.randint(0, 9))))
            elif r < 0.7:
                pending.append(("corpus", client.corpus([f"queue/id:{n:06d}"],
                                                        total_size=rng.randint(1, 4096))))
            else:
                pending.append(("stats", client.stats(executions=rng.randint(0, 10**9),
                                                      exec_per_second=rng.random() * 1e4)))
            if len(pending) >= rng.randint(1, 40):
                client.flush()
                for kind, event_id in pending:
                    record(kind, event_id)
                pending.clear()
        except pfclient.PfClientError:
            pending.clear()  # their acks were not seen: they do not count
            drop()
            retries += 1
            if stopping and retries > 200:
                break
            time.sleep(0.05 + rng.random() * 0.2)
    drop()
    log.write("done\\n")
    log.close()
    """
)


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class DaemonProcess:
    """``python -m pfcollector serve`` as a subprocess that can be SIGKILLed and restarted."""

    def __init__(self, socket_path: Path, data_dir: Path, master_url: str, log: Path) -> None:
        self.socket_path = socket_path
        self.data_dir = data_dir
        self.master_url = master_url
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *extra: str) -> None:
        args = [
            sys.executable,
            "-m",
            "pfcollector",
            "serve",
            "--socket",
            str(self.socket_path),
            "--data-dir",
            str(self.data_dir),
            "--master",
            self.master_url,
            "--bot-id",
            "bot-kill9",
            "--flush-interval",
            "0.1",
            "--batch-size",
            "50",
            "--retry-base",
            "0.05",
            "--retry-cap",
            "0.5",
            "--breaker-reset",
            "0.1",
            "--drain-deadline",
            "2",
            "--log-level",
            "warning",
            *extra,
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        self.starts += 1
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT_LIMIT
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode}:\n{_log_tail(self.log)}"
                )
            with contextlib.suppress(pfclient.PfClientError):
                status = pfclient.status(self.socket_path, timeout=2)
                if status.get("pid") == self.proc.pid:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready in time:\n{_log_tail(self.log)}")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        return pfclient.status(self.socket_path, timeout=5)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=WAIT_LIMIT)
        self.proc = None

    def terminate(self) -> int:
        """SIGTERM, and the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=WAIT_LIMIT)
        finally:
            self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=WAIT_LIMIT)
            self.proc = None

    def wait_spool_empty(self) -> dict[str, Any]:
        """Poll status until nothing is left to deliver; the last status."""
        deadline = time.monotonic() + WAIT_LIMIT
        while True:
            status = self.status()
            delivery = status["delivery"] or {}
            pipeline = delivery.get("pipeline") or {}
            coalescing = ((status.get("policies") or {}).get("coalesce") or {}).get("pending", 0)
            if status["spool"]["events"] == 0 and not pipeline.get("held") and not coalescing:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"spool still holds {status['spool']['events']} events")
            time.sleep(0.1)


@pytest.fixture
def master() -> Iterator[DevMaster]:
    with DevMaster() as m:
        yield m


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("PFCOLLECTOR_KILL9_SEED") or random.SystemRandom().getrandbits(32))
    print(f"kill9 seed: {value} (replay with PFCOLLECTOR_KILL9_SEED={value})")
    return value


@pytest.fixture
def daemon_factory(tmp_path: Path, sock_dir: Path) -> Iterator[Callable[[str], DaemonProcess]]:
    made: list[DaemonProcess] = []

    def make(master_url: str) -> DaemonProcess:
        daemon = DaemonProcess(
            sock_dir / "pf.sock", tmp_path / "data", master_url, tmp_path / "daemon.log"
        )
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.close()


def _read_acked(paths: list[Path]) -> tuple[dict[str, str], int]:
    """Acknowledged ``id -> kind`` over every client file, and how many clients finished."""
    acked: dict[str, str] = {}
    done = 0
    for path in paths:
        for line in path.read_text().splitlines():
            if line == "done":
                done += 1
                continue
            kind, event_id = line.split()
            assert acked.setdefault(event_id, kind) == kind
    return acked, done


def _status_ids(master: DevMaster) -> Counter[str]:
    return Counter(str(row["body"].get("id")) for row in master.rows("status"))


def _coalesced_kinds(status: dict[str, Any]) -> frozenset[str]:
    """The kinds the daemon merges in memory (acked as accepted, not durable), per its status."""
    coalesce = (status.get("policies") or {}).get("coalesce") or {}
    return frozenset(coalesce.get("kinds") or ()) if coalesce.get("enabled") else frozenset()


def _check_delivered(
    master: DevMaster, acked: dict[str, str], coalesced: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Assert every acknowledged id is at the master under its kind; return the figures.

    An id of a ``coalesced`` kind was acknowledged as accepted, not durable: it may have been
    merged into a later snapshot (or lost with the daemon's memory), so for those kinds only
    ids that some producer really sent may be at the master.
    """
    at_master = {kind: master.ids(kind) for kind in ("crash", "coverage", "corpus")}
    status_rows = _status_ids(master)
    missing = []
    merged = 0
    for event_id, kind in acked.items():
        found = event_id in status_rows if kind == "stats" else event_id in at_master[kind]
        if kind in coalesced:
            merged += not found
        elif not found:
            missing.append((kind, event_id))
    submissions = master.submissions()
    figures = {
        "acked": len(acked),
        "acked_by_kind": dict(Counter(acked.values())),
        "missing": len(missing),
        "coalesced_kinds": sorted(coalesced),
        "coalesced_away": merged,
        "redundant_resends": sum(n - 1 for n in submissions.values() if n > 1),
        "status_duplicate_rows": sum(n - 1 for n in status_rows.values() if n > 1),
    }
    print(f"figures: {figures}")
    assert not missing, f"{len(missing)} acknowledged event(s) lost, e.g. {missing[:5]}"
    # Keyed by id: one row per id whatever was resent.
    for kind, ids in at_master.items():
        assert len(ids) == master.count(kind), kind
    return figures


def test_sigkill_rounds_lose_nothing_acknowledged(
    master: DevMaster,
    daemon_factory: Callable[[str], DaemonProcess],
    tmp_path: Path,
    seed: int,
) -> None:
    rng = random.Random(seed)
    daemon = daemon_factory(master.url)
    stop = tmp_path / "stop"
    outs = [tmp_path / f"acked-{i}.txt" for i in range(CLIENTS)]
    clients: list[subprocess.Popen[bytes]] = []
    try:
        daemon.start()
        for i, out in enumerate(outs):
            clients.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        CLIENT_SCRIPT,
                        str(daemon.socket_path),
                        str(out),
                        str(stop),
                        str(rng.getrandbits(32)),
                        f"job-{i}",
                    ],
                    stdout=subprocess.DEVNULL,
                    # where the daemon imports from, should a client never see its welcome
                    env={**os.environ, "PFCOLLECTOR_OUTBOX": str(daemon.data_dir / "outbox")},
                )
            )
        kills = []
        for _ in range(KILL_ROUNDS):
            time.sleep(rng.uniform(0.3, 2.0))
            daemon.kill9()
            kills.append(time.monotonic())
            time.sleep(rng.uniform(0.0, 0.5))  # down a moment: clients see refused connects
            daemon.start()
        time.sleep(rng.uniform(0.5, 1.5))
        stop.touch()
        for proc in clients:
            proc.wait(timeout=WAIT_LIMIT)
            assert proc.returncode == 0
        acked, done = _read_acked(outs)
        assert done == CLIENTS
        # One more kill with everything quiet but not yet delivered, then the last start.
        daemon.kill9()
        daemon.start()
        final = daemon.wait_spool_empty()
        assert final["spool"]["kinds"].get("crash", {}).get("dead_letters", 0) == 0
        assert daemon.terminate() == 0
        figures = _check_delivered(master, acked, _coalesced_kinds(final))
        print(f"seed {seed}: {KILL_ROUNDS + 1} SIGKILLs, {daemon.starts} starts, {figures}")
        assert figures["acked_by_kind"].get("crash", 0) > 0
    finally:
        stop.touch()
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=WAIT_LIMIT)


def test_sigterm_with_master_down_keeps_events_for_the_next_start(
    master: DevMaster, daemon_factory: Callable[[str], DaemonProcess]
) -> None:
    daemon = daemon_factory(master.url)
    master.faults.down()
    daemon.start()
    coalesced = _coalesced_kinds(daemon.status())
    ids: dict[str, str] = {}
    with pfclient.Client(daemon.socket_path, job_id="job-term", fuzzer="kill9", timeout=10) as pf:
        for i in range(20):
            ids[pf.crash("SEGV", f"input-{i}".encode(), signal=11)] = "crash"
            ids[pf.coverage(100 + i)] = "coverage"
            ids[pf.corpus([f"queue/{i}"])] = "corpus"
            ids[pf.stats(executions=i)] = "stats"
        pf.flush()
    assert daemon.terminate() == 0
    assert master.count("crash") == master.count("coverage") == master.count("status") == 0
    spool = sqlite3.connect(f"file:{daemon.data_dir / 'spool.db'}?mode=ro", uri=True)
    try:
        kept = {row[0] for row in spool.execute("SELECT id FROM events")}
    finally:
        spool.close()
    durable = {i for i, kind in ids.items() if kind not in coalesced}
    assert durable <= kept, "a drained-but-undelivered event left the spool"
    for kind in coalesced:  # merged in memory, but the last snapshot is spooled at shutdown
        assert kept & {i for i, k in ids.items() if k == kind}, kind
    master.faults.up()
    daemon.start()
    daemon.wait_spool_empty()
    assert daemon.terminate() == 0
    figures = _check_delivered(master, ids, coalesced)
    assert figures["acked"] == 80


def test_sigkill_between_acks_and_delivery_keeps_every_crash(
    master: DevMaster, daemon_factory: Callable[[str], DaemonProcess]
) -> None:
    """Acked but not yet delivered (master down) when SIGKILLed: delivered after restart."""
    daemon = daemon_factory(master.url)
    master.faults.down()
    daemon.start()
    with pfclient.Client(daemon.socket_path, job_id="job-k", fuzzer="kill9", timeout=10) as pf:
        ids = {pf.crash("ABRT", uuid.uuid4().bytes, signal=6): "crash" for _ in range(50)}
    daemon.kill9()
    master.faults.up()
    daemon.start()
    daemon.wait_spool_empty()
    assert daemon.terminate() == 0
    _check_delivered(master, ids)
