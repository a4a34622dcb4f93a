"""One load-generating client process: pre-encoded event frames over the daemon's socket.

Run by ``benchmarks/run.py``, never by hand (though ``--help`` works). The process builds every
frame before the clock starts (so msgpack encoding and ``uuid4`` are not in the measurement),
connects, says hello, prints ``ready`` and waits for a ``go`` line on stdin. Then it sends the
frames as one byte stream with a bounded window of unacknowledged events (like pfclient's
``max_unacked``), optionally paced to a rate and/or
cut off after ``--duration`` seconds, and reads the daemon's cumulative acks as they
come. Acceptance is timed by the acks, not by how fast this process can write.

The result (counts, times on the shared ``time.monotonic`` clock, error codes) is written as
JSON to ``--out``; with ``--latency-out``, the send-to-ack latency of every event is written as
an ``array('d')`` of seconds.

Single-threaded and non-blocking (``poll``): no GIL ping-pong between a sender and a reader.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import select
import socket
import struct
import sys
import time
import uuid
from array import array
from collections import Counter
from typing import Any

import msgpack

__all__ = ["MIXES", "build_frames", "main"]

_HEADER = struct.Struct(">I")
_SEND_MAX = 256 * 1024
_RECV_SIZE = 1 << 20
_INPUT_SIZE = 1024


def _stats(seq: int, i: int) -> dict[str, Any]:
    return {
        "kind": "stats",
        "executions": 1_000_000 + i * 977,
        "exec_per_second": 8_500.25,
    }


def _coverage(seq: int, i: int) -> dict[str, Any]:
    return {"kind": "coverage", "edges": 5_120 + i, "new_edges": i % 7, "exec_count": i * 1000}


def _corpus(seq: int, i: int) -> dict[str, Any]:
    return {"kind": "corpus", "files": [f"queue/id:{i:06d}"], "total_size": 2_048 + i}


def _crash(seq: int, i: int) -> dict[str, Any]:
    # Every input is distinct: content-addressed storage must not dedupe the benchmark away.
    return {
        "kind": "crash",
        "type": "SEGV",
        "signal": 11,
        "input": os.urandom(_INPUT_SIZE),
        "stack_trace": "#0 0x4005d4 in parse_header src/parse.c:42",
    }


#: Event mixes a process can send: one maker per position, cycled.
MIXES = {
    "stats": (_stats,),
    "coverage": (_coverage,),
    "corpus": (_corpus,),
    "crash": (_crash,),
    # crash-heavy: half crashes (1 KiB inputs), a quarter coverage, a quarter stats
    "crashmix": (_crash, _coverage, _crash, _stats),
    # what the master stores: crashes, coverage and corpus in equal parts
    "results": (_crash, _coverage, _corpus),
}


def build_frames(mix: str, count: int, index: int) -> list[bytes]:
    """``count`` event frames (seq 1..count) of ``mix``, each with a fresh uuid4 id."""
    makers = MIXES[mix]
    frames = []
    for i in range(count):
        seq = i + 1
        body = {"t": "event", "seq": seq, "id": str(uuid.uuid4())}
        body.update(makers[i % len(makers)](seq, i + index * 1_000_003))
        packed = msgpack.packb(body, use_bin_type=True)
        frames.append(_HEADER.pack(len(packed)) + packed)
    return frames


class _Reader:
    """Daemon->client frames out of a byte stream."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        buf = self.buf
        buf += data
        out = []
        while len(buf) >= 4:
            (size,) = _HEADER.unpack_from(buf)
            if len(buf) < 4 + size:
                break
            out.append(msgpack.unpackb(bytes(buf[4 : 4 + size]), raw=False))
            del buf[: 4 + size]
        return out


