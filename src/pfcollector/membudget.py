"""One memory budget, in bytes, for everything the daemon holds in memory (``memory_budget``).

A small byte semaphore: a holder reserves bytes before it keeps them and releases them when it
lets go. Connections reserve before they buffer a frame, so ``max_connections x max_frame``
cannot escape the budget; an accepted event carries its bytes (a :class:`Reservation`) through
the ingest channel and the group commit, which releases them once the group is stored; the
coalescer, the pipeline's window and the input writer hold theirs likewise. When the budget is
spent, whoever asks waits (first come, first served): a connection stops reading its socket,
so its producer gets flow control, never a disconnect or a drop.

Two rules keep waiting from becoming a deadlock:

* a request larger than the whole budget is granted once nothing else is held (one frame of
  ``max_frame`` bigger than the budget still gets through, alone);
* :meth:`MemoryBudget.force` takes bytes without waiting, past the limit if need be, for the
  few places that may not wait (an event already decoded); the overdraft is at most one event
  and later requests wait until it is paid back.

The accounting (:meth:`MemoryBudget.try_acquire`, :meth:`~MemoryBudget.release`, the order of
waiters) is plain logic; only :meth:`MemoryBudget.acquire` touches trio.
"""

from __future__ import annotations

import ctypes
from collections import deque
from typing import Any

import trio

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "MIN_MEMORY_BUDGET",
    "MMAP_THRESHOLD",
    "MemoryBudget",
    "Reservation",
    "tune_allocator",
]

#: The default ``memory_budget``: 256 MiB.
DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024
#: The smallest ``memory_budget`` accepted: 16 MiB.
MIN_MEMORY_BUDGET = 16 * 1024 * 1024


_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: Blocks of this size and more are mmapped, and go back to the system when freed. Below it,
#: a crash storm's 128-256 KiB buffers (its JSON items, packed rows, decoded texts) come from
#: the heap instead of costing fresh pages every time: at 128 KiB a storm of 64 KiB texts
#: spent 13% more daemon CPU per crash, for 5 MiB less peak RSS under memory pressure
#: (docs/performance.md, round 6). Reads of READ_SIZE (reader.py) are still above it.
MMAP_THRESHOLD = 256 * 1024


def tune_allocator() -> bool:
    """Make freed big buffers go back to the system (glibc only; False elsewhere).

    glibc raises its mmap threshold each time a large block is freed, after which frames and
    inputs of a few MiB come from the heap, where freed holes stay resident: the RSS then
    keeps every peak. A fixed threshold (:data:`MMAP_THRESHOLD`) and two arenas keep it near
    what is held.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_ARENA_MAX, 2))


class _Waiter:
    __slots__ = ("event", "granted", "nbytes")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.granted = False
        self.event = trio.Event()


class MemoryBudget:
    """Bytes held in memory, at most :attr:`capacity` (save a bounded :meth:`force`)."""

    def __init__(self, capacity: int = DEFAULT_MEMORY_BUDGET) -> None:
        if capacity < 1:
            raise ValueError(f"memory budget must be at least 1 byte, got {capacity}")
        self.capacity = capacity
        self.used = 0
        #: The most ever held at once.
        self.peak = 0
        #: Requests that had to wait, since start.
        self.waits = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for bytes now."""
        return len(self._waiters)

    def _fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.capacity or (self.used == 0 and nbytes > self.capacity)

    def _take(self, nbytes: int) -> None:
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def try_acquire(self, nbytes: int) -> bool:
        """Take ``nbytes`` if they fit now and nobody waits before us; never waits."""
        if nbytes <= 0:
            return True
        if self._waiters or not self._fits(nbytes):
            return False
        self._take(nbytes)
        return True

    async def acquire(self, nbytes: int) -> None:
        """Take ``nbytes``, waiting (in order of asking) until they fit.

        Cancellation: a waiter cancelled before its grant takes nothing; one cancelled after
        gives its bytes back, so nothing leaks either way.
        """
        if self.try_acquire(nbytes):
            await trio.lowlevel.checkpoint()
            return
        waiter = _Waiter(nbytes)
        self._waiters.append(waiter)
        self.waits += 1
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release(nbytes)
            else:
                self._waiters.remove(waiter)
                self._grant()  # the head may have changed
            raise

    def force(self, nbytes: int) -> None:
        """Take ``nbytes`` now, past the limit if need be (callers bound the overdraft)."""
        if nbytes > 0:
            self._take(nbytes)

    def release(self, nbytes: int) -> None:
        """Give back ``nbytes`` taken earlier; wakes the waiters that now fit, in order."""
        if nbytes <= 0:
            return
        self.used -= nbytes
        if self.used < 0:
            raise RuntimeError(f"memory budget released {-self.used} bytes more than taken")
        self._grant()

    def _grant(self) -> None:
        waiters = self._waiters
        while waiters and self._fits(waiters[0].nbytes):
            waiter = waiters.popleft()
            self._take(waiter.nbytes)
            waiter.granted = True
            waiter.event.set()

    def snapshot(self) -> dict[str, Any]:
        """For ``status`` and the metrics."""
        return {
            "budget_bytes": self.capacity,
            "used_bytes": self.used,
            "peak_bytes": self.peak,
            "waiting": self.waiting,
            "waits": self.waits,
        }


class Reservation:
    """Bytes one holder has taken from a :class:`MemoryBudget`; moves with what it pays for."""

    __slots__ = ("budget", "held")

    def __init__(self, budget: MemoryBudget, held: int = 0) -> None:
        self.budget = budget
        self.held = held

    async def ensure(self, nbytes: int) -> None:
        """Hold at least ``nbytes``, waiting for the difference."""
        more = min(nbytes, max(self.budget.capacity, self.held)) - self.held
        if more > 0:
            await self.budget.acquire(more)
            self.held += more

    def try_ensure(self, nbytes: int) -> bool:
        """Hold at least ``nbytes`` if the difference is free now; never waits."""
        more = min(nbytes, max(self.budget.capacity, self.held)) - self.held
        if more <= 0:
            return True
        if not self.budget.try_acquire(more):
            return False
        self.held += more
        return True

    def shrink(self, nbytes: int) -> None:
        """Hold at most ``nbytes``; give back the rest."""
        if self.held > nbytes:
            self.budget.release(self.held - nbytes)
            self.held = nbytes

    def grow(self, nbytes: int) -> None:
        """Hold ``nbytes`` more at once (:meth:`MemoryBudget.force`)."""
        self.budget.force(nbytes)
        self.held += max(nbytes, 0)

    def split(self, nbytes: int) -> Reservation:
        """Hand ``nbytes`` to a new holder: from what this one holds, forced if it is short."""
        nbytes = max(nbytes, 0)
        moved = min(nbytes, self.held)
        self.held -= moved
        self.budget.force(nbytes - moved)
        return Reservation(self.budget, nbytes)

    def absorb(self, other: Reservation) -> None:
        """Take over what ``other`` holds (of the same budget); ``other`` holds nothing after."""
        if other.budget is not self.budget:
            raise ValueError("a reservation can only absorb one of the same memory budget")
        self.held += other.held
        other.held = 0

    def release(self) -> None:
        """Give everything back (idempotent)."""
        held, self.held = self.held, 0
        self.budget.release(held)
