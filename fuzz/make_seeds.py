"""Write the seed corpus of ``fuzz_protocol.py``: valid frames made with ``protocol.encode``.

Each seed is one byte (``max_frame`` choice and chunking seed, see the harness) followed by a
client's byte stream. Usage: ``python fuzz/make_seeds.py [DIR]`` (default ``fuzz/seeds``).
"""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

import msgpack

from pfcollector.events import Kind
from pfcollector.protocol import Control, EventMsg, Hello, encode

HELLO = encode(Hello(1, "job-42", "afl++", 4242))
FIELDS: dict[Kind, dict[str, object]] = {
    Kind.CRASH: {
        "type": "SEGV",
        "signal": 11,
        "exit_code": 0,
        "output": "o",
        "stack_trace": "#0",
        "input": b"\x00\xffcrash",
    },
    Kind.COVERAGE: {"edges": 1500, "new_edges": 3, "exec_count": 10},
    Kind.CORPUS: {"files": ["queue/id:000001", "queue/id:000002"], "total_size": 2048},
    Kind.STATS: {
        "executions": 10**6,
        "exec_per_second": 8500.0,
        "total_edges": 10,
        "covered_edges": 5,
        "coverage_percent": 50.0,
        "unique_crashes": 1,
        "total_crashes": 2,
        "corpus_size": 3,
        "cpu_usage": 0.5,
        "memory_usage": 1024,
    },
    Kind.STARTED: {"message": "hi"},
    Kind.STOPPED: {"message": ""},
    Kind.ERROR: {"message": "boom"},
    Kind.TIMEOUT: {"message": "slow"},
}


def frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def seeds() -> list[bytes]:
    events = [
        encode(EventMsg(i + 1, kind, dict(fields), f"ev-{i}", 1_700_000_000_500_000_000, None))
        for i, (kind, fields) in enumerate(FIELDS.items())
    ]
    streams = [
        HELLO,
        HELLO + b"".join(events),
        encode(Control(1, "status", {})),
        encode(Control(2, "tune", {"batch_size": 10, "flush_interval": 0.5})),
        HELLO + events[1] + encode(Control(3, "flush", {})) + events[2],
        HELLO
        + frame(
            {
                "t": "event",
                "seq": 1,
                "kind": "coverage",
                "edges": 1,
                "id": None,
                "ts": None,
                "job_id": "other",
            }
        ),
        HELLO
        + frame({"t": "event", "seq": 5, "kind": "stats", "executions": 2**63 - 1, "cpu_usage": 1})
        + frame({"t": "event", "seq": 3, "kind": "stats"}),
        HELLO + frame({"t": "event", "seq": 1, "kind": "crash", "type": "x", "input": "str"}),
        HELLO + frame({"t": "event", "seq": 1, "kind": "bogus"}) + frame({"t": 7}),
        HELLO + frame({"t": "event", "seq": 1, "kind": "corpus", "files": [1, "a"]}),
        HELLO + HELLO,
        frame({"t": "event", "seq": 1, "kind": "coverage", "edges": 1}),
        frame({"t": "hello", "v": 2, "job_id": "j", "fuzzer": "f", "pid": 1}),
        frame([1, 2, 3]),
        frame({"t": "hello"}) + b"\x00",
        b"\x00\x00\x00\x00",
        b"\xff\xff\xff\xff",
        b"\x00\x00\x00\x03\x81\xa1t",
    ]
    # Each stream whole (0), and chunked with two seeds, under the default and a tiny max_frame.
    return [bytes([prefix]) + s for s in streams for prefix in (0, 1 | 4, 2 | 8)]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("seeds"))
    out.mkdir(parents=True, exist_ok=True)
    for data in seeds():
        (out / hashlib.sha1(data).hexdigest()).write_bytes(data)
    print(f"{len(seeds())} seeds in {out}")


if __name__ == "__main__":
    main()
