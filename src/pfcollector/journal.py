"""The spool's input journal, and transactions that only forget.

:class:`InputJournal` is the part of :class:`~pfcollector.spool.Spool` that keeps crash inputs
and corpus bytes whose files are not durable yet (table ``pending_inputs``): the group commit
journals them with their events; :class:`~pfcollector.inputwriter.InputWriter` writes the
files and then drops them here. Same rules as the spool: blocking calls, one at a time under
its lock.

**Forgetting needs no fsync of its own** (:meth:`InputJournal._forgetting`). Dropping a journal
row whose file is durable, a delivered event, a retry count: if such a commit is lost, the
journal row is written to its file again (the same bytes), or the event is delivered again
(the master keeps one row per id). None of it loses an acknowledged event. So these
transactions commit with ``synchronous=NORMAL``: their WAL frames become durable with the next
group commit's fsync (the WAL is written in order) or checkpoint, instead of paying an fsync
each while holding the spool's lock, which the group commit, and every producer's ack, waited
behind. A ``kill -9`` loses nothing either way: the frames are in the file.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence

from .deadletters import rollback

__all__ = ["InputJournal"]


class InputJournal:
    """Inputs waiting for their file; mixed into the spool, whose connection and lock it shares."""

    _lock: threading.Lock
    _db: sqlite3.Connection

    @contextlib.contextmanager
    def _forgetting(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that only forgets: committed without an fsync of its own.
        Call it holding the lock."""
        db = self._db
        db.execute("PRAGMA synchronous=NORMAL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                rollback(db)
                raise
        finally:
            db.execute("PRAGMA synchronous=FULL")

    def pending_input_sizes(self, max_bytes: int = 32 * 1024 * 1024) -> list[tuple[str, int]]:
        """``(sha256, size)`` of inputs whose file is not durable yet, up to about ``max_bytes``
        (at least one). Reads no blob: the caller reserves memory before :meth:`read_inputs`."""
        out: list[tuple[str, int]] = []
        total = 0
        with self._lock:
            for sha256, size in self._db.execute(
                "SELECT sha256, length(data) FROM pending_inputs"
            ):
                out.append((sha256, size))
                total += size
                if total >= max_bytes:
                    break
        return out

    def read_inputs(self, shas: Sequence[str]) -> list[tuple[str, bytes]]:
        """The bytes of these pending inputs (those still pending), one blob at a time."""
        out: list[tuple[str, bytes]] = []
        with self._lock:
            for sha256 in shas:
                row = self._db.execute(
                    "SELECT data FROM pending_inputs WHERE sha256 = ?", (sha256,)
                ).fetchone()
                if row is not None:
                    out.append((sha256, row[0]))
        return out

    def drop_inputs(self, shas: Sequence[str]) -> None:
        """Forget inputs whose files are now durable (one transaction, no fsync of its own)."""
        with self._lock, self._forgetting() as db:
            db.executemany("DELETE FROM pending_inputs WHERE sha256 = ?", [(s,) for s in shas])

    def pending_input_count(self) -> int:
        """How many inputs wait for their file."""
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM pending_inputs").fetchone()
        return int(n)
