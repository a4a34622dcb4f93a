"""pfclient's sans-I/O :class:`~pfclient._session.Session`: server frames in, state out.

No sockets and no event loop: each test feeds the bytes a daemon would send and checks the
session's queue, rejections, replies and the frames it makes. The clients built on it are
tested end to end in test_client.py and test_aio_client.py.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest

from pfclient import REJECTED_KEEP, EventRejected, aio
from pfclient._session import DEFAULT_MAX_FRAME, Pending, Session, check_lifecycle
from pfclient._wire import WireError, encode_frame


def decode(frame: bytes) -> dict[str, Any]:
    (size,) = struct.unpack(">I", frame[:4])
    assert size == len(frame) - 4
    msg: dict[str, Any] = msgpack.unpackb(frame[4:], raw=False)
    return msg


def welcome(max_frame: int | None = 1000) -> bytes:
    msg: dict[str, Any] = {"t": "welcome", "v": 1, "daemon": "pfcollector test"}
    if max_frame is not None:
        msg["max_frame"] = max_frame
    return encode_frame(msg)


def ack(seq: int) -> bytes:
    return encode_frame({"t": "ack", "seq": seq})


def error(seq: int | None, code: str = "wrong_type", **extra: Any) -> bytes:
    return encode_frame({"t": "error", "code": code, "message": f"event seq {seq}: bad",
                         "seq": seq, "field": "edges", "fatal": False, **extra})  # fmt: skip


def connected(**kw: Any) -> Session:
    s = Session("job-1", "afl++")
    s.hello(42)
    s.feed(welcome(**kw))
    return s


def send(s: Session, event_id: str, waited: bool = False) -> Pending:
    """Queue and frame one coverage event, as a client does."""
    p = s.event("coverage", {"edges": 1}, None, 1.0, event_id, waited=waited)
    s.unacked[p.id] = p
    s.frame(p)
    return p


def test_hello_frame_and_welcome() -> None:
    s = Session("job-1", "afl++")
    assert decode(s.hello(42)) == {"t": "hello", "v": 1, "job_id": "job-1", "fuzzer": "afl++",
                                   "pid": 42}  # fmt: skip
    assert not s.handshake_over() and s.max_frame == DEFAULT_MAX_FRAME
    s.feed(welcome(1000))
    assert s.handshake_over() and s.welcome is not None and s.max_frame == 1000
    s.hello(42)  # a new connection waits for its own welcome
    assert s.welcome is None and not s.handshake_over()
    s.feed(welcome(None))
    assert s.max_frame == DEFAULT_MAX_FRAME


def test_event_body_and_fresh_seqs() -> None:
    s = connected()
    p = s.event("crash", {"type": "SEGV", "input": b"\x00"}, "job-2", 5.0, "id-1", waited=True)
    assert (p.id, p.seq, p.done, p.error, p.waited) == ("id-1", 0, False, None, True)
    body = decode(s.frame(p))
    assert body == {"t": "event", "seq": 1, "kind": "crash", "id": "id-1", "ts": 5.0,
                    "job_id": "job-2", "type": "SEGV", "input": b"\x00"}  # fmt: skip
    assert list(body)[:5] == ["t", "seq", "kind", "id", "ts"]
    q = s.event("stats", {}, None, None, None, waited=False)
    assert len(q.id) == 36 and "job_id" not in q.body and isinstance(q.body["ts"], float)
    assert decode(s.frame(q))["seq"] == 2 and q.seq == 2


def test_event_larger_than_max_frame_is_refused() -> None:
    s = connected(max_frame=100)
    with pytest.raises(EventRejected, match="frame_too_large") as info:
        s.event("crash", {"type": "X", "input": b"x" * 200}, None, 1.0, "big", waited=True)
    assert "the daemon's max_frame is 100" in info.value.message
    assert not s.unacked


def test_ack_is_cumulative_and_stops_at_unsent() -> None:
    s = connected()
    p1, p2, p3 = (send(s, i) for i in ("a", "b", "c"))
    unsent = s.event("coverage", {"edges": 1}, None, 1.0, "d", waited=False)
    s.unacked[unsent.id] = unsent  # queued, not yet framed on this connection: seq 0
    s.feed(ack(2))
    assert p1.done and p2.done and not p3.done and list(s.unacked) == ["c", "d"]
    s.feed(ack(99))
    assert p3.done and list(s.unacked) == ["d"] and not unsent.done
    s.feed(encode_frame({"t": "ack", "seq": "3"}) + encode_frame({"t": "ack"}))
    assert list(s.unacked) == ["d"]


def test_error_names_the_event_by_id() -> None:
    s = connected()
    p1, p2 = send(s, "a"), send(s, "b", waited=True)
    s.feed(error(1, extra_key="ignored"))
    [err] = s.rejected
    assert (err.code, err.seq, err.field, err.event_id, err.fatal) == (
        "wrong_type", 1, "edges", "a", False)  # fmt: skip
    assert str(err) == "wrong_type: event seq 1: bad"
    assert p1.done and p1.error is err and list(s.unacked) == ["b"]
    assert s.unreported == [err]  # nobody waits for p1: flush reports it
    s.feed(error(2))
    assert p2.done and p2.error is not None and p2.error.event_id == "b"
    assert s.unreported == [err]  # p2's caller raises its own rejection
    s.feed(ack(2))  # the ack after the errors covers nothing more
    assert not s.unacked


def test_error_for_no_known_event() -> None:
    s = connected()
    p = send(s, "a")
    s.feed(error(None, "seq_not_increasing") + error(7, fatal=True))
    assert [(e.code, e.seq, e.event_id) for e in s.rejected] == [
        ("seq_not_increasing", None, None), ("wrong_type", 7, None)]  # fmt: skip
    assert s.rejected[1].fatal and s.unreported == s.rejected
    assert list(s.unacked) == ["a"] and not p.done
    first = s.take_unreported()
    assert first is not None and first.code == "seq_not_increasing"
    assert s.unreported == [] and s.take_unreported() is None
    assert len(s.rejected) == 2  # rejected keeps them


def test_error_before_welcome_refuses_the_hello() -> None:
    s = Session("job-1", "afl++")
    s.hello(1)
    s.feed(encode_frame({"t": "error", "code": "unsupported_version", "message": "speaks 2",
                         "seq": None, "field": "v", "fatal": True}))  # fmt: skip
    assert s.handshake_over() and s.welcome is None
    err = s.hello_error
    assert err is not None and err.fatal
    assert (err.code, err.field) == ("unsupported_version", "v")
    assert s.rejected == [] and s.unreported == []


def test_rejected_is_bounded() -> None:
    s = connected()
    s.feed(b"".join(error(i) for i in range(REJECTED_KEEP + 5)))
    assert len(s.rejected) == REJECTED_KEEP and s.rejected[0].seq == 5


def test_control_requests_and_replies() -> None:
    s = Session("job-1", "afl++")  # control needs no hello
    req1, frame1 = s.control("status", None)
    req2, frame2 = s.control("drain", {"x": 1})
    assert (req1, req2) == (1, 2)
    assert decode(frame1) == {"t": "control", "req": 1, "op": "status", "args": {}}
    assert decode(frame2)["args"] == {"x": 1}
    s.feed(encode_frame({"t": "reply", "req": 2, "ok": True, "result": {"a": 1}, "error": None})
           + encode_frame({"t": "reply", "req": "1", "ok": True}))  # fmt: skip
    assert list(s.replies) == [2] and s.replies[2]["result"] == {"a": 1}
    s.hello(1)  # replies belong to a connection
    assert s.replies == {}


def test_reconnect_resends_same_ids_with_fresh_seqs() -> None:
    s = connected()
    for i in ("a", "b", "c", "d"):
        send(s, i)
    s.feed(ack(1))
    s.hello(42)
    assert [p.seq for p in s.unacked.values()] == [0, 0, 0]
    s.feed(ack(5))  # an ack cannot cover what is not sent on this connection
    assert list(s.unacked) == ["b", "c", "d"]
    s.feed(welcome())
    frames = s.resend()
    first = decode(next(frames))  # encoded as the caller goes
    assert (first["id"], first["seq"]) == ("b", 1) and s.unacked["c"].seq == 0
    rest = [decode(f) for f in frames]
    assert [(m["id"], m["seq"]) for m in rest] == [("c", 2), ("d", 3)]
    p = send(s, "e")
    assert p.seq == 4
    s.feed(ack(4))
    assert not s.unacked


def test_resend_skips_nothing_when_acks_arrive_midway() -> None:
    s = connected()
    for i in ("a", "b", "c"):
        send(s, i)
    s.hello(42)
    s.feed(welcome())
    frames = s.resend()
    next(frames)
    s.feed(ack(1))  # "a" acked on the new connection while "b" and "c" are still unsent
    assert list(s.unacked) == ["b", "c"]
    assert [decode(f)["id"] for f in frames] == ["b", "c"]


def test_frames_split_across_reads_and_unknown_messages() -> None:
    s = connected()
    send(s, "a")
    data = encode_frame({"t": "news", "x": 1}) + ack(1)
    for i in range(len(data)):
        s.feed(data[i : i + 1])
    assert not s.unacked


def test_garbage_raises_wire_error() -> None:
    s = connected()
    with pytest.raises(WireError):
        s.feed(b"\x00\x00\x00\x00")


def test_forget_drops_queue_and_replies_but_not_rejections() -> None:
    s = connected()
    send(s, "a")
    s.feed(error(9) + encode_frame({"t": "reply", "req": 1, "ok": True}))
    s.forget()
    assert not s.unacked and not s.replies and len(s.rejected) == 1


def test_check_lifecycle() -> None:
    for kind in ("started", "stopped", "error", "timeout"):
        check_lifecycle(kind)
    with pytest.raises(ValueError, match="lifecycle kind must be one of started, stopped"):
        check_lifecycle("crash")


def test_aio_reexports_the_shared_session() -> None:
    assert aio.Session is Session
