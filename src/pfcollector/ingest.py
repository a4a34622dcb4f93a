"""From connections to the spool: the bounded ingest channel, group commit, and acks.

Connections put :class:`Pending` events on one bounded channel (:data:`INGEST_QUEUE_SIZE`).
A single :class:`GroupCommitter` takes whatever is waiting (up to :data:`GROUP_MAX`), stores
the crash inputs, and writes the group to the spool in one durable transaction; then it
settles each event's :class:`AckTracker`, which tells its connection which cumulative ack it
may send. When the spool falls behind, the channel fills and connections stop reading:
producers get flow control, the daemon does not grow.

Error handling:
    A group that cannot be written (disk full, I/O error) is settled with an error for every
    event in it: none of them is acknowledged, so nothing acknowledged is lost, and the
    committer goes on with the next group (the disk may have room again).
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from . import threads
from .acks import AckTracker
from .bugs import DedupeMode, crash_key, dedupe_mode
from .events import Event, Kind
from .idcheck import ID_CONFLICT, ID_CONFLICT_MESSAGE
from .inputs import InputStore
from .inputwriter import InputWriter
from .membudget import Reservation
from .spool import Spool, Spooled

__all__ = [
    "GATHER_PASSES",
    "GROUP_MAX",
    "INGEST_QUEUE_SIZE",
    "INLINE_MAX_BYTES",
    "INLINE_MAX_EVENTS",
    "SLOW_COMMIT_S",
    "SLOW_DISK_HOLD_S",
    "GroupCommitter",
    "Pending",
]

log = logging.getLogger(__name__)

#: Events waiting between all connections and the group commit. When full, readers wait.
INGEST_QUEUE_SIZE = 8192
#: Most events written in one transaction (one fsync).
GROUP_MAX = 2048
#: Scheduler passes the group commit gives the readers between its first event and taking
#: the rest of its group (measured best of 0, 1, 2 and 4).
GATHER_PASSES = 2
#: A group is written on the event loop's own thread, its COMMIT included, when it has at most
#: this many events and bytes of inputs and crash texts; a bigger group is written in a worker
#: thread, as the loop goes on. The loop is held for the group: 1.2 ms for 8 crashes of 1 KiB
#: here, 50-60 ms for 1,024 (docs/performance.md, round 4).
INLINE_MAX_EVENTS = 1024
INLINE_MAX_BYTES = 1024 * 1024
#: A COMMIT slower than this sends commits to the worker thread for SLOW_DISK_HOLD_S.
SLOW_COMMIT_S = 0.05
SLOW_DISK_HOLD_S = 30.0
_CRASH = Kind.CRASH


@dataclass(slots=True)
class Pending:
    """An accepted event on its way to the spool."""

    event: Event
    #: Bytes stored content-addressed before the event: a crash input, or corpus contents.
    input: bytes | list[bytes] | None
    tracker: AckTracker
    seq: int
    #: The memory budget this event holds until its group is stored.
    hold: Reservation | None = None


class GroupCommitter:
    """The single writer of new events: many events per transaction, acks after commit."""

    def __init__(
        self, spool: Spool, inputs: InputStore, *, crash_dedupe: DedupeMode | bool = "bug"
    ) -> None:
        self.spool = spool
        self.inputs = inputs
        self.crash_dedupe = dedupe_mode(crash_dedupe)
        #: The error code while writes fail (a full disk, say), None while they work.
        self.failing: str | None = None
        #: The last group had events refused for want of room (logged once per episode).
        self.full = False
        self.groups = 0
        self.committed = 0
        self._listeners: list[Callable[[], None]] = []
        self._rows_to: Callable[[list[Spooled]], None] | None = None
        self._writer: InputWriter | None = None
        #: Groups committed on the event loop's thread (the others went to a worker).
        self.inline = 0
        #: ``time.monotonic()`` until which every commit goes to the worker (a slow disk).
        self.threaded_until = 0.0

    def hand_inputs_to(self, writer: InputWriter) -> None:
        """After each commit, give ``writer`` the inputs just journalled, with their memory."""
        self._writer = writer

    def hand_rows_to(self, take: Callable[[list[Spooled]], None]) -> None:
        """After each commit, give ``take`` the rows it stored (the pipeline's ``offer``)."""
        self._rows_to = take

    def on_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the trio thread) after every commit that stored something."""
        self._listeners.append(callback)

    async def run(self, receive: trio.MemoryReceiveChannel[Pending]) -> None:
        """Commit groups until every sender of the channel is closed and it is drained.

        Resource handling:
            Ends only on ``EndOfChannel``: shutdown closes the senders, and everything they
            put on the channel is still written and settled.
        """
        async with receive:
            async for first in receive:
                group = [first]
                # Let the readers with frames already here put them on the channel first: a
                # group takes the producers whose acks the last commit sent and who answered
                # meanwhile, not only the first of them (end to end, 16 producers: +5-7%,
                # docs/performance.md round 5). Not a cancellation point: ``first`` is taken.
                for _ in range(GATHER_PASSES):
                    await trio.lowlevel.cancel_shielded_checkpoint()
                while len(group) < GROUP_MAX:
                    try:
                        group.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self.commit(group)
                del group, first  # their bytes are free in the budget: free them in memory too

    async def commit(self, group: list[Pending]) -> None:
        """Write one group durably, then settle every event in it."""
        stored: list[Spooled] = []
        try:
            results, blobs = await self._store(group, stored)
        except (OSError, sqlite3.Error) as exc:  # the disk, not the producer, failed
            failure = _write_failure(exc)
            if self.failing is None:  # one line per outage, not one per group
                # The text, not the exception: a record kept by a handler would keep its
                # traceback, and with it this group.
                log.error("spool write failed (%s): %s; events are refused until it recovers",
                          failure[0], str(exc))  # fmt: skip
            self.failing = failure[0]
            for item in group:
                item.tracker.settle(item.seq, failure, item.event.kind)
            _release(group)
            return
        if self.failing is not None:
            log.warning("spool writes work again (after %s)", self.failing)
            self.failing = None
        self.groups += 1
        refused = sum(result == "spool_full" for result in results)
        if refused and not self.full:
            log.warning("spool is full (spool_max_bytes): refusing crash and corpus events, "
                        "dropping the oldest stats and coverage")  # fmt: skip
        elif not refused and self.full:
            log.info("spool has room again")
        self.full = bool(refused)
        handed: list[tuple[str, bytes]] = []
        hold: Reservation | None = None
        touched: dict[AckTracker, None] = {}
        for item, result, new in zip(group, results, blobs, strict=True):
            touched[item.tracker] = None
            if result is None:
                self.committed += 1
                item.tracker.settle(item.seq, None, wake=False)
                if new and self._writer is not None:  # journalled: the writer keeps them
                    handed.extend(new)
                    if item.hold is not None:
                        moved = item.hold.split(sum(len(data) for _, data in new))
                        if hold is None:
                            hold = moved
                        else:
                            hold.absorb(moved)
            else:
                error = (result, _REFUSALS.get(result, result))
                item.tracker.settle(item.seq, error, item.event.kind, wake=False)
        for tracker in touched:
            tracker.ack_or_wake()
        _release(group)
        if handed and self._writer is not None:
            self._writer.take(handed, hold)
        if self._rows_to is not None:
            self._rows_to(stored)
        for callback in self._listeners:
            callback()

    async def _store(
        self, group: list[Pending], stored: list[Spooled]
    ) -> tuple[list[str | None], list[list[tuple[str, bytes]]]]:
        """Write the group durably: here, fsync included, when the group is small and the
        spool free at once (:meth:`Spool.append_now`), else in a worker thread. Not
        cancellable: a commit that started finishes, so its acks are true. ``stored`` gets
        the rows stored.

        Why not always the thread: its Python (a crash's fields, the spool's rows) competes
        for the GIL with the event loop, and the hop there and back costs more CPU than the
        fsync it saves the loop from waiting out: about a fifth of the daemon's CPU per
        delivered crash (docs/performance.md, round 4). A disk whose COMMIT takes longer than
        SLOW_COMMIT_S sends every commit to the thread for SLOW_DISK_HOLD_S: a stalling disk
        holds the loop once, not at every group.
        """
        if time.monotonic() >= self.threaded_until and _small(group):
            events, sizes, keys, blobs = self._prepare(group)
            results = self.spool.append_now(events, sizes, keys, blobs, stored)  # fsync too
            if results is not None:
                self.inline += 1
            else:  # the pipeline deleting, the input writer, another process: wait there
                results = await threads.run_sync(self.spool.append, events, sizes, keys, blobs,
                                                 stored)  # fmt: skip
            self._check_disk()
            return results, blobs
        # Without the worker's traceback: it would keep the group alive (threads.py).
        out = await threads.run_sync(self._write, group, stored)
        self._check_disk()
        return out

    def _check_disk(self) -> None:
        """After a COMMIT slower than SLOW_COMMIT_S, commit in the worker for a while."""
        took = self.spool.last_commit_s
        if took <= SLOW_COMMIT_S:
            return
        now = time.monotonic()
        if now >= self.threaded_until:
            log.warning("a spool commit took %.3fs: committing in a worker thread for %gs, so "
                        "that a slow disk does not hold the daemon's event loop", took,
                        SLOW_DISK_HOLD_S)  # fmt: skip
        self.threaded_until = now + SLOW_DISK_HOLD_S

    def _write(
        self, group: list[Pending], stored: list[Spooled]
    ) -> tuple[list[str | None], list[list[tuple[str, bytes]]]]:
        prepared = self._prepare(group)
        return self.spool.append(*prepared, stored), prepared[3]

    def _prepare(
        self, group: list[Pending]
    ) -> tuple[list[Event], list[int], list[list[str] | None], list[list[tuple[str, bytes]]]]:
        """The spool's rows of a group: crash inputs hashed (and their files named), corpus
        contents hashed, dedupe keys."""
        events: list[Event] = []
        sizes: list[int] = []
        keys: list[list[str] | None] = []
        blobs: list[list[tuple[str, bytes]]] = []
        inputs = self.inputs
        for item in group:
            event, size, dedupe, new = item.event, 0, None, []
            if isinstance(item.input, bytes):  # a crash input
                sha = inputs.digest(item.input)
                fields = dict(event.fields)
                path = inputs.file_name(sha)
                fields.update(hash=sha, size=len(item.input), file_path=path)
                fields.setdefault("is_unique", True)
                event = event.with_fields(fields)
                size = len(item.input)
                # Journal it even if the file may exist: a stat per crash on the commit path
                # costs more than the rare extra row, and the writer skips existing files.
                new.append((sha, item.input))
                # Per bug (its report's signature), per input, or not at all (bugs.py).
                event, dedupe = crash_key(event, sha, self.crash_dedupe)
            elif event.kind is Kind.CORPUS:
                files = list(event.fields["files"])
                if item.input is not None:  # contents: dedupe by what the files hold
                    hashes = [inputs.digest(data) for data in item.input]
                    new = list(zip(hashes, item.input, strict=True))
                    entry_sizes = [len(data) for data in item.input]
                    size = sum(entry_sizes)
                    fields = {**event.fields, "hashes": hashes, "sizes": entry_sizes}
                    fields["total_size"] = size  # measured, not what the producer claimed
                    event = event.with_fields(fields)
                    dedupe = [f"sha256:{h}" for h in hashes]
                else:
                    dedupe = [f"name:{name}" for name in files]
            events.append(event)
            sizes.append(size)
            keys.append(dedupe)
            blobs.append(new)
        return events, sizes, keys, blobs


def _small(group: list[Pending]) -> bool:
    """Is ``group`` small enough to write on the event loop's thread (INLINE_MAX_*)?"""
    if len(group) > INLINE_MAX_EVENTS:
        return False
    total = 0
    for item in group:
        data = item.input
        if data is not None:
            total += len(data) if isinstance(data, bytes) else sum(map(len, data))
        if item.event.kind is _CRASH:  # a report is parsed for its bug's signature
            fields = item.event.fields
            total += len(fields.get("output", "")) + len(fields.get("stack_trace", ""))
    return total <= INLINE_MAX_BYTES


def _release(group: list[Pending]) -> None:
    """The group is written (or refused): the memory its events held is free."""
    for item in group:
        if item.hold is not None:
            item.hold.release()


def _write_failure(exc: BaseException) -> tuple[str, str]:
    text = str(exc)
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(exc, sqlite3.OperationalError) and "full" in text
    )
    if full:
        return "disk_full", (
            f"the spool's disk is full ({text}); the event was not stored: retry later"
        )
    return "spool_write_failed", f"the daemon could not store the event ({text}): retry later"


_REFUSALS = {
    ID_CONFLICT: ID_CONFLICT_MESSAGE,
    "spool_full": "the spool is full (spool_max_bytes); crash and corpus events are refused, "
    "not dropped: deliver or raise the limit",
}
