"""Dead letters: events the master refused as poison, kept with its answer until an operator
puts them back in line (``pfcollector dead-letters retry``).

:class:`DeadLetters` is the part of :class:`~pfcollector.spool.Spool` that lists and requeues
them; moving an event *into* the dead letters is part of settling a delivery, so it stays in
the spool module. Same rules as the spool: blocking calls, one at a time under its lock.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

__all__ = ["EVENT_COLUMNS", "DeadLetters", "rollback"]

#: The columns an event has in both the ``events`` and the ``dead_letters`` table.
EVENT_COLUMNS = (
    "id, kind, job_id, fuzzer, ts_ns, received_ns, peer_pid, peer_uid, body, size, attempts"
)


class DeadLetters:
    """Listing and requeueing dead letters; mixed into the spool, whose state it shares."""

    _lock: threading.Lock
    _db: sqlite3.Connection
    _count: Counter[str]
    _bytes: Counter[str]

    def _bump(self, delta: Counter[tuple[str, str]]) -> None:
        raise NotImplementedError  # the spool's

    def _reload_totals(self) -> None:
        raise NotImplementedError  # the spool's

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest dead letters, with the master's answer."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, job_id, status, error, failed_ns, attempts FROM dead_letters "
                "ORDER BY failed_ns DESC LIMIT ?",
                (limit,),
            ).fetchall()
        keys = ("id", "kind", "job_id", "status", "error", "failed_ns", "attempts")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def retry_dead_letters(
        self, ids: Sequence[str] | None = None, found: list[str] | None = None
    ) -> int:
        """Put dead letters (all, or those named) back in line for delivery. Returns how many.

        They get new sequence numbers, so a running pipeline picks them up like new events.
        A dead letter whose id is back in the spool already (sent again by its producer) is
        not stored twice, and counts in neither the spool's totals nor the result. ``found``,
        if given, gets the id of every dead letter taken (so a caller can name the ids that
        are none).
        """
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                where, args = "", tuple[str, ...]()
                if ids is not None:
                    where = f" WHERE id IN ({','.join('?' * len(ids))})"
                    args = tuple(ids)
                rows = db.execute(
                    f"DELETE FROM dead_letters{where} RETURNING {EVENT_COLUMNS}", args
                ).fetchall()
                delta: Counter[tuple[str, str]] = Counter()
                requeued = 0
                for row in rows:
                    if found is not None:
                        found.append(row[0])
                    delta[row[1], "dead_lettered"] -= 1
                    cur = db.execute(
                        f"INSERT OR IGNORE INTO events ({EVENT_COLUMNS}) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        row,
                    )
                    if cur.rowcount == 1:  # only what was stored counts toward the totals
                        self._count[row[1]] += 1
                        self._bytes[row[1]] += row[9]
                        requeued += 1
                self._bump(delta)
                db.execute("COMMIT")
            except BaseException:
                rollback(db)
                self._reload_totals()
                raise
        return requeued


def rollback(db: sqlite3.Connection) -> None:
    """Roll back the open transaction, if there still is one."""
    # After SQLITE_FULL (a full disk) SQLite may have rolled back already; a ROLLBACK then
    # raises "no transaction is active" and would hide the error that matters.
    if db.in_transaction:
        db.execute("ROLLBACK")
