"""The input journal's churn under SQLite's ``secure_delete`` modes:
``python benchmarks/journal_churn.py [--rounds N] [--size BYTES]``.

The group commit journals each new crash input as a blob in the spool and the input writer
deletes it once its file is durable; delivered rows are deleted too. Debian's SQLite is built
with ``secure_delete`` on, which overwrites every deleted byte with zeros: a second write of
everything the spool forgets. This writes and deletes ``rounds`` x 50 blobs of ``size`` bytes
with the spool's settings (WAL, ``synchronous=FULL``) under ON, FAST (the spool's choice) and
OFF, and prints the bytes the process wrote (``/proc/self/io``) and the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path

PER_ROUND = 50


def _written() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("write_bytes")).split()[1])


def churn(path: Path, mode: str, rounds: int, size: int) -> dict[str, float]:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(f"PRAGMA secure_delete={mode}")
        db.execute("CREATE TABLE p (sha TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID")
        blob = os.urandom(size)
        start, written = time.perf_counter(), _written()
        for r in range(rounds):
            keys = [f"{r}-{i}" for i in range(PER_ROUND)]
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO p VALUES (?, ?)", [(k, blob) for k in keys])
            db.execute("COMMIT")
            db.execute("BEGIN IMMEDIATE")
            db.executemany("DELETE FROM p WHERE sha = ?", [(k,) for k in keys])
            db.execute("COMMIT")
        return {
            "journalled_mib": round(rounds * PER_ROUND * size / 2**20, 1),
            "written_mib": round((_written() - written) / 2**20, 1),
            "seconds": round(time.perf_counter() - start, 3),
        }
    finally:
        db.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--size", type=int, default=64 * 1024)
    args = p.parse_args(argv)
    out = {}
    with tempfile.TemporaryDirectory(prefix="pfchurn-") as tmp:
        for mode in ("ON", "FAST", "OFF"):
            out[mode] = churn(Path(tmp) / f"{mode}.db", mode, args.rounds, args.size)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
