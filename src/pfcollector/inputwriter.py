"""Crash inputs and corpus bytes from the spool's journal into their files, off the ack path.

The group commit acknowledges a crash once its input is journalled in the spool (one fsync
for the group). This task then writes the content-addressed files in batches (one ``syncfs``
per batch: :meth:`pfcollector.inputs.InputStore.write`) and drops the journal rows in one
transaction. At every moment an acknowledged input is durable in the journal or in its file.

Where the bytes come from:

* **handed over by the commit** (:meth:`InputWriter.take`): the bytes the event brought are
  still in memory after its commit, with their share of the memory budget, so the writer keeps
  them instead of reading them back from SQLite (that read cost a blob read and two copies per
  input: SQLite's buffer and Python's). The writer keeps at most an eighth of the budget this
  way; past it the commit lets go of them and they wait in the journal;
* **the journal** (:meth:`pfcollector.spool.Spool.pending_input_sizes`): whatever a previous
  run left, inputs the writer did not keep, and those whose write failed. Read first while it
  has any that are not handed over (so a queue that never empties cannot starve them), with the
  memory reserved before the read.

Error handling:
    A write that fails (a full disk) is logged once and retried with a backoff; the bytes stay
    in the journal meanwhile (handed-over copies are let go and read back later), so nothing
    is lost.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from typing import Protocol

import trio

from . import threads
from .inputs import InputStore
from .membudget import MemoryBudget, Reservation
from .spool import Spool

__all__ = ["GATHER_INPUTS_S", "FileWrites", "InputWriter", "ThreadWrites"]

log = logging.getLogger("pfcollector.ingest")

#: How long the input writer lets newly committed inputs gather before writing their files.
GATHER_INPUTS_S = 0.05

Batch = list[tuple[str, bytes]]


class FileWrites(Protocol):
    """Writes a batch's files durably (:meth:`InputStore.write`), somewhere off the loop."""

    async def start(self) -> None: ...

    async def write(self, items: Sequence[tuple[str, bytes]]) -> None: ...

    async def aclose(self) -> None: ...


class ThreadWrites:
    """:meth:`InputStore.write` in trio's worker thread."""

    def __init__(self, inputs: InputStore) -> None:
        self.inputs = inputs

    async def start(self) -> None:
        pass

    async def write(self, items: Sequence[tuple[str, bytes]]) -> None:
        await threads.run_sync(self.inputs.write, items)

    async def aclose(self) -> None:
        pass


class InputWriter:
    """Writes journalled inputs into their files, then forgets them in the journal."""

    def __init__(
        self,
        spool: Spool,
        inputs: InputStore,
        budget: MemoryBudget | None = None,
        files: FileWrites | None = None,
    ) -> None:
        self.spool = spool
        self.inputs = inputs
        #: Who writes the files: a worker thread unless given (the daemon gives a child
        #: process, :class:`pfcollector.inputproc.InputProcess`).
        self.files: FileWrites = files or ThreadWrites(inputs)
        self.written = 0
        #: Inputs handed over by commits (rather than read back from the journal), since start.
        self.handed = 0
        self._wake = trio.Event()
        self._budget = budget or MemoryBudget()
        # A batch holds an eighth of the memory budget at most (one input past it).
        self._batch_bytes = max(1, self._budget.capacity // 8)
        self._read = Reservation(self._budget)  # what a batch read from the journal holds
        self._queue: Batch = []
        self._queued_bytes = 0
        self._queue_hold = Reservation(self._budget)
        # The journal may hold inputs nobody handed over (a previous run's, ones past the
        # writer's share, ones whose write failed): read it before the queue until it has none,
        # so they are not starved by a queue that never empties.
        self._behind = True
        self._waiting = False  # waiting for memory to read the journal (see _from_journal)

    def notify(self) -> None:
        """New inputs were committed (in the journal)."""
        self._wake.set()

    def take(self, items: Batch, hold: Reservation | None) -> None:
        """Keep ``items``, just committed to the journal, to write from memory.

        ``hold`` is their share of the memory budget, now the writer's (released here when the
        writer already keeps its eighth: those wait in the journal instead).
        """
        nbytes = sum(len(data) for _, data in items)
        if self._waiting or (self._queue and self._queued_bytes + nbytes > self._batch_bytes):
            if hold is not None:
                hold.release()
            self._behind = True
            self._wake.set()
            return
        self._queue.extend(items)
        self._queued_bytes += nbytes
        if hold is not None:
            self._queue_hold.absorb(hold)
        else:  # bytes nobody counted (the outbox importer's): counted now, past the limit
            self._queue_hold.grow(nbytes)
        self.handed += len(items)
        self._wake.set()

    async def run(self) -> None:
        """Write batches until cancelled."""
        try:
            await self.files.start()  # ready before the first crash's batch
            await self._run()
        finally:
            await self.files.aclose()

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            hold: Reservation | None = None
            try:
                batch: Batch = []
                if self._behind or not self._queue:
                    hold = self._read
                    got = await self._from_journal()
                    if got is not None:  # None: no memory now; the queue first, then again
                        batch = got
                        self._behind = bool(got)
                if not batch and self._queue:
                    batch, hold = self._queue, self._queue_hold
                    self._queue, self._queued_bytes = [], 0
                    self._queue_hold = Reservation(self._budget)
                if not batch:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    # Let a few commits' inputs gather: one syncfs and one DELETE for them all
                    # instead of one per commit (the bytes are durable in the journal).
                    await trio.sleep(GATHER_INPUTS_S)
                    continue
                await self.files.write(batch)
                await threads.run_sync(self.spool.drop_inputs, [sha for sha, _ in batch])
                written, batch = len(batch), []
            except (OSError, sqlite3.Error) as exc:  # a full disk: files or spool
                batch = []
                self._behind = True  # what was in memory is let go: the journal has it
                if not backoff:
                    log.error("cannot write crash input files (%s); their bytes stay in the "
                              "spool and are written when it works", str(exc))  # fmt: skip
                backoff = min(max(backoff * 2, 0.5), 30.0)
                await trio.sleep(backoff)
                continue
            finally:
                if hold is not None:
                    hold.release()
            if backoff:
                log.warning("crash input files are written again")
                backoff = 0.0
            self.written += written

    async def _from_journal(self) -> Batch | None:
        """Inputs waiting in the journal that nobody handed over, up to a batch; None when
        their memory is not free now and the writer has a queue to write first.

        The writer waits for memory only holding none: with a queue of its own it does not
        wait (the readers its queue keeps waiting could be what it waits for), and while it
        waits, :meth:`take` leaves new inputs in the journal.
        """
        sizes = await trio.to_thread.run_sync(self.spool.pending_input_sizes, self._batch_bytes)
        queued = {sha for sha, _ in self._queue}  # handed over while the sizes were read
        sizes = [(sha, size) for sha, size in sizes if sha not in queued]
        if not sizes:
            return []
        # Reserved before anything is read (SQLite's own buffer for the blob it reads is in
        # the share the daemon sets aside for SQLite's copies at start).
        need = sum(size for _, size in sizes)
        if not self._read.try_ensure(need):
            if self._queue:
                return None
            self._waiting = True
            try:
                await self._read.ensure(need)
            finally:
                self._waiting = False
        batch = await threads.run_sync(self.spool.read_inputs, [sha for sha, _ in sizes])
        self._read.shrink(sum(len(data) for _, data in batch))
        return batch
