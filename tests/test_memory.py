"""The memory budget with real parts: a daemon on a real socket and SQLite spool, whose spool
another connection holds locked (``BEGIN IMMEDIATE``, as a stalled disk or a backup would),
while producers send more crash inputs than the budget holds. Rules: the daemon holds at most
its budget (one read's worth per connection is the only overdraft), producers wait rather than
being disconnected, and once the spool moves on every
event is acknowledged. Real I/O, so the real clock; every wait is bounded by fail_after; the
RSS figures are measured in ``benchmarks/memory_pressure.py``."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import trio

from pfcollector.config import Config
from pfcollector.events import Kind
from pfcollector.protocol import Ack, ErrorMsg

from .conftest import start_daemon
from .wire import RawClient, event

BUDGET = 16 * 1024 * 1024
PRODUCERS = 8
EVENTS = 6  # 8 x 6 x 1 MiB: three times the budget


async def test_a_stalled_spool_holds_producers_back_within_the_budget(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    config = make_config(memory_budget=BUDGET, coalesce=False, spool_max_bytes=1 << 30)
    daemon = await start_daemon(nursery, config)
    clients = [await RawClient.connect(config.socket_path) for _ in range(PRODUCERS)]
    for client in clients:
        await client.hello()
    lock = sqlite3.connect(config.spool_path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the spool is stalled (its busy timeout is 5 s)
    errors: list[ErrorMsg] = []
    done = trio.Event()
    finished = 0

    async def produce(index: int, client: RawClient) -> None:
        nonlocal finished
        for seq in range(1, EVENTS + 1):
            data = bytes([index, seq]) * (512 * 1024)
            msg = event(seq, Kind.CRASH, input=data)
            msg.id = f"mem-{index}-{seq}"
            await client.send(msg)
        with trio.fail_after(60):
            while True:
                reply = await client.recv()
                assert reply is not None, "the daemon closed a producer's connection"
                if isinstance(reply, ErrorMsg):
                    errors.append(reply)
                elif isinstance(reply, Ack) and reply.seq == EVENTS:
                    break
        finished += 1
        if finished == PRODUCERS:
            done.set()

    for index, client in enumerate(clients):
        nursery.start_soon(produce, index, client)
    try:
        with trio.fail_after(4):  # within the spool's busy timeout
            while daemon.budget.waiting == 0:
                await trio.sleep(0.02)
        assert daemon.budget.used <= BUDGET + PRODUCERS * 64 * 1024
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    with trio.fail_after(60):
        await done.wait()
    assert errors == []
    memory = (await daemon.status())["memory"]
    assert memory["peak_bytes"] <= BUDGET + PRODUCERS * 64 * 1024
    assert memory["waits"] > 0
    assert daemon.spool.status()["crash"]["spooled"] == PRODUCERS * EVENTS
    for client in clients:
        await client.aclose()
    daemon.stop()
