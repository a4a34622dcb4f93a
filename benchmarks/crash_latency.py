"""What one fuzzer feels: ``pfclient.crash()`` latency (send to durable ack) below saturation,
beside the floor: this disk's own ``fsync`` latency, measured in the same data directory,
and two parts of the round trip measured alone: one SQLite commit of a 1 KiB row with the
spool's settings (the disk part), and a stats event + ``flush()`` (socket, parse, ack: no disk).

``run.py`` measures the daemon saturated by 8 producers, where latency is mostly queueing.
This measures one producer reporting crashes with 1 KiB inputs at a few fixed rates, each
call waiting for its durable ack, against a local-mode daemon started here::

    python benchmarks/crash_latency.py [--rates 100,300] [--count 600]

Each rate is offered for ``count`` crashes; the rate is for the caller's loop, so at a rate the
daemon cannot sustain the calls simply run back to back (``achieved`` says so). Bounded: one
daemon, killed in ``finally``. ``run.py`` runs this as figure ``f``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

from pfclient import Client

__all__ = ["bench_crash_latency", "fsync_latency"]

#: Bars of issue 13 (item 2).
TARGET_P50_MS = 0.3
TARGET_P99_MS = 1.0


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def fsync_latency(directory: Path, count: int) -> dict[str, Any]:
    """p50/p99 of appending 1 KiB to a file and ``fsync``-ing it, in ``directory``."""
    path = directory / "fsync-probe"
    lat = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        block = os.urandom(1024)
        for _ in range(count):
            os.write(fd, block)
            t = time.perf_counter()
            os.fsync(fd)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    return {"count": count, "p50_ms": round(_pct(lat, 0.5) * 1e3, 3),
            "p99_ms": round(_pct(lat, 0.99) * 1e3, 3)}  # fmt: skip


def sqlite_commit_latency(directory: Path, count: int) -> dict[str, Any]:
    """p50/p99 of one SQLite transaction inserting a 1 KiB row, WAL + ``synchronous=FULL``
    (the spool's settings), in ``directory``: the disk part of a group commit of one crash."""
    import sqlite3

    path = directory / "commit-probe.db"
    db = sqlite3.connect(path, isolation_level=None)
    lat = []
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id TEXT PRIMARY KEY, body BLOB)")
        for i in range(count):
            row = (f"{i:08d}-{os.urandom(8).hex()}", os.urandom(1024))
            t = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t VALUES (?, ?)", row)
            db.execute("COMMIT")
            lat.append(time.perf_counter() - t)
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    return {"count": count, "p50_ms": round(_pct(lat, 0.5) * 1e3, 3),
            "p99_ms": round(_pct(lat, 0.99) * 1e3, 3)}  # fmt: skip


def ipc_round_trip(client: Client, count: int) -> dict[str, Any]:
    """p50/p99 of a stats event and ``flush()`` (acked without the disk: stats are coalesced
    in memory): the socket, parse and ack part of a ``crash()`` round trip."""
    lat = []
    for i in range(count):
        t = time.perf_counter()
        client.stats(executions=i, exec_per_second=1.0)
        client.flush()
        lat.append(time.perf_counter() - t)
        time.sleep(0.002)
    return {"count": count, "p50_ms": round(_pct(lat, 0.5) * 1e3, 3),
            "p99_ms": round(_pct(lat, 0.99) * 1e3, 3)}  # fmt: skip


def bench_crash_latency(root: Path, rates: list[float], count: int) -> dict[str, Any]:
    """One in-process producer at each of ``rates``, beside this disk's fsync."""
    out: dict[str, Any] = {"load": h.load_now(), "input_bytes": 1024, "count": count}
    daemon = h.start_daemon(root, "latency")
    try:
        out["fsync"] = fsync_latency(daemon.data_dir, max(200, count))
        out["sqlite_commit"] = sqlite_commit_latency(daemon.data_dir, max(200, count))
        with Client(str(daemon.socket_path), job_id="latency", fuzzer="bench") as client:
            out["ipc_stats_flush"] = ipc_round_trip(client, max(200, count // 2))
            client.crash("SEGV", os.urandom(1024), signal=11)  # warm: connection, tables
            for rate in rates:
                # fresh inputs per run: a repeated input would be deduplicated (a cheaper path)
                inputs = [os.urandom(1024) for _ in range(count)]
                lat = []
                t0 = time.perf_counter()
                for i, data in enumerate(inputs):
                    due = t0 + i / rate
                    now = time.perf_counter()
                    if due > now:
                        time.sleep(due - now)
                    start = time.perf_counter()
                    client.crash("SEGV", data, signal=11)
                    lat.append(time.perf_counter() - start)
                elapsed = time.perf_counter() - t0
                out[f"{rate:g}/s"] = {
                    "offered_per_s": rate,
                    "achieved_per_s": round(count / elapsed),
                    "p50_ms": round(_pct(lat, 0.5) * 1e3, 3),
                    "p99_ms": round(_pct(lat, 0.99) * 1e3, 3),
                    "max_ms": round(max(lat) * 1e3, 3),
                }
        # back to back: this producer's saturation rate
        with Client(str(daemon.socket_path), job_id="latency", fuzzer="bench") as client:
            inputs = [os.urandom(1024) for _ in range(count)]
            t0 = time.perf_counter()
            n = 0
            while time.perf_counter() - t0 < 1.0 and n < count:
                client.crash("SEGV", inputs[n], signal=11)
                n += 1
            out["back_to_back_per_s"] = round(n / (time.perf_counter() - t0))
    finally:
        daemon.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100,300", help="crashes/s, comma-separated")
    parser.add_argument("--count", type=int, default=600, help="crashes per rate")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pflat-"))
    try:
        rates = [float(r) for r in args.rates.split(",")]
        print(json.dumps(bench_crash_latency(root, rates, args.count), indent=2))
    finally:
        h.kill_all()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
