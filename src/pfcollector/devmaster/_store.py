"""SQLite storage of the reference master: the master's tables plus two test aids.

One connection guarded by a lock: SQLite serialises writers anyway, and a single connection
also serves an in-memory database (``db_path=None``). A file database runs in WAL mode with
``synchronous=NORMAL``, as a benchmark wants.

Writes are ``INSERT OR REPLACE`` keyed by ``id``, as on the master; an empty ``id`` gets a UUID.
``corpus_updates.files`` is ``NOT NULL``, so a corpus update without ``files`` fails with the
master's own message. ``submissions`` counts how many times each id was stored (a resend shows
as a count above 1), ``status_posts`` keeps what ``/results/status`` received (the master only
logs it).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

__all__ = ["KINDS", "Store", "now_rfc3339"]

#: Kind name to table name. ``status`` is the test aid table of ``/results/status`` posts.
KINDS: Final[Mapping[str, str]] = {
    "crash": "crashes",
    "coverage": "coverage",
    "corpus": "corpus_updates",
    "status": "status_posts",
}
_COLUMNS: Final[Mapping[str, tuple[str, ...]]] = {
    "crash": (
        "id",
        "job_id",
        "bot_id",
        "hash",
        "file_path",
        "type",
        "signal",
        "exit_code",
        "timestamp",
        "size",
        "is_unique",
        "output",
        "stack_trace",
    ),
    "coverage": ("id", "job_id", "bot_id", "edges", "new_edges", "timestamp", "exec_count"),
    "corpus": ("id", "job_id", "bot_id", "files", "timestamp", "total_size"),
}
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS crashes (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, bot_id TEXT NOT NULL, hash TEXT,
    file_path TEXT, type TEXT, signal INTEGER, exit_code INTEGER, timestamp TEXT NOT NULL,
    size INTEGER, is_unique BOOLEAN, output TEXT, stack_trace TEXT);
CREATE TABLE IF NOT EXISTS coverage (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, bot_id TEXT NOT NULL, edges INTEGER,
    new_edges INTEGER, timestamp TEXT NOT NULL, exec_count INTEGER);
CREATE TABLE IF NOT EXISTS corpus_updates (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, bot_id TEXT NOT NULL, files TEXT NOT NULL,
    timestamp TEXT NOT NULL, total_size INTEGER);
CREATE TABLE IF NOT EXISTS status_posts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL, received_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS submissions (
    id TEXT NOT NULL, kind TEXT NOT NULL, count INTEGER NOT NULL, PRIMARY KEY (id, kind));
CREATE TABLE IF NOT EXISTS bots (
    id TEXT PRIMARY KEY, hostname TEXT NOT NULL, name TEXT, capabilities TEXT,
    api_endpoint TEXT, status TEXT, current_job TEXT, last_activity TEXT,
    registered_at TEXT NOT NULL, last_seen TEXT NOT NULL);
"""


def now_rfc3339() -> str:
    """Return the current UTC time as Go's ``time.RFC3339Nano`` prints it."""
    ns = time.time_ns()
    secs, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    digits = f"{frac:09d}".rstrip("0")
    return f"{base}.{digits}Z" if digits else f"{base}Z"


