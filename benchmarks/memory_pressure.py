"""Memory under pressure: ``python benchmarks/memory_pressure.py [--quick] [--out FILE.json]``.

The daemon's peak RSS (``VmHWM``) must stay within ``memory_budget + 100 MiB`` (and its input
writer child's within its batch, an eighth of the budget, plus one item and 32 MiB) while many
producers send big events and nothing drains: another process holds the spool's SQLite write
lock (``BEGIN IMMEDIATE`` on ``spool.db``) and the master is down (a closed port). Two loads:

* ``crash1m``: 64 connections, each sending 1 MiB crash inputs and 256 KiB corpus events
  (with ``contents``), alternately;
* ``crash10m``: the same connections sending 10 MiB crash inputs.

Clients write without waiting for acks (the worst case for the daemon's memory) and read
whatever the daemon answers. When the lock is released, every crash and corpus event must be
acknowledged (and be in the spool) or refused with a non-fatal error naming why (a commit that
waited out SQLite's busy timeout is refused with ``spool_write_failed``); a fatal error, a
disconnect or an event neither acked nor refused fails the run (exit 1).

``--quick`` (CI, through ``run.py --quick``): a 48 MiB budget and fewer events, same checks.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

__all__ = ["bench_pressure", "main"]

MIB = 1024 * 1024
_HEADER = struct.Struct(">I")
#: Slack over the budget the daemon may use: the interpreter, SQLite's page cache, threads.
SLACK_MIB = 100
#: The input writer child's slack over its batch and one item: its interpreter and imports.
WRITER_SLACK_MIB = 32

SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        "budget_mib": 48,
        "stall_s": 4.0,
        "loads": {
            "crash1m": {"connections": 64, "events": 2, "crash": 1 * MIB, "corpus": 256 * 1024},
            "crash10m": {"connections": 16, "events": 1, "crash": 10 * MIB, "corpus": 0},
        },
    },
    "full": {
        "budget_mib": 256,
        "stall_s": 15.0,
        "loads": {
            "crash1m": {"connections": 64, "events": 16, "crash": 1 * MIB, "corpus": 256 * 1024},
            "crash10m": {"connections": 64, "events": 2, "crash": 10 * MIB, "corpus": 0},
        },
    },
}


def _frame(body: dict[str, Any]) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    return _HEADER.pack(len(packed)) + packed


def _events(n: int, crash: int, corpus: int, index: int) -> list[tuple[str, bytes]]:
    """(kind, frame) pairs: crashes and (when ``corpus``) corpus events, alternately."""
    out = []
    for i in range(n):
        seq = i + 1
        body: dict[str, Any] = {"t": "event", "seq": seq, "id": str(uuid.uuid4())}
        tag = f"{index}-{seq}-".encode()
        if corpus and i % 2:
            data = tag + os.urandom(64) * (corpus // 64)
            body.update(kind="corpus", files=[f"queue/id:{index}:{seq}"], total_size=len(data),
                        contents=[data[:corpus]])  # fmt: skip
        else:
            data = tag + os.urandom(64) * (crash // 64)
            body.update(kind="crash", type="SEGV", signal=11, input=data[:crash],
                        stack_trace="#0 0x4005d4 in parse src/parse.c:42")  # fmt: skip
        out.append((body["kind"], _frame(body)))
    return out


class _Conn:
    """One producer: writes every frame at once (no ack window), reads what comes back."""

    def __init__(self, path: Path, index: int, load: dict[str, Any]) -> None:
        self.index = index
        self.frames = _events(load["events"], load["crash"], load["corpus"], index)
        self.kinds = {seq: kind for seq, (kind, _) in enumerate(self.frames, start=1)}
        self.acked = 0
        self.refused: dict[int, str] = {}
        self.fatal: str | None = None
        self.closed = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        hello = {"t": "hello", "v": 1, "job_id": f"mem-{index}", "fuzzer": "bench",
                 "pid": os.getpid()}  # fmt: skip
        self.sock.sendall(_frame(hello))
        self._buf = bytearray()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.writer = threading.Thread(target=self._write, daemon=True)

    def _write(self) -> None:
        try:
            for _, frame in self.frames:
                self.sock.sendall(frame)
        except OSError as exc:
            self.fatal = self.fatal or f"write failed: {exc}"

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                self.closed = True
                return
            self._buf += data
            while len(self._buf) >= 4:
                (size,) = _HEADER.unpack_from(self._buf)
                if len(self._buf) < 4 + size:
                    break
                msg = msgpack.unpackb(bytes(self._buf[4 : 4 + size]), raw=False)
                del self._buf[: 4 + size]
                if msg.get("t") == "ack":
                    self.acked = max(self.acked, msg["seq"])
                elif msg.get("t") == "error":
                    if msg.get("fatal"):
                        self.fatal = f"{msg['code']}: {msg.get('message')}"
                    elif msg.get("seq") is not None:
                        self.refused[msg["seq"]] = msg["code"]

    @property
    def settled(self) -> bool:
        return self.acked >= len(self.frames) or self.fatal is not None or self.closed


def _hold_write_lock(db: Path) -> subprocess.Popen[bytes]:
    """Another process takes the spool's write lock and keeps it until its stdin closes."""
    code = (
        "import sqlite3, sys\n"
        f"db = sqlite3.connect({str(db)!r}, isolation_level=None, timeout=30)\n"
        "db.execute('BEGIN IMMEDIATE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
        "db.execute('ROLLBACK')\n"
    )
    proc = subprocess.Popen([h.PY, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    h.CHILDREN.append(proc)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"locked":
        raise h.BenchError("the lock holder could not lock the spool")
    return proc


def _run_load(root: Path, name: str, load: dict[str, Any], budget: int, stall_s: float,
              spool_max: int) -> dict[str, Any]:  # fmt: skip
    closed = h.free_port()
    flags = ["--master", f"http://127.0.0.1:{closed}", "--bot-id", "bench",
             "--drain-deadline", "0", "--memory-budget", str(budget),
             "--spool-max-bytes", str(spool_max),
             "--max-connections", str(load["connections"] + 8)]  # fmt: skip
    daemon = h.start_daemon(root, name, flags)
    locker = None
    try:
        rss_start = daemon.vmhwm_kib()
        conns = [_Conn(daemon.socket_path, i, load) for i in range(load["connections"])]
        locker = _hold_write_lock(daemon.data_dir / "spool.db")
        started = time.monotonic()
        for c in conns:
            c.reader.start()
            c.writer.start()
        time.sleep(stall_s)  # the spool is stalled, the master down: nothing drains
        stalled_status = daemon.status()
        rss_stalled = daemon.vmhwm_kib()
        assert locker.stdin is not None
        locker.stdin.close()  # release the lock: commits go on
        h.stop_proc(locker)
        deadline = time.monotonic() + 600
        while not all(c.settled for c in conns):
            if time.monotonic() > deadline:
                raise h.BenchError(f"{name}: events neither acked nor refused after 600 s")
            time.sleep(0.1)
        for c in conns:
            c.writer.join(60)
        elapsed = time.monotonic() - started
        status = daemon.status()
        rss = daemon.vmhwm_kib()
        writer_pid = status["spool"]["input_writer"]["pid"]  # the child writing input files
        writer_rss = h.vmhwm_kib(writer_pid) if writer_pid else 0
    finally:
        if locker is not None and locker.poll() is None:
            locker.kill()
        daemon.stop()
    fatal = [f"conn {c.index}: {c.fatal}" for c in conns if c.fatal]
    closed_early = [c.index for c in conns if c.closed and c.acked < len(c.frames)]
    if fatal or closed_early:
        raise h.BenchError(f"{name}: producers punished: {fatal[:3]} closed={closed_early[:5]}")
    refused: dict[str, int] = {}
    acked = 0
    for c in conns:
        for seq in range(1, len(c.frames) + 1):
            if seq in c.refused:
                refused[c.refused[seq]] = refused.get(c.refused[seq], 0) + 1
            elif seq <= c.acked:
                acked += 1
            else:
                raise h.BenchError(f"{name}: conn {c.index} seq {seq} neither acked nor refused")
    kinds = status["spool"]["kinds"]
    spooled = sum(kinds.get(k, {}).get("spooled", 0) for k in ("crash", "corpus"))
    if spooled != acked:
        raise h.BenchError(f"{name}: {acked} durable events acked but {spooled} in the spool")
    sent_bytes = sum(len(f) for c in conns for _, f in c.frames)
    item_mib = -(-max(load["crash"], load["corpus"]) // MIB)
    peak_mib = rss / 1024
    return {
        "connections": load["connections"],
        "events": sum(len(c.frames) for c in conns),
        "crash_bytes": load["crash"],
        "corpus_bytes": load["corpus"],
        "sent_mib": round(sent_bytes / MIB, 1),
        "acked": acked,
        "refused": refused,
        "memory_budget_mib": budget // MIB,
        "peak_rss_mib": round(peak_mib, 1),
        "peak_rss_stalled_mib": round(rss_stalled / 1024, 1),
        "rss_at_start_mib": round(rss_start / 1024, 1),
        "budget_peak_mib": round(status["memory"]["peak_bytes"] / MIB, 1),
        "budget_waits": status["memory"]["waits"],
        "held_back_while_stalled": stalled_status["memory"]["waiting"],
        "bound_mib": budget // MIB + SLACK_MIB,
        "within_bound": peak_mib <= budget / MIB + SLACK_MIB,
        # The input writer's child holds one batch (an eighth of the budget, one item past it).
        "writer_peak_rss_mib": round(writer_rss / 1024, 1),
        "writer_bound_mib": (writer_bound := budget // 8 // MIB + item_mib + WRITER_SLACK_MIB),
        "writer_within_bound": writer_rss / 1024 <= writer_bound,
        "seconds": round(elapsed, 1),
    }


def bench_pressure(root: Path, quick: bool) -> dict[str, Any]:
    """Both loads; fails (BenchError) when the RSS bound is broken or an event is lost."""
    size = SIZES["quick" if quick else "full"]
    budget = size["budget_mib"] * MIB
    out: dict[str, Any] = {"load": h.load_now(), "memory_budget_mib": size["budget_mib"]}
    for name, load in size["loads"].items():
        spool_max = 4 * load["connections"] * load["events"] * max(load["crash"], load["corpus"])
        result = _run_load(root, f"pressure-{name}", load, budget, size["stall_s"], spool_max)
        out[name] = result
        if not result["writer_within_bound"]:
            raise h.BenchError(
                f"{name}: the input writer process peaked at {result['writer_peak_rss_mib']} "
                f"MiB > {result['writer_bound_mib']} MiB: {result}"
            )
        if not result["within_bound"]:
            raise h.BenchError(
                f"{name}: peak RSS {result['peak_rss_mib']} MiB > memory_budget "
                f"{result['memory_budget_mib']} MiB + {SLACK_MIB} MiB: {result}"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="pfcollector memory under pressure")
    p.add_argument("--quick", action="store_true", help="small sizes (CI)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--src", type=Path, default=None, help="run the daemon from this tree")
    args = p.parse_args(argv)
    if args.src is not None:
        h.DAEMON_ENV["PYTHONPATH"] = str((args.src / "src").resolve())
    root = Path(tempfile.mkdtemp(prefix="pfpressure-"))
    try:
        result = bench_pressure(root, args.quick)
    except h.BenchError as exc:
        print(f"BENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        h.kill_all()
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
