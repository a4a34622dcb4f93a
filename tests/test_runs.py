"""Stats and coverage taken a run at a time (``ServerConnection.next_run`` and
``Coalescer.add_run``, the reader's path for them): the same events accepted, the same errors
named, the same snapshots kept as when they are taken one at a time. A run stops before
whatever it does not take (a bad id, a field out of range, a seq going back, a crash, a
partial frame, the rate limit) and leaves that frame to ``next_message``."""

from __future__ import annotations

import contextlib
import struct
import uuid
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfcollector.config import Config
from pfcollector.events import Event, Kind
from pfcollector.policies import COALESCED_KINDS, Coalescer
from pfcollector.protocol import ErrorMsg, EventMsg, Hello, MessageError, ServerConnection, encode
from pfcollector.reader import RUN_DECODER
from pfcollector.typed import event_parts

from .conftest import start_daemon
from .test_limits import fatal_error, limited
from .wire import RawClient, event

NOW = 1_700_000_000_000_000_000
HELLO = encode(Hello(1, "job-1", "afl", 7))


def frame(obj: dict[str, Any]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def stats(seq: int, **extra: Any) -> dict[str, Any]:
    return {"t": "event", "seq": seq, "kind": "stats", "id": f"s-{seq}", "executions": seq,
            **extra}  # fmt: skip


def coverage(seq: int, new_edges: int = 1, **extra: Any) -> dict[str, Any]:
    return {"t": "event", "seq": seq, "kind": "coverage", "id": f"c-{seq}", "edges": seq,
            "new_edges": new_edges, **extra}  # fmt: skip


# ---- one at a time against a run at a time, on the same bytes ----------------------------


def _outcome(conn: ServerConnection, coalescer: Coalescer, out: list[tuple[Any, ...]]) -> None:
    """What the reader's message-at-a-time path does with the next message, into ``out``."""
    try:
        msg = conn.next_message()
    except MessageError as exc:
        out.append(("error", exc.seq, exc.code, exc.field))
        return
    if msg is None or isinstance(msg, Hello):
        out.append(("none",) if msg is None else ("hello",))
        return
    assert isinstance(msg, EventMsg)
    if msg.kind not in COALESCED_KINDS:
        out.append(("other", msg.seq))
        return
    _coalesce(msg, coalescer, out)


def _coalesce(msg: EventMsg, coalescer: Coalescer, out: list[tuple[Any, ...]]) -> None:
    ev = Event(msg.id or str(uuid.uuid4()), msg.kind, msg.job_id or "job-1", "afl",
               NOW if msg.ts_ns is None else msg.ts_ns, msg.fields, 7, 1000)  # fmt: skip
    out.append(("taken" if coalescer.add(ev) else "spool", msg.seq))


def one_at_a_time(chunks: list[bytes], max_keys: int) -> tuple[Any, ...]:
    conn, coalescer, out = ServerConnection(), Coalescer(max_keys=max_keys), []
    for chunk in chunks:
        conn.receive_data(chunk)
        while not out or out[-1] != ("none",):
            _outcome(conn, coalescer, out)
        out.pop()
    return conn, coalescer, out


def by_runs(chunks: list[bytes], max_keys: int, limit: int) -> tuple[Any, ...]:
    conn, coalescer, out = ServerConnection(), Coalescer(max_keys=max_keys), []
    for chunk in chunks:
        conn.receive_data(chunk)
        while not out or out[-1] != ("none",):
            run = conn.next_run(RUN_DECODER, limit)
            if not run:
                _outcome(conn, coalescer, out)
                continue
            taken, kinds = coalescer.add_run(run, "job-1", "afl", 7, 1000, NOW)
            out += [("taken", e.seq) for e in run[:taken]]
            assert sum(kinds.values()) == taken
            for left in run[taken:]:  # as the reader does: one at a time, then the spool
                _coalesce(EventMsg(*event_parts(left)), coalescer, out)
        out.pop()
    return conn, coalescer, out


def pending(coalescer: Coalescer, sent_ids: set[Any]) -> list[tuple[Any, ...]]:
    """The snapshots held, with the ids the daemon made up (for events without one) masked."""
    return [
        (key, ev.id if ev.id in sent_ids else None, ev.kind, ev.job_id, ev.timestamp_ns,
         dict(ev.fields), ev.peer_pid, ev.peer_uid)
        for key, ev in coalescer._pending.items()
    ]  # fmt: skip


_IDS = st.sampled_from([None, "fresh", "fresh", "fresh", "repeat", "bad id", "é", "a\nb",
                        "x" * 65, "", 17])  # fmt: skip


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[dict[str, Any]], set[Any]]:
    events: list[dict[str, Any]] = []
    seq, sent_ids = 0, set()
    for n in range(draw(st.integers(1, 40))):
        seq += draw(st.sampled_from([1, 1, 1, 1, 2, 0, -1]))
        kind = draw(st.sampled_from(["stats", "stats", "coverage", "coverage", "crash"]))
        obj: dict[str, Any] = {"t": "event", "seq": seq, "kind": kind}
        choice = draw(_IDS)
        earlier = sorted(i for i in sent_ids if type(i) is str)
        if choice == "fresh" or (choice == "repeat" and not earlier):
            obj["id"] = f"id-{n}"
        elif choice == "repeat":
            obj["id"] = draw(st.sampled_from(earlier))
        elif choice is not None:
            obj["id"] = choice
        sent_ids.add(obj.get("id"))
        if draw(st.booleans()):
            obj["ts"] = draw(st.sampled_from([1_700_000_000, 1_700_000_000.5, -1, 1e20]))
        if draw(st.integers(0, 4)) == 0:
            obj["job_id"] = draw(st.sampled_from(["job-2", "job-1", "é-3", "bad\x01", "a\x9f",
                                                  "", "j" * 257, 5, None]))  # fmt: skip
        if kind == "stats":
            obj["executions"] = draw(st.sampled_from([0, 5, 10**6, -1, "many"]))
        elif kind == "coverage":
            obj["edges"] = draw(st.integers(0, 100))
            obj["new_edges"] = draw(st.sampled_from([0, 1, 3, -2]))
        else:
            obj.update(type="SEGV", signal=11, input=b"x")
        events.append(obj)
    return events, sent_ids


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.data())
def test_runs_take_what_one_at_a_time_takes(
    stream: tuple[list[dict[str, Any]], set[Any]], data: st.DataObject
) -> None:
    events, sent_ids = stream
    raw = HELLO + b"".join(frame(obj) for obj in events)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=3)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True) if b > a]
    limit = data.draw(st.sampled_from([1, 2, 7, 1 << 16]))
    max_keys = data.draw(st.sampled_from([1, 2, 4096]))
    conn_a, coal_a, out_a = one_at_a_time(chunks, max_keys)
    conn_b, coal_b, out_b = by_runs(chunks, max_keys, limit)
    assert conn_b.last_seq == conn_a.last_seq
    assert out_b == out_a  # the same events taken, spooled and refused (each named the same)
    assert pending(coal_b, sent_ids) == pending(coal_a, sent_ids)  # snapshot for snapshot
    assert coal_b.absorbed == coal_a.absorbed
    assert coal_b.resends == coal_a.resends


