"""Tests for :mod:`pfcollector.protocol`, the sans-I/O wire protocol.

Rules for this module:

* No sockets, no trio, no sleeps: bytes go in through ``ServerConnection.receive_data`` and
  messages come out of ``next_message``; frames are built with ``encode`` or, for malformed
  input, with ``msgpack.packb`` directly (``raw_frame``).
* Every validation error is checked for its code, its field, its seq and that its message names
  them; fatal errors are checked to be sticky, non-fatal ones to leave the connection usable.
* Property tests (hypothesis) prove that garbage gives messages or a ``ProtocolError``, never
  any other exception.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfcollector import protocol
from pfcollector.events import FILE_NAME_MAX, SCHEMAS, SIGNAL_MAX, Kind
from pfcollector.protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    Ack,
    Control,
    ErrorMsg,
    EventMsg,
    FrameError,
    Hello,
    MessageError,
    ProtocolError,
    Reply,
    ServerConnection,
    SessionError,
    Welcome,
    encode,
    parse_server_message,
)

HELLO = Hello(PROTOCOL_VERSION, "job-1", "afl++", 4242)


def raw_frame(obj: Any) -> bytes:
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def connected(max_frame: int = DEFAULT_MAX_FRAME) -> ServerConnection:
    """A connection that has already received the hello."""
    conn = ServerConnection(max_frame)
    conn.receive_data(encode(HELLO))
    assert conn.next_message() == HELLO
    return conn


def feed(conn: ServerConnection, data: bytes) -> Any:
    conn.receive_data(data)
    return conn.next_message()


def event(kind: Any = "coverage", seq: Any = 1, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"t": "event", "seq": seq, "kind": kind}
    if kind == "coverage" and "edges" not in fields:
        base["edges"] = 10
    if kind == "crash":
        base.update({"type": "SEGV", "input": b"\x00\x01"})
    if kind == "corpus":
        base["files"] = ["a"]
    return {**base, **fields}


def test_exported_names() -> None:
    for name in protocol.__all__:
        assert hasattr(protocol, name), name
    assert "trio" not in protocol.__dict__
    for error in (FrameError, MessageError, SessionError):
        assert issubclass(error, ProtocolError)
    assert (FrameError.fatal, MessageError.fatal, SessionError.fatal) == (True, False, True)


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind))
def test_event_round_trip_fills_defaults(kind: Kind) -> None:
    table: dict[Kind, dict[str, Any]] = {
        Kind.CRASH: {"type": "SEGV", "input": b"\xff" * 3},
        Kind.COVERAGE: {"edges": 7},
        Kind.CORPUS: {"files": ["id:000001"]},
    }
    required = table.get(kind, {})
    msg = EventMsg(5, kind, dict(required), "ev-1", 1_700_000_000_500_000_000, "job-2")
    got = feed(connected(), encode(msg))
    expected = {spec.name: spec.default for spec in SCHEMAS[kind]} | required
    assert got == EventMsg(5, kind, expected, "ev-1", 1_700_000_000_500_000_000, "job-2")


def test_client_messages_round_trip() -> None:
    conn = ServerConnection()
    control = Control(3, "status", {"verbose": True})
    assert feed(conn, encode(control)) == control
    assert feed(conn, encode(HELLO)) == HELLO
    assert conn.hello == HELLO
    stats = EventMsg(1, Kind.STATS, {"executions": 5, "exec_per_second": 2.5})
    got = feed(conn, encode(stats))
    assert got.fields["executions"] == 5
    assert got.fields["cpu_usage"] == 0.0
    assert (got.id, got.ts_ns, got.job_id) == (None, None, None)


@pytest.mark.parametrize(
    "msg",
    [
        Welcome(1, "pfcollector 0.1.0", DEFAULT_MAX_FRAME),
        Ack(17),
        ErrorMsg("too_long", "crash event seq 3: field 'type' is too long", 3, "type", False),
        ErrorMsg("no_hello", "event before hello", fatal=True),
        Reply(9, True, {"queued": {"crash": 1}}),
        Reply(10, False, None, "unknown op 'x'"),
    ],
)
def test_server_messages_round_trip(msg: Any) -> None:
    frame = encode(msg)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert parse_server_message(msgpack.unpackb(frame[4:], raw=False)) == msg


def test_parse_server_message_refuses_garbage() -> None:
    with pytest.raises(MessageError) as info:
        parse_server_message({"t": "ack", "seq": "x"})
    assert info.value.code == "wrong_type"
    with pytest.raises(MessageError, match="unknown") as info:
        parse_server_message({"t": "hello"})
    assert info.value.code == "unknown_message"
    assert parse_server_message({"t": "ack", "seq": 1, "future": 1}) == Ack(1)


def test_int_ts_and_float_fields_widened() -> None:
    got = feed(connected(), raw_frame(event("stats", ts=1_700_000_000, cpu_usage=3)))
    assert got.ts_ns == 1_700_000_000 * 10**9
    assert got.fields["cpu_usage"] == 3.0
    assert type(got.fields["cpu_usage"]) is float


def test_truncating_fields_are_cut_not_refused() -> None:
    limit = next(s.max_len for s in SCHEMAS[Kind.CRASH] if s.name == "output")
    assert limit is not None
    got = feed(connected(), raw_frame(event("crash", output="x" * (limit + 10))))
    assert got.fields["output"] == "x" * limit


# -- validation errors ------------------------------------------------------------------------

INVALID: list[tuple[dict[str, Any], str, str | None, str]] = [
    (event("crash", signal=11.0), "wrong_type", "signal", "must be an integer, got float 11.0"),
    (event("crash", signal=True), "wrong_type", "signal", "got bool True"),
    (event("coverage", edges=2**63), "out_of_range", "edges", "int64"),
    (event("coverage", edges=2**64 - 1), "out_of_range", "edges", "int64"),
    (event("stats", cpu_usage=math.inf), "out_of_range", "cpu_usage", "finite"),
    (event("stats", cpu_usage=math.nan), "out_of_range", "cpu_usage", "finite"),
    (event("stats", cpu_usage="1"), "wrong_type", "cpu_usage", "must be a number"),
    # values that make no sense (issue 12): an empty crash type reached the master once
    (event("crash", type=""), "out_of_range", "type", "must not be empty"),
    (event("crash", type="  "), "out_of_range", "type", "must not be empty"),
    (event("crash", signal=999), "out_of_range", "signal", f"must be 0..{SIGNAL_MAX}, got 999"),
    (event("crash", signal=-1), "out_of_range", "signal", "got -1"),
    (event("stats", executions=-5), "out_of_range", "executions", "must be >= 0, got -5"),
    (event("stats", exec_per_second=-0.5), "out_of_range", "exec_per_second", ">= 0"),
    (event("stats", coverage_percent=100.5), "out_of_range", "coverage_percent", "0..100"),
    (event("coverage", edges=-1), "out_of_range", "edges", ">= 0"),
    (event("corpus", total_size=-1), "out_of_range", "total_size", ">= 0"),
    (event("crash", type="x" * 257), "too_long", "type", "257 characters, limit 256"),
    (event("crash", type=b"SEGV"), "wrong_type", "type", "must be a string, got bin"),
    (event("crash", input="text"), "wrong_type", "input", "binary"),
    (event("crash", input=b"\0" * (10 * 1024 * 1024 + 1)), "too_long", "input", "bytes"),
    (event("corpus", files="a"), "wrong_type", "files", "array"),
    (event("corpus", files=["a", 1]), "wrong_type", "files", "item 1"),
    (event("corpus", files=["a"] * 1025), "too_long", "files", "1025 items"),
    (event("corpus", files=["x" * (FILE_NAME_MAX + 1)]), "too_long", "files", "item 0"),
    (event("stats", bogus=1), "unknown_field", "bogus", "'bogus'"),
    ({"t": "event", "seq": 1, "kind": "crash", "input": b""}, "missing_field", "type", "required"),
    ({"t": "event", "seq": 1, "kind": "coverage"}, "missing_field", "edges", "required"),
    ({"t": "event", "seq": 1}, "missing_field", "kind", "required"),
    (event("bogus"), "unknown_kind", "kind", "'bogus'"),
    (event(kind=7), "unknown_kind", "kind", "int 7"),
    (event(id=""), "bad_id", "id", "got str ''"),
    (event(id="a/b"), "bad_id", "id", "A-Za-z0-9"),
    (event(id="a" * 65), "bad_id", "id", "1..64"),
    (event(id=5), "bad_id", "id", "int 5"),
    (event(ts="now"), "wrong_type", "ts", "must be a number"),
    (event(ts=-1), "out_of_range", "ts", "epoch"),
    (event(ts=math.inf), "out_of_range", "ts", "epoch"),
    (event(ts=msgpack.Timestamp(1, 0)), "wrong_type", "ts", "ext"),
    (event(edges=msgpack.ExtType(3, b"x")), "wrong_type", "edges", "ext"),
    (event(job_id=""), "out_of_range", "job_id", "non-empty"),
    (event(job_id="a\nb"), "out_of_range", "job_id", "control characters"),
    (event(job_id="j" * 257), "too_long", "job_id", "limit 256"),
]


@pytest.mark.parametrize(("obj", "code", "field", "text"), INVALID)
def test_invalid_event(obj: dict[str, Any], code: str, field: str | None, text: str) -> None:
    conn = connected()
    conn.receive_data(raw_frame(obj))
    with pytest.raises(MessageError) as info:
        conn.next_message()
    err = info.value
    assert (err.code, err.field, err.seq, err.fatal) == (code, field, 1, False)
    assert text in err.message
    assert "seq 1" in err.message
    if field is not None:
        assert f"'{field}'" in err.message or field == "kind"
    assert err.to_message() == ErrorMsg(code, err.message, 1, field, False)
    # not fatal: the bad frame is consumed and the next event (seq 2) goes through
    assert feed(conn, raw_frame(event(seq=2))).seq == 2


def test_error_message_names_kind_seq_and_field() -> None:
    conn = connected()
    conn.receive_data(raw_frame(event("crash", seq=7, signal=11.0)))
    with pytest.raises(MessageError) as info:
        conn.next_message()
    expected = "crash event seq 7: field 'signal' must be an integer, got float 11.0"
    assert info.value.message == expected
    assert info.value.kind == "crash"


@pytest.mark.parametrize(
    ("obj", "code", "field"),
    [
        (event(seq="1"), "wrong_type", "seq"),
        (event(seq=0), "seq_not_increasing", "seq"),
        ({"t": "event", "kind": "stats"}, "missing_field", "seq"),
        ({"t": "ack", "seq": 1}, "unknown_message", "t"),
        ({"t": 1}, "unknown_message", "t"),
        ({"seq": 1}, "unknown_message", "t"),
        ({"t": "control", "req": 1}, "missing_field", "op"),
        ({"t": "control", "req": 1, "op": "x", "args": [1]}, "wrong_type", "args"),
        ({"t": "control", "req": 1, "op": "x", "more": 1}, "unknown_field", "more"),
    ],
)
def test_invalid_message_without_seq(obj: dict[str, Any], code: str, field: str) -> None:
    conn = connected()
    conn.receive_data(raw_frame(obj))
    with pytest.raises(MessageError) as info:
        conn.next_message()
    assert (info.value.code, info.value.field, info.value.seq) == (code, field, None)
    assert field in info.value.message


def test_invalid_hello_fields() -> None:
    for obj, code, field in [
        ({"t": "hello", "v": 1, "job_id": "", "fuzzer": "f", "pid": 1}, "out_of_range", "job_id"),
        ({"t": "hello", "v": 1, "job_id": "j", "fuzzer": "f"}, "missing_field", "pid"),
        ({"t": "hello", "v": 1, "job_id": "j", "fuzzer": "f\x7f", "pid": 1}, "out_of_range",
         "fuzzer"),
        ({"t": "hello", "v": 1, "job_id": "j", "fuzzer": "f", "pid": -1}, "out_of_range", "pid"),
        ({"t": "hello", "v": "1", "job_id": "j", "fuzzer": "f", "pid": 1}, "wrong_type", "v"),
        ({"t": "hello", "v": 1, "job_id": "j", "fuzzer": "f", "pid": 1, "x": 0}, "unknown_field",
         "x"),
    ]:  # fmt: skip
        conn = ServerConnection()
        conn.receive_data(raw_frame(obj))
        with pytest.raises(MessageError) as info:
            conn.next_message()
        assert (info.value.code, info.value.field) == (code, field)
        assert conn.hello is None


def test_seq_rules() -> None:
    conn = connected()
    assert feed(conn, raw_frame(event(seq=3))).seq == 3
    assert feed(conn, raw_frame(event(seq=10))).seq == 10  # gaps are fine
    assert conn.last_seq == 10
    conn.receive_data(raw_frame(event(seq=10)))
    with pytest.raises(MessageError, match="seq 10 is not above the previous seq 10") as info:
        conn.next_message()
    assert info.value.code == "seq_not_increasing"
    conn.receive_data(raw_frame(event(seq=11, edges="x")))
    with pytest.raises(MessageError):
        conn.next_message()
    assert conn.last_seq == 11  # a refused event still uses its seq; the next ack covers it


# -- session errors ---------------------------------------------------------------------------


def test_event_before_hello_is_fatal_and_sticky() -> None:
    conn = ServerConnection()
    conn.receive_data(raw_frame(event()))
    for _ in range(2):
        with pytest.raises(SessionError) as info:
            conn.next_message()
        assert (info.value.code, info.value.fatal) == ("no_hello", True)
    conn.receive_data(encode(HELLO))  # ignored once failed
    with pytest.raises(SessionError):
        conn.next_message()


def test_hello_twice() -> None:
    conn = connected()
    conn.receive_data(encode(HELLO))
    with pytest.raises(SessionError) as info:
        conn.next_message()
    assert info.value.code == "hello_twice"


def test_unsupported_version_lists_supported() -> None:
    conn = ServerConnection()
    conn.receive_data(encode(Hello(2, "j", "f", 1)))
    with pytest.raises(SessionError) as info:
        conn.next_message()
    assert info.value.code == "unsupported_version"
    assert "version 2" in info.value.message
    assert "speaks 1" in info.value.message
    assert info.value.to_message().fatal is True


def test_control_before_hello() -> None:
    conn = ServerConnection()
    assert feed(conn, raw_frame({"t": "control", "req": 1, "op": "status"})) == Control(
        1, "status", {}
    )
    assert feed(conn, raw_frame({"t": "control", "req": 2, "op": "x", "args": None})).args == {}


# -- framing ----------------------------------------------------------------------------------


def test_split_at_every_byte_boundary() -> None:
    messages: list[protocol.ClientMessage] = [
        HELLO,
        EventMsg(1, Kind.CRASH, {"type": "SEGV", "input": b"\x00" * 50}),
        Control(1, "status", {}),
        EventMsg(2, Kind.COVERAGE, {"edges": 1}),
    ]
    data = b"".join(encode(m) for m in messages)
    for cut in range(len(data) + 1):
        conn = ServerConnection()
        got = []
        for part in (data[:cut], data[cut:]):
            if not part:
                continue  # b"" would mean EOF
            conn.receive_data(part)
            while (msg := conn.next_message()) is not None:
                got.append(msg)
        assert [type(m) for m in got] == [type(m) for m in messages]
        assert conn.pending_bytes == 0


def test_byte_at_a_time() -> None:
    data = encode(HELLO) + encode(EventMsg(1, Kind.STATS, {}))
    conn = ServerConnection()
    got = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        if (msg := conn.next_message()) is not None:
            got.append(msg)
        else:
            assert conn.pending_bytes > 0
    assert len(got) == 2


def test_oversize_frame_rejected_before_body() -> None:
    conn = ServerConnection(max_frame=100)
    conn.receive_data(struct.pack(">I", 101))  # the header alone is enough
    with pytest.raises(FrameError) as info:
        conn.next_message()
    assert (info.value.code, info.value.fatal) == ("frame_too_large", True)
    assert "101" in info.value.message
    conn.receive_data(b"x" * 1000)
    assert conn.pending_bytes == 0  # nothing more is buffered after a fatal error
    with pytest.raises(FrameError):
        conn.next_message()


def test_frame_of_exactly_max_frame_is_accepted() -> None:
    body = msgpack.packb({"t": "control", "req": 1, "op": "o" * 40})
    conn = ServerConnection(max_frame=len(body))
    assert feed(conn, struct.pack(">I", len(body)) + body) == Control(1, "o" * 40, {})
    conn = ServerConnection(max_frame=len(body) - 1)
    conn.receive_data(struct.pack(">I", len(body)))
    with pytest.raises(FrameError, match="larger than max_frame"):
        conn.next_message()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (struct.pack(">I", 0), "empty_frame"),
        (struct.pack(">I", 1) + b"\xc1", "not_msgpack"),  # 0xc1 is never used
        (struct.pack(">I", 2) + b"\x01\x02", "not_msgpack"),  # ExtraData: two objects
        (struct.pack(">I", 1) + b"\x81", "not_msgpack"),  # truncated map
        (raw_frame([1, 2]), "not_a_map"),
        (raw_frame("hello"), "not_a_map"),
        (raw_frame({1: 2}), "not_msgpack"),  # strict_map_key: int keys refused by msgpack
        (struct.pack(">I", 3) + b"\x81\xa1\xff", "not_msgpack"),  # invalid utf-8 key
    ],
)
def test_frame_errors_are_fatal(data: bytes, code: str) -> None:
    conn = connected()
    conn.receive_data(data)
    with pytest.raises(FrameError) as info:
        conn.next_message()
    assert (info.value.code, info.value.fatal) == (code, True)
    assert info.value.to_message().fatal is True


def test_eof_states() -> None:
    conn = ServerConnection()
    conn.receive_data(encode(HELLO))
    conn.receive_data(encode(HELLO)[:3])
    conn.receive_data(b"")
    assert conn.next_message() == HELLO
    assert conn.next_message() is None
    assert (conn.truncated_eof, conn.at_eof, conn.pending_bytes) == (True, False, 3)
    with pytest.raises(RuntimeError):
        conn.receive_data(b"more")
    clean = ServerConnection()
    clean.receive_data(b"")
    assert (clean.at_eof, clean.truncated_eof) == (True, False)
    assert clean.next_message() is None


def test_encode_refuses_nothing_valid() -> None:
    frame = encode(Reply(1, True, {"nested": [1, 2.5, "x", b"y", None]}))
    assert msgpack.unpackb(frame[4:], raw=False)["result"]["nested"][3] == b"y"


# -- properties -------------------------------------------------------------------------------

scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20)
)  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)  # fmt: skip
all_names = sorted({spec.name for specs in SCHEMAS.values() for spec in specs}
                   | {"seq", "kind", "id", "ts", "job_id", "v", "pid", "fuzzer", "req", "op",
                      "args"})  # fmt: skip
keys = st.sampled_from(all_names) | st.text(max_size=8)
message_maps = st.builds(
    lambda t, body: {"t": t, **body},
    st.sampled_from(["event", "hello", "control", "ack"]) | values,
    st.dictionaries(keys, values | st.sampled_from([k.value for k in Kind]), max_size=8),
)


def drive(conn: ServerConnection, chunks: list[bytes]) -> None:
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            try:
                if conn.next_message() is None:
                    break
            except MessageError:
                continue
            except (FrameError, SessionError):
                return  # fatal; any other exception fails the test


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.lists(st.binary(min_size=1, max_size=64), max_size=12), st.booleans())
def test_arbitrary_bytes_give_messages_or_protocol_errors(chunks: list[bytes], eof: bool) -> None:
    chunks = [*chunks, b""] if eof else chunks
    drive(ServerConnection(max_frame=4096), chunks)
    drive(connected(max_frame=4096), chunks)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=500)
@given(st.lists(message_maps, max_size=6), st.integers(1, 7))
def test_arbitrary_maps_give_messages_or_protocol_errors(objs: list[Any], step: int) -> None:
    data = encode(HELLO) + b"".join(raw_frame(obj) for obj in objs)
    drive(ServerConnection(), [data[i : i + step] for i in range(0, len(data), step)])


@pytest.mark.parametrize(
    "obj",
    [
        event("crash", signal=0),
        event("crash", signal=SIGNAL_MAX),
        event("crash", exit_code=-1),  # a negative exit code is the Go bot's "killed"
        event("stats", coverage_percent=100, executions=0),
        event("coverage", edges=0, new_edges=0),
    ],
)
def test_boundary_values_accepted(obj: dict[str, Any]) -> None:
    assert feed(connected(), raw_frame(obj)).seq == 1
