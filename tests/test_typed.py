"""The typed fast path (:mod:`pfcollector.typed`) against the Python validator it stands in for.

The rule the fast path must keep: whatever it takes, the Python validator takes too, with the
same result (seq, kind, id, timestamp, job, and every field with its value, type and order);
whatever it does not take, the Python validator decides. Hypothesis builds event maps mixing
valid values with the invalid ones that differ between checkers written in C and in Python
(bools for ints, nan and inf, int64 edges, blank strings of Unicode spaces, control
characters, lengths at the limits, nil for optional fields, unknown keys, ids with a newline).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pfclient._wire as wire
from pfcollector import eventcheck, protocol, typed
from pfcollector.events import INT64_MAX, INT64_MIN, SCHEMAS, FieldSpec, Kind
from pfcollector.protocol import EventMsg, MessageError, ServerConnection

_BLANKS = " \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u2029\u3000\u200b\ufeff"

_OTHER = st.one_of(
    st.none(), st.booleans(), st.integers(-9, 9), st.floats(), st.text(max_size=3),
    st.binary(max_size=3), st.lists(st.text(max_size=2), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(-9, 9), max_size=1),
)  # fmt: skip


def _texts(limit: int | None) -> st.SearchStrategy[str]:
    """Short texts of blanks, control and other characters, and lengths around ``limit``."""
    sizes = [0, 1, 2] + ([limit - 1, limit, limit + 1] if limit else [])
    return st.one_of(
        st.text(alphabet=_BLANKS + "aZ\x00\x7f\x9f\u00e9", max_size=4),
        st.builds(lambda n, c: c * n, st.sampled_from(sizes), st.sampled_from("a \u3000\x01")),
    )


def _value(spec: FieldSpec) -> st.SearchStrategy[Any]:
    """The field's own type, valid or just past one of its limits (edges are likelier)."""
    if spec.type is int or spec.type is float:
        low, high = spec.bounds()
        edges = [low, high, 0, 1]
        if spec.type is int:
            edges += [low - 1, high + 1] if low > INT64_MIN else [high + 1, 2**64 - 1]
            inner: st.SearchStrategy[Any] = st.integers(int(low), int(min(high, low + 99)))
        else:
            edges += [math.nan, math.inf, -math.inf, high * 1.0000001 if high < 1e300 else
                      -1e-300, -0.0]  # fmt: skip
            inner = st.one_of(st.floats(low, high), st.integers(0, 99))
        edges = [v for v in edges if not isinstance(v, int) or INT64_MIN <= v < 2**64]
        return st.one_of(st.sampled_from(edges), inner)
    if spec.type is str:
        return _texts(spec.max_len)
    if spec.type is bytes:
        return st.binary(max_size=8)
    item = st.binary(max_size=3) if spec.item is bytes else _texts(None)
    return st.lists(st.one_of(item, item, item, st.integers(0, 1), st.none()), max_size=3)


_ENVELOPE: dict[str, st.SearchStrategy[Any]] = {
    "t": st.sampled_from(["hello", "control", "Event", 1]),
    "seq": st.sampled_from([0, -1, INT64_MAX, INT64_MAX + 1, True, 1.0, None, "1"]),
    "kind": st.sampled_from(["nope", "Stats", 3, None]),
    "id": st.sampled_from(["a" * 64, "a" * 65, "", "ab\n", "a b", "\u00e9", None, 7, b"ab"]),
    "ts": st.one_of(st.floats(), st.sampled_from([-1, 0, 9.2e9, 9.3e9, 2**63, True, "1"])),
    "job_id": st.one_of(_texts(256), st.sampled_from([None, 0, b"j", "j\n", "j\x85"])),
}


