"""What one fuzzer feels: ``pfclient.crash()`` latency (send to durable ack) below saturation.

``run.py`` measures the daemon saturated by 8 producers, where latency is mostly queueing.
This measures one producer reporting crashes with 1 KiB inputs at a few fixed rates, each
call waiting for its durable ack, against a local-mode daemon started here::

    python benchmarks/crash_latency.py [--rates 50,200,1000] [--count 600]

Bounded: ``count`` crashes per rate, one daemon, killed in ``finally``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pfclient import Client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="50,200,1000", help="crashes/s, comma-separated")
    parser.add_argument("--count", type=int, default=600, help="crashes per rate")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pflat") as tmp:
        sock = Path(tmp) / "pf.sock"
        cmd = [sys.executable, "-m", "pfcollector", "serve", "--socket", str(sock),
               "--data-dir", str(Path(tmp) / "data"), "--log-level", "warning"]  # fmt: skip
        daemon = subprocess.Popen(cmd)
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit("the daemon did not start")
                time.sleep(0.05)
            print(f"{'offered':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
            with Client(str(sock), job_id="latency", fuzzer="bench") as client:
                for rate in (float(r) for r in args.rates.split(",")):
                    latencies = []
                    for _ in range(args.count):
                        start = time.perf_counter()
                        client.crash("SEGV", os.urandom(1024), signal=11)
                        latencies.append((time.perf_counter() - start) * 1000)
                        time.sleep(max(0.0, 1 / rate - latencies[-1] / 1000))
                    latencies.sort()
                    p50 = latencies[len(latencies) // 2]
                    p99 = latencies[int(len(latencies) * 0.99)]
                    print(f"{rate:>8.0f}/s {p50:>8.2f} {p99:>8.2f} {latencies[-1]:>8.1f}")
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)


if __name__ == "__main__":
    main()
