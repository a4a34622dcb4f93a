"""Crashes in, bugs out: how many crashes reach the master, and what parsing a report costs.

    python benchmarks/bug_buckets.py [--crashes 2000] [--bugs 8] [--jobs 2] [--quick]

1. **Parser cost**: ``report.parse`` over every real report in ``tests/data/reports/`` (the
   output of the C targets in ``tests/targets/``), microseconds per report, and over a hostile
   1 MiB text of long lines.
2. **Buckets end to end**: a daemon (``crash_dedupe = bug``, then ``input`` for comparison)
   delivering to the reference master, both started here. One producer per job sends N
   crashes with distinct random inputs whose reports are K real reports with their run-to-run
   noise varied (addresses, pids, offsets): the master should hold K crashes per job in ``bug``
   mode and N per job in ``input`` mode; every crash is counted (hits).

Bounded: one daemon and one master at a time, stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _harness as h

from pfclient import Client
from pfcollector.report import parse

REPORTS = Path(__file__).resolve().parent.parent / "tests" / "data" / "reports"
_HEX = re.compile(r"0x[0-9a-f]{6,16}")
_PID = re.compile(r"==\d+==")


def fixtures() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(REPORTS.glob("*.txt"))}


def parser_cost(reports: dict[str, str], rounds: int) -> dict[str, Any]:
    per: dict[str, float] = {}
    for name, text in reports.items():
        start = time.perf_counter()
        for _ in range(rounds):
            parse(text)
        per[name] = (time.perf_counter() - start) / rounds * 1e6
    hostile = "\n".join(["#0 a" + " " * 2000 + "b)", "x" * 2000 + " runtime error: "] * 260)
    start = time.perf_counter()
    parse(hostile, hostile)
    hostile_us = (time.perf_counter() - start) * 1e6
    worst = max(per, key=per.__getitem__)
    return {
        "mean_us": sum(per.values()) / len(per),
        "max_us": per[worst],
        "max_report": worst,
        "max_size": len(reports[worst]),
        "per_report_us": {k: round(v, 1) for k, v in per.items()},
        "hostile_2x1MiB_us": round(hostile_us, 1),
    }


def noisy(text: str, rng: random.Random) -> str:
    """The same report as another run would print it: other addresses, pid."""
    text = _HEX.sub(lambda m: f"0x{rng.getrandbits(44):012x}", text)
    return _PID.sub(f"=={rng.randint(100, 99999)}==", text)


def buckets(mode: str, reports: list[str], crashes: int, jobs: int, root: Path) -> dict[str, Any]:
    master_proc, url = h.start_master(root / f"master-{mode}")
    daemon = None
    try:
        daemon = h.start_daemon(root, f"daemon-{mode}", ["--master", url, "--bot-id", "bench",
                                                           "--crash-dedupe", mode,
                                                           "--flush-interval", "0.2"])  # fmt: skip
        rng = random.Random(7)
        sent = 0
        start = time.perf_counter()
        for j in range(jobs):
            with Client(str(daemon.socket_path), job_id=f"job-{j}", fuzzer="bench") as client:
                for i in range(crashes // jobs):
                    report = noisy(reports[i % len(reports)], rng)
                    client.crash("SIGABRT", os.urandom(64), signal=6, output=report)
                    sent += 1
        took = time.perf_counter() - start
        deadline = time.monotonic() + 120
        while daemon.status()["spool"]["kinds"]["crash"]["spooled"]:
            if time.monotonic() > deadline:
                raise h.BenchError("crashes were not delivered within 120 s")
            time.sleep(0.2)
        status = daemon.status()
    finally:
        if daemon is not None:
            daemon.stop()
        h.stop_proc(master_proc)
    db = sqlite3.connect(root / f"master-{mode}" / "master.db")
    try:
        per_job = dict(db.execute("SELECT job_id, COUNT(*) FROM crashes GROUP BY job_id"))
        types = sorted({t for (t,) in db.execute("SELECT type FROM crashes")})
    finally:
        db.close()
    kinds = status["spool"]["kinds"]["crash"]
    return {
        "sent": sent,
        "at_master_per_job": per_job,
        "deduped": kinds["deduped"],
        "types_at_master": types,
        "crashes_per_s_one_producer": round(sent / took, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crashes", type=int, default=2000, help="N: crashes sent in all")
    parser.add_argument("--bugs", type=int, default=8, help="K: distinct bugs (<= fixtures)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=200, help="parses per report")
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.crashes, args.rounds = 200, 20
    reports = fixtures()
    cost = parser_cost(reports, args.rounds)
    print(f"parser: mean {cost['mean_us']:.0f} us/report, max {cost['max_us']:.0f} us "
          f"({cost['max_report']}, {cost['max_size']} chars); "
          f"hostile 2 x 1 MiB: {cost['hostile_2x1MiB_us'] / 1000:.1f} ms")  # fmt: skip
    # K distinct bugs: fixtures with distinct signatures.
    by_signature: dict[str, str] = {}
    for text in reports.values():
        signature = parse(text).signature
        if signature is not None:
            by_signature.setdefault(signature, text)
    chosen = list(by_signature.values())[: args.bugs]
    out: dict[str, Any] = {"parser": cost, "bugs": len(chosen), "crashes": args.crashes}
    with tempfile.TemporaryDirectory(prefix="pfbugs") as tmp:
        for mode in ("bug", "input"):
            result = buckets(mode, chosen, args.crashes, args.jobs, Path(tmp))
            out[mode] = result
            print(f"crash_dedupe={mode}: {result['sent']} crashes of {len(chosen)} bugs in "
                  f"{args.jobs} jobs -> at the master per job {result['at_master_per_job']}, "
                  f"{result['deduped']} counted as hits; one producer "
                  f"{result['crashes_per_s_one_producer']} crashes/s")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    if out["bug"]["at_master_per_job"] != {f"job-{j}": len(chosen) for j in range(args.jobs)}:
        raise SystemExit("bug mode: the master did not get exactly K crashes per job")


if __name__ == "__main__":
    main()
