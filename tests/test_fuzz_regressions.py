"""Inputs for the decoder fuzz harness (``fuzz/fuzz_protocol.py``), replayed without atheris.

Rules of this module:

* Each input goes through the harness's own ``check()``: only the protocol's errors may come
  out of :class:`pfcollector.protocol.ServerConnection`, a fatal error is sticky, a drained
  connection never holds more than ``max_frame + 4`` bytes, and an accepted event encodes and
  parses back to itself. The byte layout is the harness's (byte 0 picks ``max_frame`` and
  the chunking, the rest is the client's stream).
* Replayed: the checked-in seed corpus (``fuzz/seeds``), every minimized crash input kept in
  ``fuzz/regressions/`` (none so far), and a short hypothesis run of arbitrary bytes.
* Pure, in-process, no I/O beyond reading those files.
"""

from __future__ import annotations

import importlib.util
import struct
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"


def _load_check() -> Callable[[bytes], None]:
    spec = importlib.util.spec_from_file_location("pf_fuzz_protocol", FUZZ / "fuzz_protocol.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    check: Callable[[bytes], None] = module.check
    return check


check = _load_check()


def _frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


HELLO = _frame({"t": "hello", "v": 1, "job_id": "j", "fuzzer": "f", "pid": 1})

#: Hand-made edge cases next to the fuzzer's finds (name -> harness input).
CASES = {
    "oversize_length_tiny_max_frame": b"\x01" + b"\x00\x00\x01\x00" + b"\x80" * 300,
    "length_at_max_frame_then_eof": b"\x01" + struct.pack(">I", 64) + b"\x80" * 63,
    "zero_length": b"\x00\x00\x00\x00\x00",
    "event_before_hello": b"\x00" + _frame({"t": "event", "seq": 1, "kind": "stats"}),
    "ext_type_field": b"\x00"
    + HELLO
    + _frame({"t": "event", "seq": 1, "kind": "coverage", "edges": msgpack.ExtType(5, b"x")}),
    "timestamp_ext_ts": b"\x00"
    + HELLO
    + _frame({"t": "event", "seq": 1, "kind": "stats", "ts": msgpack.Timestamp(1, 0)}),
    "bin_map_key": b"\x00" + HELLO + _frame({b"t": "event"}),
    "uint64_seq": b"\x00" + HELLO + _frame({"t": "event", "seq": 2**64 - 1, "kind": "stats"}),
    "huge_float_for_int": b"\x00"
    + HELLO
    + _frame({"t": "event", "seq": 1, "kind": "stats", "executions": 1e300}),
    "nan_ts": b"\x00"
    + HELLO
    + _frame({"t": "event", "seq": 1, "kind": "stats", "ts": float("nan")}),
    "deep_nesting": b"\x00" + HELLO + struct.pack(">I", 3000) + b"\x91" * 2999 + b"\xc0",
    "trailing_bytes": b"\x00" + struct.pack(">I", 2) + b"\x80\x80",
    "control_bin_arg_key": b"\x00"
    + _frame({"t": "control", "req": 1, "op": "x", "args": {b"k": 1}}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_edge_case(name: str) -> None:
    check(CASES[name])


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*") if p.is_file()) if directory.is_dir() else []


@pytest.mark.parametrize("path", _files(FUZZ / "seeds"), ids=lambda p: p.name[:12])
def test_seed(path: Path) -> None:
    check(path.read_bytes())


def test_regressions_found_by_the_fuzzer() -> None:
    for path in _files(FUZZ / "regressions"):
        check(path.read_bytes())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.lists(st.sampled_from(sorted(CASES)), max_size=4))
def test_spliced_cases(prefix: int, names: list[str]) -> None:
    check(bytes([prefix]) + b"".join(CASES[n][1:] for n in names))