def test_a_run_stops_before_the_first_frame_it_does_not_take() -> None:
    conn = ServerConnection()
    conn.receive_data(HELLO + frame(stats(1)) + frame(stats(2, id="bad id")) + frame(stats(3)))
    assert conn.next_run(RUN_DECODER, 100) == []  # the hello first
    assert isinstance(conn.next_message(), Hello)
    assert [e.seq for e in conn.next_run(RUN_DECODER, 100)] == [1]
    assert conn.last_seq == 1
    assert conn.next_run(RUN_DECODER, 100) == []  # the bad id is next_message's to name
    with pytest.raises(MessageError) as refused:
        conn.next_message()
    assert (refused.value.seq, refused.value.code, refused.value.field) == (2, "bad_id", "id")
    assert [e.seq for e in conn.next_run(RUN_DECODER, 100)] == [3]
    assert conn.pending_bytes == 0


def test_a_run_leaves_a_partial_frame_and_a_crash() -> None:
    conn = ServerConnection()
    crash = {"t": "event", "seq": 3, "kind": "crash", "type": "SEGV", "signal": 11,
             "input": b"x", "id": "k-3"}  # fmt: skip
    raw = HELLO + frame(stats(1)) + frame(coverage(2)) + frame(crash) + frame(stats(4))
    conn.receive_data(raw[:-3])
    conn.next_message()  # hello
    assert [e.seq for e in conn.next_run(RUN_DECODER, 100)] == [1, 2]
    assert conn.next_run(RUN_DECODER, 100) == []
    msg = conn.next_message()
    assert isinstance(msg, EventMsg) and msg.kind is Kind.CRASH and msg.seq == 3
    assert conn.next_run(RUN_DECODER, 100) == []  # seq 4 is not all here
    conn.receive_data(raw[-3:])
    assert [e.seq for e in conn.next_run(RUN_DECODER, 100)] == [4]