class Store:
    """The reference master's database.

    Args:
        db_path: A file to keep the data in, or None for a private in-memory database.
        cost_per_item: Seconds each stored result item costs on top of the write, spent
            asleep while holding the write lock (writes stay serialised, as on the master):
            ``0.00023`` makes a batch of 100 crashes take about the 23 ms the PandaFuzz
            master takes (``shared/pandafuzz-master-api.md``), so its ceiling is ~4,300/s.

    Resource handling:
        Holds one connection until :meth:`close`; every method is thread-safe.
    """

    def __init__(self, db_path: str | Path | None = None, cost_per_item: float = 0.0) -> None:
        if not cost_per_item >= 0.0:
            raise ValueError(f"cost_per_item must be >= 0 seconds, got {cost_per_item!r}")
        self.cost_per_item = cost_per_item
        self._lock = threading.Lock()
        target = ":memory:" if db_path is None else str(db_path)
        self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        if db_path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._db.close()

    def store_items(
        self, kind: str, items: Sequence[dict[str, Any]], fail_ids: frozenset[str] = frozenset()
    ) -> list[str | None]:
        """Store result items of one kind, each ``INSERT OR REPLACE`` by id, in one transaction.

        Args:
            kind: ``crash``, ``coverage`` or ``corpus``.
            items: Decoded items; an empty ``id`` is replaced, in place, by a new UUID, and a
                missing timestamp by now.
            fail_ids: Ids whose store fails on purpose (fault injection).

        Returns:
            Per item, None when stored or the database's error message (a failed item does not
            undo the others: SQLite rolls back only the failing statement).
        """
        cols = _COLUMNS[kind]
        sql = (
            f"INSERT OR REPLACE INTO {KINDS[kind]} ({', '.join(cols)}) "
            f"VALUES ({', '.join('?' * len(cols))})"
        )
        errors: list[str | None] = []
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for item in items:
                    errors.append(self._store_one(kind, sql, cols, item, fail_ids))
            finally:
                self._db.execute("COMMIT")
            if self.cost_per_item and items:
                time.sleep(self.cost_per_item * len(items))
        return errors

    def _store_one(
        self,
        kind: str,
        sql: str,
        cols: tuple[str, ...],
        item: dict[str, Any],
        fail_ids: frozenset[str],
    ) -> str | None:
        if not item["id"]:
            item["id"] = str(uuid.uuid4())
        if item["timestamp"] is None:
            item["timestamp"] = now_rfc3339()
        if item["id"] in fail_ids:
            return f"injected storage failure for id {item['id']}"
        row = dict(item)
        if kind == "crash":
            row["is_unique"] = item["is_unique"] = True  # the master's dedup stub
        elif kind == "corpus" and row["files"] is not None:
            row["files"] = json.dumps(row["files"])
        try:
            self._db.execute(sql, [row[c] for c in cols])
            self._db.execute(
                "INSERT INTO submissions (id, kind, count) VALUES (?, ?, 1) "
                "ON CONFLICT (id, kind) DO UPDATE SET count = count + 1",
                (item["id"], kind),
            )
        except (sqlite3.Error, UnicodeError, OverflowError) as exc:
            return str(exc)
        return None

    def store_status(self, body: Any) -> None:
        """Keep one ``/results/status`` body."""
        with self._lock:
            self._db.execute(
                "INSERT INTO status_posts (body, received_at) VALUES (?, ?)",
                (json.dumps(body), now_rfc3339()),
            )

    def register_bot(self, req: Mapping[str, Any]) -> str:
        """Record a registered bot and return its new id."""
        bot_id = str(uuid.uuid4())
        now = now_rfc3339()
        with self._lock:
            self._db.execute(
                "INSERT INTO bots (id, hostname, name, capabilities, api_endpoint, status, "
                "registered_at, last_seen) VALUES (?, ?, ?, ?, ?, 'registering', ?, ?)",
                (
                    bot_id,
                    req["hostname"],
                    req["name"],
                    json.dumps(req["capabilities"]),
                    req["api_endpoint"],
                    now,
                    now,
                ),
            )
        return bot_id

    def heartbeat(self, bot_id: str, req: Mapping[str, Any]) -> bool:
        """Update a bot from a heartbeat; False when the bot is unknown."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE bots SET status = ?, current_job = ?, last_activity = ?, last_seen = ? "
                "WHERE id = ?",
                (req["status"], req["current_job"], req["last_activity"], now_rfc3339(), bot_id),
            )
        return cur.rowcount > 0

    def count(self, kind: str) -> int:
        """Rows stored of ``kind`` (``crash``, ``coverage``, ``corpus`` or ``status``)."""
        with self._lock:
            (n,) = self._db.execute(f"SELECT COUNT(*) FROM {KINDS[kind]}").fetchone()
        return int(n)

    def ids(self, kind: str) -> set[str]:
        """Ids stored of ``kind`` (for ``status``, the row numbers as strings)."""
        with self._lock:
            rows = self._db.execute(f"SELECT id FROM {KINDS[kind]}").fetchall()
        return {str(r[0]) for r in rows}

    def rows(self, kind: str) -> list[dict[str, Any]]:
        """All rows of ``kind`` as dicts, JSON columns decoded, in insertion order."""
        with self._lock:
            cur = self._db.execute(f"SELECT * FROM {KINDS[kind]} ORDER BY rowid")
            names = [d[0] for d in cur.description]
            raw = cur.fetchall()
        out = [dict(zip(names, r, strict=True)) for r in raw]
        for row in out:
            if "files" in row:
                row["files"] = json.loads(row["files"])
            if "is_unique" in row:
                row["is_unique"] = bool(row["is_unique"])
            if kind == "status":
                row["body"] = json.loads(row["body"])
        return out

    def submissions(self) -> dict[str, int]:
        """Id to the number of times it was stored (summed over kinds)."""
        with self._lock:
            rows = self._db.execute("SELECT id, SUM(count) FROM submissions GROUP BY id")
            return {str(i): int(n) for i, n in rows}

    def bots(self) -> list[dict[str, Any]]:
        """All registered bots as dicts."""
        with self._lock:
            cur = self._db.execute("SELECT * FROM bots ORDER BY rowid")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    @staticmethod
    def check_kind(kind: str, allowed: Iterable[str] = KINDS) -> None:
        """Raise ValueError unless ``kind`` is one of ``allowed``."""
        if kind not in allowed:
            raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(allowed)}")
