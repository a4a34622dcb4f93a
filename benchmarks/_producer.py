"""One fuzzer-like producer process: ``pfclient.Client.crash()`` in a loop, each call waiting
for its durable ack, as a harness reports a crash.

Run by the benchmarks (``e2e.py``, ``crash_latency.py``), never by hand (``--help`` works).
Inputs and texts are made before the clock starts (every input distinct, so content-addressed
storage cannot dedupe the benchmark away). The process connects, prints ``ready``, waits for
``go`` on stdin, then calls ``crash()`` until ``--count`` crashes or ``--duration`` seconds,
optionally paced to ``--rate`` per second. The result (counts, times on the shared
``time.monotonic`` clock) goes to ``--out`` as JSON; with ``--latency-out``, every call's
round trip as an ``array('d')`` of seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from array import array
from pathlib import Path

from pfclient import Client

__all__ = ["main", "text_of"]

#: Distinct-per-crash stack frames (a 64 KiB trace is these, repeated with varying numbers).
_FRAME = "#{n} 0x{addr:012x} in handler_{k} src/module_{k}.c:{line}\n"


def text_of(size: int, seed: int) -> str:
    """``size`` characters of a plausible, not sanitizer-shaped, stack trace."""
    if size <= 0:
        return ""
    rnd = random.Random(seed)
    parts: list[str] = []
    total = n = 0
    while total < size:
        line = _FRAME.format(n=n, addr=rnd.getrandbits(40), k=rnd.randrange(1000),
                             line=rnd.randrange(5000))  # fmt: skip
        parts.append(line)
        total += len(line)
        n += 1
    return "".join(parts)[:size]


def main(argv: list[str] | None = None) -> int:
    """Command line (used by the benchmarks)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True)
    p.add_argument("--job", default="bench-job")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--count", type=int, required=True, help="crashes at most")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many s (0: off)")
    p.add_argument("--rate", type=float, default=0.0, help="crashes/s (0: back to back)")
    p.add_argument("--input-bytes", type=int, default=1024)
    p.add_argument("--trace-bytes", type=int, default=64)
    p.add_argument("--output-bytes", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--latency-out", default=None)
    args = p.parse_args(argv)
    inputs = [os.urandom(args.input_bytes) for _ in range(args.count)]
    # A few distinct texts, cycled: building 64 KiB strings per crash would cost more than
    # the crash. Each crash still differs by its input (and id).
    texts = [(text_of(args.trace_bytes, args.index * 7 + i),
              text_of(args.output_bytes, args.index * 7 + i + 3)) for i in range(4)]  # fmt: skip
    lat = array("d")
    with Client(args.socket, job_id=args.job, fuzzer="bench", timeout=120.0) as client:
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 2
        t0 = time.monotonic()
        cpu0 = time.process_time()
        stop_at = t0 + args.duration if args.duration > 0 else float("inf")
        sent = 0
        t_last = t0
        for i, data in enumerate(inputs):
            if args.rate > 0:
                due = t0 + i / args.rate
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
            start = time.monotonic()
            if start >= stop_at:
                break
            trace, output = texts[i % len(texts)]
            client.crash("SEGV", data, signal=11, stack_trace=trace, output=output)
            t_last = time.monotonic()
            lat.append(t_last - start)
            sent += 1
        cpu = time.process_time() - cpu0
    result = {"index": args.index, "sent": sent, "t_go": t0, "t_last_ack": t_last, "cpu_s": cpu}
    Path(args.out).write_text(json.dumps(result))
    if args.latency_out:
        with open(args.latency_out, "wb") as f:
            lat.tofile(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