def test_a_run_counts_resends_once_and_sums_new_edges() -> None:
    conn, coalescer = ServerConnection(), Coalescer()
    raw = [coverage(1, 2), coverage(2, 3), {**coverage(3, 5), "id": "c-1"}, coverage(4, 1)]
    conn.receive_data(HELLO + b"".join(frame(obj) for obj in raw))
    conn.next_message()
    run = conn.next_run(RUN_DECODER, 100)
    taken, kinds = coalescer.add_run(run, "job-1", "afl", 7, 1000, NOW)
    assert (taken, kinds) == (4, {Kind.COVERAGE: 4})
    (held,) = coalescer.take()
    assert held.fields["new_edges"] == 2 + 3 + 1  # c-1 came again: merged once
    assert held.fields["edges"] == 4 and held.id == "c-4" and held.timestamp_ns == NOW
    assert coalescer.resends == 1 and coalescer.absorbed[Kind.COVERAGE] == 2


def test_a_full_coalescer_leaves_the_rest_of_the_run() -> None:
    coalescer = Coalescer(max_keys=2)
    conn = ServerConnection()
    jobs = ["a", "b", "a", "c", "a"]
    conn.receive_data(HELLO + b"".join(frame(stats(s, job_id=j)) for s, j in enumerate(jobs, 1)))
    conn.next_message()
    run = conn.next_run(RUN_DECODER, 100)
    taken, _ = coalescer.add_run(run, "job-1", "afl", 7, 1000, NOW)
    assert taken == 3  # "c" is a third key: it and everything after it go to the spool
    assert [e.job_id for e in run[taken:]] == ["c", "a"]
    assert {ev.job_id: ev.fields["executions"] for ev in coalescer.take()} == {"a": 3, "b": 2}


# ---- over a real socket ---------------------------------------------------------------------


async def test_a_read_of_mixed_events_names_each_bad_one_and_keeps_the_rest(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(nursery, make_config(flush_interval=3600.0))
    client = await RawClient.connect(daemon.config.socket_path)
    await client.hello()
    crash = encode(event(13, Kind.CRASH))
    frames = [frame(stats(s)) for s in range(1, 6)]
    frames += [frame(stats(6, id="bad id")), frame(stats(7)), frame(stats(8, executions=-1))]
    frames += [frame(coverage(s)) for s in range(9, 13)] + [crash, frame(coverage(14))]
    frames += [frame(stats(16)), frame(stats(15)), frame(stats(17, executions=17))]
    await client.send_raw(b"".join(frames))  # one write: the daemon reads runs of them
    errors: list[ErrorMsg] = []
    with trio.fail_after(10):
        while True:
            msg = await client.recv()
            assert msg is not None
            if isinstance(msg, ErrorMsg):
                errors.append(msg)
            elif msg.seq >= 17:  # type: ignore[union-attr]
                break
    assert [(e.seq, e.code, e.field) for e in errors] == [
        (6, "bad_id", "id"), (8, "out_of_range", "executions"), (None, "seq_not_increasing", "seq"),
    ]  # fmt: skip
    status = await daemon.status()
    assert status["events"]["stats"]["accepted"] == 8  # 1-5, 7, 16, 17
    assert status["events"]["coverage"]["accepted"] == 5
    assert status["events"]["crash"]["accepted"] == 1
    coalescer = daemon.server.coalescer
    assert coalescer is not None
    held = {ev.kind: ev for ev in coalescer._pending.values()}
    assert held[Kind.STATS].fields["executions"] == 17 and held[Kind.STATS].id == "s-17"
    assert held[Kind.COVERAGE].fields["new_edges"] == 5 and held[Kind.COVERAGE].id == "c-14"
    assert coalescer.absorbed == {"stats": 7, "coverage": 4}
    await client.aclose()
    daemon.stop()


async def test_a_run_stops_at_the_rate_limit(
    make_config: Callable[..., Config],
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    daemon = await start_daemon(nursery, limited(make_config, rate_limit=100.0))
    fast = await RawClient.connect(daemon.config.socket_path)
    await fast.hello()
    with contextlib.suppress(trio.BrokenResourceError):  # one write: 300 stats in few reads
        await fast.send_raw(b"".join(frame(stats(s)) for s in range(1, 301)))
    with trio.fail_after(30):  # virtual seconds: a daemon that takes all 300 never closes
        error = await fatal_error(fast)
    assert error.code == "rate_limited"
    status = await daemon.status()
    assert status["events"]["stats"]["accepted"] == 100  # the bucket's second, not one more
    await fast.aclose()
    daemon.stop()