def _handshake(sock: socket.socket, job_id: str, reader: _Reader) -> None:
    hello = {"t": "hello", "v": 1, "job_id": job_id, "fuzzer": "bench", "pid": os.getpid()}
    packed = msgpack.packb(hello, use_bin_type=True)
    sock.sendall(_HEADER.pack(len(packed)) + packed)
    sock.settimeout(10.0)
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection before welcome")
        for msg in reader.feed(data):
            if msg.get("t") == "welcome":
                sock.setblocking(False)
                return
            raise ConnectionError(f"expected welcome, got {msg}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Connect, wait for ``go``, send everything, collect acks. Bounded by ``--max-seconds``."""
    frames = build_frames(args.mix, args.count, args.index)
    ends = []
    total = 0
    for frame in frames:
        total += len(frame)
        ends.append(total)
    stream = memoryview(b"".join(frames))
    del frames
    n = args.count
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sock.connect(args.socket)
    reader = _Reader()
    _handshake(sock, f"bench-job-{args.index}", reader)
    latency = args.latency_out is not None
    send_t = array("d", bytes(8 * n)) if latency else None
    ack_log: list[tuple[float, int]] = []
    errors: Counter[str] = Counter()
    first_error = None
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("no go")
    t0 = time.monotonic()
    deadline = t0 + args.max_seconds
    stop_at = t0 + args.duration if args.duration > 0 else 0.0
    per_s = args.rate
    pos = sent = acked = 0
    t_sent_all = t_last_ack = None
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    mask = select.POLLIN
    eof = False
    while acked < n and not eof:
        now = time.monotonic()
        if now > deadline:
            break
        if stop_at and now >= stop_at and pos < ends[n - 1]:
            # Time is up: offer nothing new (finish the frame under way), wait for the acks.
            n = bisect.bisect_left(ends, pos) + 1 if pos else 0
            t_sent_all = now if pos == ends[n - 1] else None
            if n == 0:
                break
        allowed = n if per_s <= 0 else min(n, int(per_s * (now - t0)) + 1)
        limit = min(allowed, acked + args.window)
        want = ends[limit - 1] if limit > 0 else 0
        if pos < want:
            try:
                wrote = sock.send(stream[pos : min(want, pos + _SEND_MAX)])
            except BlockingIOError:
                wrote = 0
            if wrote:
                pos += wrote
                done = bisect.bisect_right(ends, pos)
                if send_t is not None:
                    for k in range(sent, done):
                        send_t[k] = now
                sent = done
                if sent == n:
                    t_sent_all = now
        new_mask = select.POLLIN | (select.POLLOUT if pos < want else 0)
        if new_mask != mask:
            poller.modify(sock, new_mask)
            mask = new_mask
        if pos < want:
            timeout = 50
        elif per_s > 0 and allowed < n and acked + args.window > allowed:
            timeout = max(0, int(((allowed / per_s) + t0 - now) * 1000))  # next frame's turn
        else:
            timeout = 50
        for _fd, ev in poller.poll(timeout):
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                try:
                    data = sock.recv(_RECV_SIZE)
                except BlockingIOError:
                    continue
                if not data:
                    eof = True
                    break
                t = time.monotonic()
                for msg in reader.feed(data):
                    kind = msg.get("t")
                    if kind == "ack":
                        if msg["seq"] > acked:
                            acked = msg["seq"]
                            t_last_ack = t
                            if latency:
                                ack_log.append((t, acked))
                    elif kind == "error":
                        errors[msg.get("code", "?")] += 1
                        first_error = first_error or msg.get("message")
    sock.close()
    if send_t is not None and args.latency_out:
        lat = array("d")
        prev = 0
        for t, upto in ack_log:
            for k in range(prev, upto):
                lat.append(t - send_t[k])
            prev = upto
        with open(args.latency_out, "wb") as f:
            lat.tofile(f)
    return {
        "index": args.index,
        "mix": args.mix,
        "count": args.count,
        "offered": n,
        "sent": sent,
        "acked": acked,
        "bytes": ends[sent - 1] if sent else 0,
        "eof": eof,
        "timed_out": acked < sent and not eof,
        "errors": dict(errors),
        "first_error": first_error,
        "t_go": t0,
        "t_sent_all": t_sent_all,
        "t_last_ack": t_last_ack,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line (used by ``benchmarks/run.py``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--mix", choices=sorted(MIXES), default="stats")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--window", type=int, default=4096, help="unacked events at most")
    p.add_argument("--rate", type=float, default=0.0, help="events/s for this process; 0 = max")
    p.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop offering new events after this many seconds (0: send all)",
    )
    p.add_argument("--max-seconds", type=float, default=60.0, help="hard bound on the run")
    p.add_argument("--out", required=True)
    p.add_argument("--latency-out", default=None)
    args = p.parse_args(argv)
    result = run(args)
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
