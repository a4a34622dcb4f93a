"""Would a typed decoder lift ingest past the decode baseline? msgspec's MessagePack decoder
with a ``Struct`` type (decode and validate in C) beside ``msgpack.unpackb`` (decode only) and
the daemon's own sans-I/O parser (``ServerConnection``: framing, decode, validation), on the
same stats frames (issue 13, item 4's background). One process, no daemon, no I/O.

``python benchmarks/typed_decode.py [--quick]``. msgspec is a dependency since the daemon
decodes events this way first (``pfcollector.typed``), so "daemon parser" is that fast path
with its framing; the skip without msgspec stays for running this file against an older tree.
"""

import argparse
import json
import struct
import time
import uuid
from typing import Annotated, Any, Literal

import msgpack

from pfcollector.protocol import ServerConnection

try:
    import msgspec
except ImportError:  # the figure is skipped
    msgspec = None

__all__ = ["bench_typed_decode", "stats_frames"]

_HEADER = struct.Struct(">I")


def stats_frames(n: int) -> list[bytes]:
    """``n`` stats event frames (header + body) as pfclient sends them: envelope with ``ts``
    and ``job_id``, and the stats fields a fuzzer reports every second or so."""
    out = []
    for i in range(n):
        body = {"t": "event", "seq": i + 1, "kind": "stats", "id": str(uuid.uuid4()),
                "ts": 1_764_500_000.0 + i, "job_id": "job-0",
                "executions": 1_000_000 + i * 977, "exec_per_second": 8_500.25,
                "total_edges": 65_536, "covered_edges": 5_120 + i % 100,
                "corpus_size": 1_000 + i % 50, "unique_crashes": 2}  # fmt: skip
        packed = msgpack.packb(body, use_bin_type=True)
        out.append(_HEADER.pack(len(packed)) + packed)
    return out


if msgspec is not None:
    # (no ``from __future__ import annotations`` in this module: msgspec reads these types)
    _I64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
    _COUNT = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    _ID = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern="^[A-Za-z0-9._:-]+$")]

    class Stats(msgspec.Struct, forbid_unknown_fields=True):
        """The stats event, typed: decoding it validates every field (in C)."""

        t: Literal["event"]
        seq: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
        kind: Literal["stats"]
        id: _ID
        ts: float | None = None
        job_id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)] | None = None
        executions: _COUNT = 0
        exec_per_second: float = 0.0
        total_edges: _COUNT = 0
        covered_edges: _COUNT = 0
        coverage_percent: float = 0.0
        unique_crashes: _COUNT = 0
        total_crashes: _COUNT = 0
        corpus_size: _COUNT = 0
        cpu_usage: float = 0.0
        memory_usage: _I64 = 0


def _best(fn: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_typed_decode(quick: bool) -> dict[str, Any]:
    """Frames/s of each decoder (best of a few repeats)."""
    if msgspec is None:
        return {"skipped": "msgspec is not installed (pip install msgspec)"}
    n = 20_000 if quick else 200_000
    repeat = 3 if quick else 5
    frames = stats_frames(n)
    bodies = [f[4:] for f in frames]
    stream = b"".join(frames)
    unpackb = msgpack.unpackb
    decoder = msgspec.msgpack.Decoder(Stats)
    decode = decoder.decode
    assert decode(bodies[0]).executions == 1_000_000

    def run_unpackb() -> None:
        for b in bodies:
            unpackb(b, raw=False)

    def run_msgspec() -> None:
        for b in bodies:
            decode(b)

    hello = msgpack.packb({"t": "hello", "v": 1, "job_id": "job-0", "fuzzer": "bench",
                           "pid": 1}, use_bin_type=True)  # fmt: skip

    def connection() -> ServerConnection:
        """A connection past its hello, with every frame buffered."""
        conn = ServerConnection()
        conn.receive_data(_HEADER.pack(len(hello)) + hello)
        conn.next_message()
        conn.receive_data(stream)
        return conn

    def run_daemon() -> None:
        conn, got = connection(), 0
        while conn.next_message() is not None:
            got += 1
        assert got == n, got

    def run_daemon_runs() -> None:
        from pfcollector.reader import RUN_DECODER

        conn, got = connection(), 0
        while run := conn.next_run(RUN_DECODER, 1 << 16):
            got += len(run)
        assert got == n, got

    t_unpackb = _best(run_unpackb, repeat)
    t_msgspec = _best(run_msgspec, repeat)
    t_daemon = _best(run_daemon, repeat)
    runs: dict[str, Any] = {}
    if hasattr(ServerConnection, "next_run"):  # not in trees before round 7 (--src)
        t_runs = _best(run_daemon_runs, repeat)
        runs = {
            "daemon_runs_per_s": round(n / t_runs),
            "daemon_runs_ratio": round(t_unpackb / t_runs, 2),
        }
    return {
        "frames": n,
        "frame_bytes": round(len(stream) / n, 1),
        "msgspec_version": msgspec.__version__,
        "unpackb_per_s": round(n / t_unpackb),
        "msgspec_per_s": round(n / t_msgspec),
        "daemon_parser_per_s": round(n / t_daemon),
        "ratio": round(t_unpackb / t_msgspec, 2),
        "daemon_parser_ratio": round(t_unpackb / t_daemon, 2),
        **runs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    print(json.dumps(bench_typed_decode(p.parse_args().quick), indent=2))


if __name__ == "__main__":
    main()
