"""The spool's figures for ``status``, and its small key-value store and integrity check.

:class:`SpoolStatus` is the part of :class:`~pfcollector.spool.Spool` that reads: the totals it
keeps in memory, the counters and ages from the database. Same rules as the spool: blocking
calls, one at a time under its lock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from typing import Any

from .events import Kind

__all__ = ["COUNTERS", "SpoolStatus"]

#: Per-kind counters kept in the database, so they survive restarts.
COUNTERS = (
    "accepted",
    "deduped",
    "delivered",
    "dropped",
    "dead_lettered",
    "retried",
    "refused",
)


class SpoolStatus:
    """Status, meta values and the integrity check; mixed into the spool, whose state it
    shares."""

    _lock: threading.Lock
    _db: sqlite3.Connection
    _count: Counter[str]
    _bytes: Counter[str]

    @property
    def total_bytes(self) -> int:
        """Bytes of undelivered events (the figure the size limit applies to)."""
        return sum(self._bytes.values())

    @property
    def total_count(self) -> int:
        """Undelivered events of every kind."""
        return sum(self._count.values())

    def status(self) -> dict[str, dict[str, Any]]:
        """Per kind: spooled count and bytes, the oldest undelivered event's age, the counters."""
        with self._lock:
            counters = self._db.execute("SELECT kind, name, value FROM counters").fetchall()
            oldest = self._db.execute(
                "SELECT kind, received_ns FROM events WHERE seq IN "
                "(SELECT MIN(seq) FROM events GROUP BY kind)"
            ).fetchall()
            dead = self._db.execute(
                "SELECT kind, COUNT(*) FROM dead_letters GROUP BY kind"
            ).fetchall()
        now = time.time_ns()
        out: dict[str, dict[str, Any]] = {}
        for kind in Kind:
            entry: dict[str, Any] = {
                "spooled": self._count[kind],
                "spooled_bytes": self._bytes[kind],
                "oldest_age_s": None,
                "dead_letters": 0,
            }
            entry.update(dict.fromkeys(COUNTERS, 0))
            out[kind.value] = entry
        for kind, name, value in counters:
            out.setdefault(kind, {})[name] = value
        for kind, received_ns in oldest:
            out[kind]["oldest_age_s"] = round(max(0, now - received_ns) / 1e9, 3)
        for kind, n in dead:
            out[kind]["dead_letters"] = n
        return out

    def get_meta(self, key: str) -> str | None:
        """A value kept across restarts (the registered bot id, for one)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Keep a value across restarts."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def check(self) -> str:
        """SQLite's integrity check: ``"ok"`` or the first problems found."""
        with self._lock:
            rows = self._db.execute("PRAGMA quick_check(20)").fetchall()
        return "; ".join(str(r[0]) for r in rows)