@st.composite
def event_maps(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event's envelope with each field valid or just past a limit, sometimes one
    envelope key wrong, a field of another type, or a key that does not belong."""
    kind = draw(st.sampled_from(list(Kind)))
    obj: dict[str, Any] = {"t": "event", "seq": draw(st.integers(1, 9)), "kind": kind.value}
    if draw(st.booleans()):
        obj["id"] = draw(st.from_regex(r"\A[A-Za-z0-9._:-]{1,5}\Z"))
    if draw(st.booleans()):
        obj["ts"] = draw(st.one_of(st.floats(0, 9e9), st.integers(0, 9 * 10**9)))
    if draw(st.booleans()):
        obj["job_id"] = draw(st.from_regex(r"\A[a-z0-9-]{1,8}\Z"))
    for spec in draw(st.permutations(list(SCHEMAS[kind]))):  # any wire order
        if draw(st.integers(0, 19)) > (0 if spec.required else 5):
            obj[spec.name] = draw(_value(spec))
    if draw(st.integers(0, 3)) == 0:
        key = draw(st.sampled_from(list(_ENVELOPE)))
        obj[key] = draw(_ENVELOPE[key])
    if draw(st.integers(0, 5)) == 0:
        key = draw(st.sampled_from([spec.name for spec in SCHEMAS[kind]]))
        obj[key] = draw(_OTHER)
    if draw(st.integers(0, 9)) == 0:
        obj[draw(st.sampled_from(["extra", "input", "files", "message", "t2"]))] = 1
    return obj


def _slow(body: bytes, last_seq: int = 0) -> EventMsg | None:
    """The Python validator's verdict on ``body``: the event, or None if it refuses it."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, unicode_errors="replace")
    except Exception:
        return None
    if type(obj) is not dict or obj.get("t") != "event":
        return None
    try:
        return protocol.EventMsg(*eventcheck.parse_event(obj, last_seq))
    except MessageError:
        return None


def _same(fast: tuple[Any, ...], slow: EventMsg) -> None:
    seq, kind, fields, event_id, ts_ns, job_id = fast
    assert (seq, kind, event_id, ts_ns, job_id) == (
        slow.seq, slow.kind, slow.id, slow.ts_ns, slow.job_id)  # fmt: skip
    assert list(fields) == list(slow.fields)  # the same order: the spool packs the same bytes
    for name, value in fields.items():
        other = slow.fields[name]
        assert type(value) is type(other), name
        assert value == other or (math.isnan(value) and math.isnan(other)), name
    assert msgpack.packb(fields) == msgpack.packb(slow.fields)


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(event_maps())
def test_what_the_fast_path_takes_the_python_validator_takes_the_same(obj: dict[str, Any]) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    fast = typed.decode_event(body)
    slow = _slow(body)
    if fast is not None and fast[0] > 0:  # a seq not above the last is the caller's to refuse
        assert slow is not None, f"typed path took what protocol refuses: {obj!r}"
        _same(fast, slow)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(event_maps())
def test_a_connection_gives_the_same_event_or_error_as_the_python_validator(
    obj: dict[str, Any],
) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    conn = ServerConnection()
    hello = msgpack.packb({"t": "hello", "v": 1, "job_id": "j", "fuzzer": "f", "pid": 1})
    conn.receive_data(struct.pack(">I", len(hello)) + hello + struct.pack(">I", len(body)) + body)
    conn.next_message()
    slow = _slow(body)
    try:
        got = conn.next_message()
    except MessageError:
        assert slow is None
        return
    except protocol.ProtocolError:
        return  # not a map of an event at all: framing errors are the slow path's, unchanged
    if isinstance(got, EventMsg):
        assert slow is not None
        assert (got.seq, got.kind, got.id, got.ts_ns, got.job_id, list(got.fields.items())) == (
            slow.seq, slow.kind, slow.id, slow.ts_ns, slow.job_id,
            list(slow.fields.items()))  # fmt: skip


def _pairs(pairs: list[tuple[str, Any]]) -> bytes:
    """A msgpack map with these pairs in this order, repeated keys included."""
    packer = msgpack.Packer(use_bin_type=True)
    out = packer.pack_map_header(len(pairs))
    for key, value in pairs:
        out += packer.pack(key) + packer.pack(value)
    return out


_STATS = [("t", "event"), ("seq", 1), ("kind", "stats")]


@pytest.mark.parametrize(
    "pairs",
    [
        [*_STATS, ("executions", True)],
        [*_STATS, ("exec_per_second", math.nan)],
        [*_STATS, ("cpu_usage", math.inf)],
        [*_STATS, ("coverage_percent", 100.5)],
        [*_STATS, ("executions", -1)],
        [*_STATS, ("executions", 2**63)],
        [*_STATS, ("executions", 1.0)],
        [*_STATS, ("executions", None)],
        [*_STATS, ("id", "abc\n")],
        [*_STATS, ("id", "a" * 65)],
        [*_STATS, ("ts", math.nan)],
        [*_STATS, ("ts", -1)],
        [*_STATS, ("job_id", "a\x00b")],
        [*_STATS, ("job_id", "ab\n")],
        [*_STATS, ("job_id", "")],
        [*_STATS, ("bogus", 1)],
        [("t", "event"), ("seq", 1), ("kind", "crash"), ("type", " \u3000 "), ("input", b"x")],
        [("t", "event"), ("seq", 1), ("kind", "crash"), ("type", "SEGV"), ("input", "x")],
        [("t", "event"), ("seq", 1), ("kind", "crash"), ("type", "S" * 257), ("input", b"x")],
        [("t", "event"), ("seq", 1), ("kind", "crash"), ("type", "S"), ("input", b"x"),
         ("output", "o" * (64 * 1024 + 1))],  # truncated: the Python path does it
        [("t", "event"), ("seq", 1), ("kind", "corpus"), ("files", ["a"]), ("contents", None)],
        [("t", "event"), ("seq", 1), ("kind", "corpus"), ("files", ["a"]), ("contents", [])],
        [("t", "hello"), ("v", 1), ("job_id", "j"), ("fuzzer", "f"), ("pid", 1)],
    ],
    ids=lambda pairs: ",".join(f"{k}={v!r}"[:24] for k, v in pairs[2:]),
)
def test_the_fast_path_leaves_these_to_the_python_validator(pairs: list[tuple[str, Any]]) -> None:
    assert typed.decode_event(_pairs(pairs)) is None


@pytest.mark.parametrize("last", [("seq", 2), ("executions", 5), ("executions", -5)])
def test_a_repeated_key_counts_its_last_value_on_both_paths(last: tuple[str, Any]) -> None:
    body = _pairs([*_STATS, ("executions", 1), last])
    fast, slow = typed.decode_event(body), _slow(body)
    assert (fast is None) == (slow is None)
    if fast is not None and slow is not None:
        _same(fast, slow)


def test_invalid_utf8_is_left_to_the_python_validator_which_replaces_it() -> None:
    packer = msgpack.Packer(use_bin_type=True)
    body = packer.pack_map_header(5)
    for key, value in [("t", "event"), ("seq", 1), ("kind", "crash"), ("type", "SEGV"),
                       ("input", b"x")][:4]:  # fmt: skip
        body += packer.pack(key) + packer.pack(value)
    body += packer.pack("output") + b"\xa2\xff\xfe"  # a str of two bytes that are not UTF-8
    body = packer.pack_map_header(6) + body[1:] + packer.pack("input") + packer.pack(b"x")
    assert typed.decode_event(body) is None
    slow = _slow(body)
    assert slow is not None and slow.fields["output"] == "\ufffd\ufffd"


def _frame_body(frame: bytes) -> bytes:
    return frame[4:]


@pytest.mark.parametrize("kind", ["stats", "coverage", "crash", "corpus", "started"])
def test_what_the_clients_send_takes_the_fast_path(kind: str) -> None:
    """Were the fast path to refuse valid events, nothing would fail but the figures:
    pfclient's own frames of every kind must go through it."""
    fields: dict[str, Any] = {
        "stats": {"executions": 10, "exec_per_second": 2.5, "coverage_percent": 3},
        "coverage": {"edges": 10, "new_edges": 1, "exec_count": 5},
        "crash": {"type": "SEGV", "signal": 11, "input": b"\x00" * 10, "output": "o"},
        "corpus": {"files": ["a", "b"], "total_size": 2, "contents": [b"a", b"b"]},
        "started": {"message": "up"},
    }[kind]
    body = _frame_body(wire.encode_frame({"t": "event", "seq": 3, "kind": kind,
                                   "id": "0f0e-11", "ts": 1_764_500_000.5, **fields}))  # fmt: skip
    fast = typed.decode_event(body)
    assert fast is not None
    slow = _slow(body)
    assert slow is not None
    _same(fast, slow)
