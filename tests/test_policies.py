"""Per-type policies. Rules: stats are latest-wins and coverage merges (latest edges and
exec_count, summed new_edges) per (job, fuzzer, pid) between flushes; the coalescer pushes once
per interval (virtual time, no socket) or early when it holds too many keys; crashes repeat
only as hits (durable, per job, by input hash + type + signal); corpus entries seen in the job
are dropped, by name or by content hash; nothing refused for space is ever marked seen."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from pfcollector.config import Config
from pfcollector.events import Kind
from pfcollector.ingest import Pending
from pfcollector.policies import Coalescer, crash_signature
from pfcollector.protocol import EventMsg
from pfcollector.server import Server
from pfcollector.spool import Spool

from .conftest import make_event, start_daemon
from .wire import RawClient, event, exchange


def test_stats_latest_wins_per_key() -> None:
    c = Coalescer()
    for i in range(1000):
        c.add(make_event(Kind.STATS, executions=i))
    c.add(make_event(Kind.STATS, job_id="job-2", executions=7))
    out = c.take()
    assert sorted(e.fields["executions"] for e in out) == [7, 999]
    assert c.absorbed["stats"] == 999
    assert c.take() == []


def test_coverage_sums_new_edges_keeps_latest() -> None:
    c = Coalescer()
    for i in range(1, 11):
        c.add(make_event(Kind.COVERAGE, edges=100 + i, new_edges=i, exec_count=1000 * i))
    (merged,) = c.take()
    assert merged.fields == {"edges": 110, "new_edges": 55, "exec_count": 10_000}


def test_a_resent_coverage_event_is_merged_once() -> None:
    c = Coalescer()
    first = make_event(Kind.COVERAGE, edges=10, new_edges=4)
    second = make_event(Kind.COVERAGE, edges=12, new_edges=2)
    for ev in (first, second, first, second):  # the producer resends after a lost ack
        assert c.add(ev)
    (merged,) = c.take()
    assert merged.fields["new_edges"] == 6 and merged.fields["edges"] == 12
    assert c.resends == 2
    c.add(first)  # a new interval: ids of the last one are forgotten
    assert c.take()[0].fields["new_edges"] == 4


def test_remembered_ids_are_bounded() -> None:
    c = Coalescer(max_ids=10)
    events = [make_event(Kind.COVERAGE, new_edges=1) for _ in range(20)]
    for ev in events:
        c.add(ev)
    for ev in events[-5:]:  # the latest max_ids / 2 at least are remembered
        c.add(ev)
    assert c.resends == 5
    c.add(events[0])  # forgotten: merged again, the price of a bounded memory
    assert c.take()[0].fields["new_edges"] == 21


def test_coalescer_full_flag() -> None:
    c = Coalescer(max_keys=3)
    for job in ("a", "b"):
        c.add(make_event(Kind.STATS, job_id=job))
    assert not c.full
    c.add(make_event(Kind.STATS, job_id="c"))
    assert c.full


async def test_coalesce_loop_pushes_once_per_interval(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    send, recv = trio.open_memory_channel[Pending](100)
    server = Server(Path("/nonexistent"), send, _no_control, coalesce_interval=lambda: 2.0)
    assert server.coalescer is not None
    nursery.start_soon(server._coalesce_loop)
    start = trio.current_time()
    pushed: list[tuple[float, int]] = []

    async def consume() -> None:
        async for item in recv:
            pushed.append((trio.current_time() - start, item.event.fields["executions"]))

    nursery.start_soon(consume)
    await trio.sleep(0.5)  # producers between the interval boundaries: no ties
    for second in range(6):
        for i in range(100):
            server.coalescer.add(make_event(Kind.STATS, executions=second * 100 + i))
        await trio.sleep(1.0)
    assert [t for t, _ in pushed] == [2.0, 4.0, 6.0]  # one event per key per interval
    assert [x for _, x in pushed] == [199, 399, 599]  # the latest snapshot each time
    server.stop()


async def _no_control(op: str, args: object, peer: object) -> None:
    return None


async def test_stop_during_a_push_keeps_every_taken_event(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """SIGTERM while the coalescer's push waits on a full channel: whatever was taken from
    the coalescer still reaches the channel (the last push at shutdown), none is lost."""
    send, recv = trio.open_memory_channel[Pending](1)
    server = Server(Path("/nonexistent"), send, _no_control, coalesce_interval=lambda: 2.0)
    assert server.coalescer is not None
    for job in range(10):
        server.coalescer.add(make_event(Kind.STATS, job_id=f"job-{job}", executions=job))
    nursery.start_soon(server._coalesce_loop)
    await trio.sleep(3.0)  # the push took all 10 and waits on the full channel
    assert len(server.coalescer) == 0
    server.stop()  # cancels the push mid-way
    await trio.sleep(1.0)
    got: list[str] = []

    async def consume() -> None:
        async for item in recv:
            got.append(item.event.job_id)

    nursery.start_soon(consume)
    await server._push_coalesced()  # what serve() does once the listener is closed
    await trio.sleep(1.0)
    assert sorted(got) == sorted(f"job-{job}" for job in range(10))
    assert server.budget.used == 10 * 4096  # each event carries its share to the commit


async def test_daemon_coalesces_stats_and_coverage(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(nursery, make_config(flush_interval=2.0))  # > the exchange
    client = await RawClient.connect(daemon.config.socket_path)
    await client.hello()
    events = [event(s, Kind.STATS, executions=s) for s in range(1, 1001)]
    events += [event(s, Kind.COVERAGE, edges=s, new_edges=1) for s in range(1001, 1101)]
    assert await exchange(client, events) == []  # acked at once: accepted, not durable
    with trio.fail_after(10):
        while daemon.spool.total_count < 2:
            await trio.sleep(0.05)
    await trio.sleep(0.3)
    rows = {r.event.kind: r.event for r in daemon.spool.read_after(0, 100)}
    assert daemon.spool.total_count == 2
    assert rows[Kind.STATS].fields["executions"] == 1000
    assert rows[Kind.COVERAGE].fields["edges"] == 1100
    assert rows[Kind.COVERAGE].fields["new_edges"] == 100
    status = await daemon.status()
    assert status["events"]["stats"]["accepted"] == 1000
    assert status["policies"]["coalesce"]["absorbed"] == {"stats": 999, "coverage": 99}
    await client.aclose()
    daemon.stop()


async def test_stop_pushes_what_is_coalesced(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    config = make_config(flush_interval=3600.0)
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config)
        client = await RawClient.connect(config.socket_path)
        await client.hello()
        await exchange(client, [event(s, Kind.STATS, executions=s) for s in range(1, 50)])
        await client.aclose()
        daemon.stop()
    spool = Spool(config.spool_path)
    (row,) = spool.read_after(0, 10)
    assert row.event.fields["executions"] == 49
    spool.close()


async def test_crash_dedupe_counts_hits(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(nursery, make_config())
    client = await RawClient.connect(daemon.config.socket_path)
    await client.hello()
    same = [event(s, Kind.CRASH, input=b"same input") for s in range(1, 51)]
    other_signal = event(51, Kind.CRASH, input=b"same input", signal=6)
    assert await exchange(client, [*same, other_signal]) == []
    rows = [r.event for r in daemon.spool.read_after(0, 100)]
    assert [e.id for e in rows] == [same[0].id, other_signal.id]  # the first is kept
    status = await daemon.status()
    assert status["spool"]["kinds"]["crash"]["deduped"] == 49
    (top,) = status["policies"]["crash"]["top_repeats"]
    sha = hashlib.sha256(b"same input").hexdigest()
    assert top["key"] == crash_signature(sha, "SEGV", 11)
    assert top["hits"] == 50
    assert top["first_id"] == same[0].id
    # A resend of the first crash (same id) is not a repeat.
    assert await exchange(client, [event(52, Kind.CRASH, input=b"same input")]) == []
    await client.aclose()
    daemon.stop()


async def test_crash_dedupe_can_be_switched_off(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(nursery, make_config(crash_dedupe=False))
    client = await RawClient.connect(daemon.config.socket_path)
    await client.hello()
    assert await exchange(client, [event(s, Kind.CRASH, input=b"x") for s in range(1, 6)]) == []
    assert daemon.spool.total_count == 5
    await client.aclose()
    daemon.stop()


async def test_corpus_dedupe_by_name_and_by_content(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(nursery, make_config())
    client = await RawClient.connect(daemon.config.socket_path)
    await client.hello()
    events = [
        event(1, Kind.CORPUS, files=["q/a", "q/b"]),
        event(2, Kind.CORPUS, files=["q/b", "q/c"]),  # q/b seen: only q/c is new
        event(3, Kind.CORPUS, files=["q/a"]),  # all seen: deduped
        event(4, Kind.CORPUS, files=["x1", "x2"], contents=[b"AAAA", b"BBBB"]),
        event(5, Kind.CORPUS, files=["y1"], contents=[b"AAAA"]),  # same bytes, other name
    ]
    assert await exchange(client, events) == []
    rows = {r.event.id: r.event for r in daemon.spool.read_after(0, 100)}
    assert rows[events[0].id].fields["files"] == ["q/a", "q/b"]
    assert rows[events[1].id].fields["files"] == ["q/c"]
    assert events[2].id not in rows
    assert rows[events[3].id].fields["hashes"] == [
        hashlib.sha256(b"AAAA").hexdigest(),
        hashlib.sha256(b"BBBB").hexdigest(),
    ]
    assert events[4].id not in rows
    with trio.fail_after(10):  # contents are written to their files off the ack path
        while daemon.spool.pending_input_count():
            await trio.sleep(0.01)
    assert daemon.inputs.path_for(hashlib.sha256(b"BBBB").hexdigest()).read_bytes() == b"BBBB"
    status = await daemon.status()
    assert status["spool"]["kinds"]["corpus"]["deduped"] == 2
    bad = event(6, Kind.CORPUS, files=["z"], contents=[b"1", b"2"])
    (error,) = await exchange(client, [bad])
    assert error.field == "contents"
    await client.aclose()
    daemon.stop()


def test_refused_crash_is_not_marked_seen(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1024 * 1024)
    big = "x" * 60_000
    filler = [make_event(Kind.CRASH, output=big) for _ in range(17)]
    spool.append(filler, None, [[f"fill-{i}"] for i in range(17)])
    first = make_event(Kind.CRASH, output=big)
    assert spool.append([first], None, [["sig"]]) == ["spool_full"]
    spool.delivered([e.id for e in filler])
    again = make_event(Kind.CRASH, output=big)
    assert spool.append([again], None, [["sig"]]) == [None]
    assert [r.event.id for r in spool.read_after(0, 10)] == [again.id]  # stored, not "a repeat"
    spool.close()


def test_a_full_coalescer_takes_no_new_key() -> None:
    c = Coalescer(max_keys=2)
    assert c.add(make_event(Kind.STATS, job_id="a"))
    assert c.add(make_event(Kind.STATS, job_id="b"))
    assert not c.add(make_event(Kind.STATS, job_id="c"))  # the caller spools it instead
    assert c.add(make_event(Kind.STATS, job_id="a", executions=9))  # a known key still merges
    assert len(c) == 2


async def test_job_id_per_event_cannot_grow_memory(
    make_config: Callable[..., Config], nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pfcollector.server.Coalescer", lambda: Coalescer(max_keys=10))
    daemon = await start_daemon(nursery, make_config(flush_interval=3600.0))
    client = await RawClient.connect(daemon.config.socket_path)
    await client.hello()
    events = [
        EventMsg(s, Kind.STATS, {"executions": s}, f"s-{s}", None, f"job-{s}")
        for s in range(1, 201)
    ]
    assert await exchange(client, events) == []
    coalescer = daemon.server.coalescer
    assert coalescer is not None
    assert len(coalescer) <= 10  # bounded; the rest goes to the spool
    # Evicted snapshots were acked on arrival (coalesced kinds) and are on their way to the
    # spool through the ingest channel and a group commit: wait for them, never for more.
    with trio.fail_after(10):
        while len(coalescer) + daemon.spool.total_count < 200:
            await trio.sleep(0.01)
    assert len(coalescer) <= 10
    assert len(coalescer) + daemon.spool.total_count == 200  # nothing dropped, nothing twice
    await client.aclose()
    daemon.stop()


def test_the_daemon_sends_coalesced_kinds_as_soon_as_they_are_spooled(
    make_config: Callable[..., Config],
) -> None:
    """They waited one flush interval in the coalescer already (test_pipeline.py measures it)."""
    from pfcollector.daemon import Daemon
    from pfcollector.policies import COALESCED_KINDS

    for coalesce, prompt in ((True, COALESCED_KINDS), (False, frozenset())):
        daemon = Daemon(make_config(coalesce=coalesce))
        assert daemon.pipeline.prompt_kinds == prompt
        daemon.spool.close()
        daemon._lock.release()  # the next Daemon takes the same data directory
