"""From the spool to the senders: batches per kind and job, flush triggers, settling.

The pipeline reads undelivered events from the spool in order (a cursor over ``seq``), holds
at most :data:`MAX_HELD` of them in memory, and groups them per ``(kind, job_id)``: the master's
batch endpoint takes one job per request. A group becomes a batch when it reaches the batch
size or byte budget, or when its oldest event has waited the flush interval. Delivery workers
take batches from a bounded channel, send them, and settle the outcome back into the spool:
delivered events are forgotten, poisoned ones become dead letters, the rest are re-queued after
a delay. Nothing waits behind a poisoned batch, and nothing leaves the spool before the master
has it, so a crash at any moment loses nothing: on restart the cursor starts again at zero.
The rows a group commit has just stored are handed over from memory (:meth:`Pipeline.offer`)
when they are the next ones to read; the spool is read only to catch up.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .events import Kind
from .membudget import MemoryBudget, Reservation
from .sender import Batch, DeliveryResult
from .spool import Spool, Spooled

__all__ = ["BATCH_QUEUE_SIZE", "MAX_HELD", "READ_CHUNK", "BatchPolicy", "Pipeline"]

log = logging.getLogger(__name__)

#: Events read from the spool and not yet settled, at most. The rest wait on disk.
MAX_HELD = 20_000
#: Ready batches waiting for a delivery worker.
BATCH_QUEUE_SIZE = 8
#: Events read from the spool per query.
READ_CHUNK = 2_000
#: Bytes of memory budget one held event is counted for beyond its fields.
HELD_OVERHEAD = 512


@dataclass
class BatchPolicy:
    """When a group of events becomes a batch. Plain data, changeable at run time."""

    batch_size: int = 100
    batch_bytes: int = 960 * 1024
    flush_interval: float = 10.0

    def due(self, count: int, nbytes: int, since: float, now: float) -> bool:
        """Is a group of ``count`` events (``nbytes``, oldest added at ``since``) due at ``now``?"""
        return (
            count >= self.batch_size
            or nbytes >= self.batch_bytes
            or (count > 0 and now >= since + self.flush_interval)  # same sum as the deadline
        )


@dataclass
class _Group:
    items: list[Spooled] = field(default_factory=list)
    nbytes: int = 0
    since: float = 0.0


class Pipeline:
    """Turns the spool into batches and settles what the senders report."""

    def __init__(
        self,
        spool: Spool,
        policy: BatchPolicy,
        *,
        retry_base: float = 0.5,
        retry_cap: float = 30.0,
        max_held: int = MAX_HELD,
        offload: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync,
        budget: MemoryBudget | None = None,
        prompt_kinds: frozenset[Kind] = frozenset(),
    ) -> None:
        self.spool = spool
        self.policy = policy
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.max_held = max_held
        #: Kinds sent as soon as they are read: stats and coverage when the server coalesces
        #: them, since they already waited one interval there (flush_interval end to end).
        self.prompt_kinds = prompt_kinds
        # How blocking spool calls run: a worker thread in the daemon; tests under the
        # autojump clock run them inline so virtual time cannot jump during a query.
        self._offload = offload
        self.cursor = 0
        self.batches_sent = 0
        self._groups: dict[tuple[Kind, str], _Group] = {}
        self._held: dict[str, Spooled] = {}
        # The window's bytes, from the daemon's memory budget: a quarter of it at most, so a
        # master that is down never starves the producers (the rest waits on disk).
        self._budget = budget
        self._window = Reservation(budget or MemoryBudget())
        self._mean_cost = 64 * 1024  # of the last chunk read (first: a guess on the big side)
        self._retry: list[tuple[float, int, Spooled]] = []
        self._tiebreak = itertools.count()
        self._wake = trio.Event()
        self._more = True
        self._reading = False
        # flush_now(): groups formed until the spool is read through go at once, one time.
        self._flush_once = False
        # drain(): every group goes at once from now on. Neither touches a retry's delay.
        self._draining = False
        self._idle = trio.Event()

    def notify(self) -> None:
        """New events are in the spool (called after each group commit)."""
        self._more = True
        self._wake.set()

    def flush_now(self) -> None:
        """Send what is ready now, once (an operator's ``flush``).

        Every group, and what the spool holds now, goes at once instead of waiting for its
        size or interval. Events waiting for a retry keep waiting: their backoff and the
        master's ``Retry-After`` are not the caller's to shorten.
        """
        self._flush_once = True
        self._wake.set()

    def drain(self) -> None:
        """From now on every group goes at once (shutdown); retries still wait their delay."""
        self._draining = True
        self._wake.set()

    async def run(self, batches: trio.MemorySendChannel[Batch]) -> None:
        """Read, group and emit batches until cancelled."""
        async with batches:
            while True:
                await self._read_more()
                self._release_due_retries(trio.current_time())
                await self._emit(batches, trio.current_time())
                if self._more and self._has_room():
                    continue
                if not self._held and not self._more:
                    self._idle.set()
                with trio.move_on_at(self._next_deadline()):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def deliver(
        self,
        batches: trio.MemoryReceiveChannel[Batch],
        send: Callable[[Batch], Any],
    ) -> None:
        """A delivery worker: send each batch, then settle its outcome in the spool."""
        async with batches:
            async for batch in batches:
                result: DeliveryResult = await send(batch)
                await self.settle(batch, result)

    async def settle(self, batch: Batch, result: DeliveryResult) -> None:
        """Apply one delivery outcome: forget, dead-letter, or re-queue each event."""
        requeue = list(result.requeue)
        retry_after = result.retry_after
        try:
            if result.delivered:
                await self._offload(self.spool.delivered, result.delivered)
            if result.poisoned:
                await self._offload(self.spool.dead_letter, result.poisoned)
                log.warning(
                    "master refused %d %s event(s) of job %s as poison (%s): kept as dead letters",
                    len(result.poisoned),
                    batch.kind,
                    batch.job_id,
                    result.poisoned[0][2][:200],
                )
            if requeue:
                await self._offload(self.spool.note_retry, requeue)
        except (sqlite3.Error, OSError) as exc:
            # The spool cannot record the outcome (a full disk). Nothing is lost: every event
            # of the batch stays in the spool and goes again later; the master overwrites by id.
            log.error("cannot record a delivery in the spool (%s): the batch goes again", exc)
            requeue = [event.id for event in batch.events]
            retry_after = max(retry_after or 0.0, self.retry_cap)
        else:
            for id_ in (*result.delivered, *(p[0] for p in result.poisoned)):
                gone = self._held.pop(id_, None)
                if gone is not None:
                    self._window.shrink(self._window.held - _cost(gone))
        now = trio.current_time()
        for id_ in requeue:
            item = self._held.get(id_)
            if item is None:
                continue
            attempts = item.attempts + 1
            self._held[id_] = item = Spooled(
                item.seq, item.event, item.size, attempts, item.wire_size
            )
            delay = min(self.retry_cap, self.retry_base * 2 ** min(attempts, 16))
            if retry_after is not None:
                delay = max(delay, retry_after)
            heapq.heappush(self._retry, (now + delay, next(self._tiebreak), item))
        self._wake.set()

    async def wait_idle(self) -> None:
        """Return once nothing is held, no read is under way and the spool has nothing more
        to read (a read under way may bring rows: a drain must wait for them)."""
        while self._held or self._more or self._reading:
            self._idle = trio.Event()
            self._wake.set()
            await self._idle.wait()

    def status(self) -> dict[str, Any]:
        """For ``status``: what is in memory and where."""
        return {
            "held": len(self._held),
            "held_capacity": self.max_held,
            "held_bytes": self._window.held,
            "groups": len(self._groups),
            "waiting_retry": len(self._retry),
            "batches_sent": self.batches_sent,
            "cursor": self.cursor,
            "policy": {
                "batch_size": self.policy.batch_size,
                "batch_bytes": self.policy.batch_bytes,
                "flush_interval": self.policy.flush_interval,
            },
        }

    # -- internals -------------------------------------------------------------------------

    def _has_room(self) -> bool:
        if len(self._held) >= self.max_held:
            return False
        budget, held = self._budget, self._window.held
        # Its quarter of the budget at most; when producers hold the rest, a small chunk
        # only while it holds nothing, so deliveries never stop (the overdraft: 1/32).
        return budget is None or (
            held < budget.capacity // 4 and (budget.used < budget.capacity or not held)
        )

    def offer(self, rows: list[Spooled]) -> None:
        """Rows a group commit has just stored (after each commit, instead of :meth:`notify`).

        Taken from memory when they are the very next rows of the spool (the cursor is right
        before the first of them: nothing stored in between, by another writer or before a
        read still under way) and there is room for all of them; else read back from the
        spool like any other. Reading back what was just written cost a worker thread's
        round trip, a query and a decode per commit: 15% of the daemon's CPU per delivered
        crash (docs/performance.md, round 6).
        """
        if not rows:
            return
        if (self._more or self._reading or rows[0].seq - 1 != self.cursor
                or len(rows) > self._read_limit()):  # fmt: skip
            self.notify()
            return
        self._take(rows, trio.current_time())
        self._wake.set()

    def _read_limit(self) -> int:
        """Rows the pipeline may take now: its room in events and in the memory budget."""
        if not self._has_room():
            return 0
        limit = min(self.max_held - len(self._held), READ_CHUNK)
        if self._budget is not None:
            capacity, used = self._budget.capacity, self._budget.used
            share = min(capacity // 4 - self._window.held, max(capacity - used, capacity // 32))
            limit = max(1, min(limit, share // self._mean_cost))
        return limit

    def _take(self, rows: list[Spooled], now: float) -> None:
        for item in rows:
            self.cursor = item.seq
            self._held[item.event.id] = item
            self._window.grow(_cost(item))  # at most one chunk past the window's share
            self._add(item, now)

    async def _read_more(self) -> None:
        if not self._more:
            return
        limit = self._read_limit()
        if not limit:
            return
        # Cleared before the read, never after it: a commit's notify() that lands while the
        # read runs (in a worker thread) must not be lost, or its events wait for the next one.
        self._more = False
        self._reading = True  # rows on their way: not idle (wait_idle)
        try:
            rows = await self._offload(self.spool.read_after, self.cursor, limit)
        finally:
            self._reading = False
        if rows:
            self._mean_cost = max(HELD_OVERHEAD, sum(map(_cost, rows)) // len(rows))
        self._take(rows, trio.current_time())
        if len(rows) == limit:
            self._more = True

    def _add(self, item: Spooled, now: float) -> None:
        group = self._groups.get((item.event.kind, item.event.job_id))
        if group is None:
            group = self._groups[item.event.kind, item.event.job_id] = _Group(since=now)
        group.items.append(item)
        group.nbytes += item.wire_size

    def _release_due_retries(self, now: float) -> None:
        while self._retry and self._retry[0][0] <= now:
            _, _, item = heapq.heappop(self._retry)
            if item.event.id in self._held:
                self._add(item, now)

    async def _emit(self, batches: trio.MemorySendChannel[Batch], now: float) -> None:
        policy = self.policy
        flush = self._flush_once or self._draining
        for key in list(self._groups):
            group = self._groups[key]
            prompt = flush or key[0] in self.prompt_kinds
            while group.items and (
                prompt or policy.due(len(group.items), group.nbytes, group.since, now)
            ):
                take, nbytes = 0, 0
                for item in group.items:
                    if take and (
                        take >= policy.batch_size or nbytes + item.wire_size > policy.batch_bytes
                    ):
                        break
                    take += 1
                    nbytes += item.wire_size
                chosen, group.items = group.items[:take], group.items[take:]
                group.nbytes -= nbytes
                group.since = now
                self.batches_sent += 1
                await batches.send(Batch(key[0], key[1], [item.event for item in chosen]))
            if not group.items:
                del self._groups[key]
        if not self._more:  # the spool is read through: what was ready is sent
            self._flush_once = False

    def _next_deadline(self) -> float:
        deadlines = [g.since + self.policy.flush_interval for g in self._groups.values()]
        if self._retry:
            deadlines.append(self._retry[0][0])
        return min(deadlines, default=trio.current_time() + 3600.0)


def _cost(item: Spooled) -> int:
    return item.wire_size + HELD_OVERHEAD
