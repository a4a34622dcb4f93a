"""The memory budget: a byte semaphore. Rules: bytes fit or the asker waits, in order of
asking; a request larger than the budget passes alone; force overdraws and later requests wait
until it is paid back; cancellation never leaks bytes; reservations move bytes between holders.
The frame clock and frame head of the reader are pure logic too."""

from __future__ import annotations

import pytest
import trio

from pfcollector.membudget import MemoryBudget, Reservation
from pfcollector.reader import READ_SIZE, FrameClock, _Connection, read_size
from pfcollector.server import Limits


def test_try_acquire_and_release() -> None:
    budget = MemoryBudget(100)
    assert budget.try_acquire(60)
    assert not budget.try_acquire(50)
    assert budget.try_acquire(40)
    budget.release(100)
    assert budget.used == 0
    assert budget.peak == 100
    with pytest.raises(RuntimeError):
        budget.release(1)


def test_larger_than_the_budget_passes_alone() -> None:
    budget = MemoryBudget(100)
    assert budget.try_acquire(1)
    assert not budget.try_acquire(500)
    budget.release(1)
    assert budget.try_acquire(500)


def test_force_overdraws_and_blocks_later_requests() -> None:
    budget = MemoryBudget(100)
    budget.force(150)
    assert budget.used == 150
    assert not budget.try_acquire(1)
    budget.release(60)
    assert budget.try_acquire(10)


async def test_waiters_are_served_in_order(autojump_clock: trio.testing.MockClock) -> None:
    budget = MemoryBudget(100)
    assert budget.try_acquire(100)
    order: list[str] = []

    async def want(name: str, nbytes: int) -> None:
        await budget.acquire(nbytes)
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(want, "big", 80)
        await trio.sleep(1)
        nursery.start_soon(want, "small", 10)
        await trio.sleep(1)
        assert budget.waiting == 2
        assert not budget.try_acquire(1)  # nobody jumps the queue
        budget.release(50)  # 50 free: the head (80) does not fit, the small one waits behind
        await trio.sleep(1)
        assert order == []
        assert budget.waiting == 2
        budget.release(50)
    assert sorted(order) == ["big", "small"]  # both granted at that release, big first
    assert budget.used == 90
    assert budget.waits == 2


async def test_cancelled_waiter_takes_nothing(autojump_clock: trio.testing.MockClock) -> None:
    budget = MemoryBudget(100)
    assert budget.try_acquire(100)
    with trio.move_on_after(5):
        await budget.acquire(50)
    assert budget.waiting == 0
    budget.release(100)
    assert budget.used == 0


async def test_reservation_moves_bytes() -> None:
    budget = MemoryBudget(1000)
    res = Reservation(budget)
    await res.ensure(300)
    assert (res.held, budget.used) == (300, 300)
    part = res.split(100)
    assert (res.held, part.held, budget.used) == (200, 100, 300)
    more = res.split(500)  # short by 300: forced
    assert (res.held, more.held, budget.used) == (0, 500, 600)
    res.grow(50)
    res.shrink(10)
    assert budget.used == 610
    for r in (res, part, more):
        r.release()
        r.release()  # idempotent
    assert budget.used == 0


def test_frame_clock_counts_only_socket_waits() -> None:
    clock = FrameClock(Limits(slow_sender_timeout=30.0, idle_timeout=600.0))
    assert clock.deadline(0.0) == 600.0
    clock.received(10.0, partial=True, new_frame=False)  # a frame begins
    assert clock.deadline(100.0) == 130.0
    clock.received(20.0, partial=True, new_frame=False)  # same frame, 20 s on the socket
    assert clock.deadline(1000.0) == 1010.0  # time not reading in between is not counted
    clock.received(5.0, partial=True, new_frame=True)  # one frame ended, the next began
    assert clock.deadline(0.0) == 30.0
    assert clock.error()[0] == "slow_sender"
    clock.received(1.0, partial=False, new_frame=True)
    assert clock.error()[0] == "idle_timeout"


def test_the_reader_knows_the_size_of_the_frame_it_receives() -> None:
    conn = _Connection(max_frame=1 << 20)
    assert conn.frame_total == 0
    conn.receive_data(b"\x00\x00")
    assert conn.frame_total == 0  # the prefix is split over reads
    conn.receive_data(b"\x10\x00zz")
    assert conn.frame_total == 4 + 0x1000


def test_read_size_fits_a_quarter_of_the_budget() -> None:
    assert read_size(256 * 1024 * 1024, 256) == READ_SIZE == 256 * 1024
    assert read_size(16 * 1024 * 1024, 256) == 16 * 1024
    assert read_size(1024, 1000) == 4096


def test_reads_start_small_and_grow_while_they_come_back_full() -> None:
    from pfcollector.reader import SMALL_READ, _next_read

    size, sizes = SMALL_READ, []
    for _ in range(4):  # a big frame streaming in: every read full
        size = _next_read(size, size, READ_SIZE)
        sizes.append(size)
    assert sizes == [64 * 1024, READ_SIZE, READ_SIZE, READ_SIZE]
    assert _next_read(READ_SIZE, 1200, READ_SIZE) == READ_SIZE // 2  # small frames again
    assert _next_read(SMALL_READ, 1200, READ_SIZE) == SMALL_READ  # never below SMALL_READ
    assert _next_read(SMALL_READ, SMALL_READ, 4096) == 4096  # a small budget caps them all
    assert _next_read(4096, 100, 4096) == 4096
