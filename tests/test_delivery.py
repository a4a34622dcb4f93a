"""Delivery end to end: a daemon in this process (real Unix socket, real SQLite spool) sends
over real TCP to the reference master on 127.0.0.1. Rules: every event accepted is found at
the master exactly once by id, or in the dead letters with the master's answer; outages,
flapping, poison and shutdown change when, never whether. Real I/O, so the real clock; every
wait is bounded (``eventually``), and retry/breaker timings are shortened by configuration."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import trio

from pfcollector.config import Config
from pfcollector.daemon import Daemon
from pfcollector.devmaster import DevMaster
from pfcollector.events import Kind
from pfcollector.protocol import ErrorMsg, EventMsg
from pfcollector.statusview import format_status

from .conftest import start_daemon
from .wire import RawClient, event, exchange

FAST = {
    "flush_interval": 0.1,
    "retry_base": 0.02,
    "retry_cap": 0.2,
    "retry_attempts": 2,
    "breaker_reset": 0.1,
    "breaker_max_reset": 0.4,
    "http_timeout": 2.0,
    "drain_deadline": 5.0,
    "coalesce": False,  # every event by id at the master; coalescing: test_policies.py
}


async def eventually(pred: Callable[[], bool], limit: float = 20.0) -> None:
    with trio.fail_after(limit):
        while not pred():
            await trio.sleep(0.05)


@pytest.fixture
def master() -> Iterator[DevMaster]:
    with DevMaster() as m:
        yield m


@pytest.fixture
def master_config(make_config: Callable[..., Config], master: DevMaster) -> Callable[..., Config]:
    def make(**overrides: Any) -> Config:
        return make_config(master_url=master.url, bot_id="bot-test", **{**FAST, **overrides})

    return make


@pytest.fixture
async def daemon(
    master_config: Callable[..., Config], nursery: trio.Nursery
) -> AsyncIterator[Daemon]:
    d = await start_daemon(nursery, master_config())
    yield d
    d.stop()


async def send_all(daemon: Daemon, events: list[EventMsg]) -> list[ErrorMsg]:
    """Send ``events`` on one connection; return the errors once all are acked."""
    client = await RawClient.connect(daemon.config.socket_path)
    await client.hello()
    errors = await exchange(client, events)
    await client.aclose()
    return errors


def mix(n: int, prefix: str = "e") -> list[EventMsg]:
    kinds = [Kind.CRASH, Kind.COVERAGE, Kind.COVERAGE, Kind.CORPUS, Kind.STATS]
    out = []
    for seq in range(1, n + 1):
        ev = event(seq, kinds[seq % len(kinds)])
        out.append(EventMsg(seq, ev.kind, ev.fields, f"{prefix}-{seq}", None, None))
    return out


def at_master(master: DevMaster) -> set[str]:
    ids = master.ids("crash") | master.ids("coverage") | master.ids("corpus")
    return ids | {row["body"].get("id", "") for row in master.rows("status")}


async def test_everything_arrives_once_by_id(daemon: Daemon, master: DevMaster) -> None:
    events = mix(200)
    assert await send_all(daemon, events) == []
    await eventually(lambda: daemon.spool.total_count == 0)
    assert at_master(master) >= {e.id for e in events if e.id}
    crash = next(r for r in master.rows("crash") if r["id"] == "e-5")
    assert crash["bot_id"] == "bot-test"
    assert crash["job_id"] == "job-1"
    assert crash["size"] == len(b"crash-5")
    assert crash["signal"] == 11
    assert crash["file_path"].endswith(crash["hash"])
    assert max(master.submissions().values()) == 1  # no redundant resends when all is well


async def test_master_down_then_up(daemon: Daemon, master: DevMaster) -> None:
    master.down()
    events = mix(120)
    assert await send_all(daemon, events) == []  # accepted and acked while the master is down
    await eventually(
        lambda: (
            daemon.sender is not None
            and daemon.sender.breaker.snapshot(trio.current_time())["state"] != "closed"
        )
    )
    status = await daemon.status()
    assert status["spool"]["events"] == 120
    assert status["delivery"]["sender"]["last_error"]["text"]
    master.up()
    await eventually(lambda: daemon.spool.total_count == 0)
    assert at_master(master) >= {e.id for e in events if e.id}
    status = await daemon.status()
    assert status["delivery"]["breaker"]["state"] == "closed"


async def test_flapping_master(daemon: Daemon, master: DevMaster) -> None:
    async def flap() -> None:
        for _ in range(4):
            master.faults.fail_next(3, status=503)
            await trio.sleep(0.2)
            master.down()
            await trio.sleep(0.3)
            master.up()
            master.faults.reset_next(1)
            await trio.sleep(0.2)

    events = mix(300)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flap)
        for start_at in range(0, 300, 50):
            assert await send_all(daemon, _renumber(events[start_at : start_at + 50])) == []
            await trio.sleep(0.1)
    await eventually(lambda: daemon.spool.total_count == 0, limit=30)
    assert at_master(master) >= {e.id for e in events if e.id}
    status = await daemon.status()
    assert sum(k["retried"] for k in status["spool"]["kinds"].values()) > 0


async def test_poison_batch_blocks_nothing_and_retries_on_request(
    daemon: Daemon, master: DevMaster
) -> None:
    master.faults.reject_ids(["e-5"], status=400)  # a crash the master refuses
    events = mix(100)
    assert await send_all(daemon, events) == []
    await eventually(lambda: daemon.spool.total_count == 0)
    letters = await daemon.control("dead_letters", {}, _peer())
    assert [d["id"] for d in letters] == ["e-5"]
    assert letters[0]["status"] == 400
    assert letters[0]["attempts"] == 1  # refused on its first attempt: counted, not 0
    assert at_master(master) >= {e.id for e in events if e.id} - {"e-5"}
    master.faults.clear()
    retry = await daemon.control("dead_letters_retry", {"ids": ["e-5", "typo"]}, _peer())
    assert retry == {"requeued": 1, "unknown": ["typo"]}
    await eventually(lambda: "e-5" in master.ids("crash"))
    assert await daemon.control("dead_letters", {}, _peer()) == []


async def test_partial_success_items_become_dead_letters(daemon: Daemon, master: DevMaster) -> None:
    master.faults.partial_fail_ids(["e-3", "e-8"])  # two corpus items fail to store
    events = mix(50)
    assert await send_all(daemon, events) == []
    await eventually(lambda: daemon.spool.total_count == 0)
    letters = {d["id"]: d for d in await daemon.control("dead_letters", {}, _peer())}
    assert set(letters) == {"e-3", "e-8"}
    assert "corpus" in letters["e-3"]["error"]
    assert at_master(master) >= {e.id for e in events if e.id} - {"e-3", "e-8"}


async def test_item_mode(
    master_config: Callable[..., Config], master: DevMaster, nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(nursery, master_config(delivery_mode="item"))
    events = mix(40)
    assert await send_all(daemon, events) == []
    await eventually(lambda: daemon.spool.total_count == 0)
    assert at_master(master) >= {e.id for e in events if e.id}
    daemon.stop()


async def test_stop_with_master_down_keeps_everything_for_next_start(
    master_config: Callable[..., Config], master: DevMaster
) -> None:
    config = master_config(drain_deadline=0.5)
    events = mix(60)
    master.down()
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config)
        assert await send_all(daemon, events) == []
        daemon.stop()  # returns after the drain deadline: the master never came back
    assert master.count("crash") == 0
    master.up()
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config)
        assert daemon.spool.total_count == 60
        await eventually(lambda: daemon.spool.total_count == 0)
        daemon.stop()
    assert at_master(master) >= {e.id for e in events if e.id}


async def test_stop_drains_pending_batches(
    master_config: Callable[..., Config], master: DevMaster
) -> None:
    events = mix(80)
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, master_config(flush_interval=3600.0))
        assert await send_all(daemon, events) == []
        daemon.stop()  # the hour-long flush interval must not hold anything back
    assert at_master(master) >= {e.id for e in events if e.id}


async def test_full_spool_refuses_crashes_with_an_error(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(nursery, make_config(spool_max_bytes=1024 * 1024, coalesce=False))
    big = b"\x00" * (200 * 1024)
    crashes = [
        EventMsg(
            s,
            Kind.CRASH,
            {**event(s, Kind.CRASH).fields, "input": big + bytes([s])},
            f"c-{s}",
            None,
            None,
        )
        for s in range(1, 9)
    ]
    errors = await send_all(daemon, crashes)
    assert errors
    assert {e.code for e in errors} == {"spool_full"}
    assert all(e.seq is not None for e in errors)
    stored = {r.event.id for r in daemon.spool.read_after(0, 100)}
    refused = {f"c-{e.seq}" for e in errors}
    assert stored | refused == {f"c-{s}" for s in range(1, 9)}
    assert not stored & refused
    status = await daemon.status()
    assert status["spool"]["kinds"]["crash"]["refused"] == len(errors)
    # status tells the truth: every crash received, the refused ones not counted accepted,
    # the refusal by code, and an alert in the human view.
    crash = status["events"]["crash"]
    assert crash["received"] == 8
    assert crash["refused"] == {"spool_full": len(errors)}
    assert crash["accepted"] == 8 - len(errors) == len(stored)
    assert f"ALERT: {len(errors)} crash event(s) refused" in format_status(status)
    daemon.stop()


def _renumber(events: list[EventMsg]) -> list[EventMsg]:
    return [EventMsg(i, e.kind, e.fields, e.id, e.ts_ns, e.job_id) for i, e in enumerate(events, 1)]


def _peer() -> Any:
    from pfcollector.server import ConnectionInfo

    return ConnectionInfo(0, 0, 0, 0, 0.0)


async def test_register_then_deliver_under_the_masters_bot_id(
    make_config: Callable[..., Config], master: DevMaster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = make_config(master_url=master.url, register=True, **FAST)
    events = mix(20)
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config)
        assert await send_all(daemon, events) == []
        await eventually(lambda: daemon.spool.total_count == 0)
        (bot,) = master.bots()
        assert daemon.bot_id == bot["id"]
        await eventually(lambda: master.bots()[0]["status"] in ("idle", "busy"))  # heartbeat
        daemon.stop()
    crash = next(r for r in master.rows("crash") if r["id"] == "e-5")
    assert crash["bot_id"] == bot["id"]
    registered = [r for r in caplog.records if "registered with" in r.getMessage()]
    assert len(registered) == 1 and master.url in registered[0].getMessage()  # logged once
    async with trio.open_nursery() as nursery:  # a restart keeps the bot id it was given
        daemon = await start_daemon(nursery, config)
        await eventually(lambda: daemon.sender is not None)
        assert daemon.bot_id == bot["id"]
        assert len(master.bots()) == 1
        daemon.stop()
