"""The durable SQLite store: every accepted event lives here until the master has it.

One table of undelivered events in arrival order (``seq``, AUTOINCREMENT so a sequence number
is never reused and a reader's cursor never misses a row), one table of dead letters (batches
the master refused as poison), and per-kind counters. In local mode (no master) the spool is
simply the local store: events stay until the size limit makes room.

Durability: WAL with ``synchronous=FULL``; :meth:`Spool.append` writes a whole group of events
in one transaction, so many events share one fsync (group commit). An event is acknowledged to
its producer only after the transaction holding it has committed.

Resource handling:
    One ``sqlite3`` connection writes, one call at a time under a lock: from worker threads
    (``trio.to_thread``), and :meth:`Spool.append_now` from the event loop's thread when
    nothing has to be waited for. :meth:`Spool.read_after` reads on a second connection.
    :meth:`Spool.close` checkpoints the WAL.

Error handling:
    ``sqlite3.Error`` and ``OSError`` propagate to the caller: the group commit turns them into
    an error reply for every event of the group (nothing of the group is acknowledged).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from . import bugs, idcheck
from .deadletters import EVENT_COLUMNS as _COLUMNS
from .deadletters import DeadLetters
from .deadletters import rollback as _rollback
from .events import DURABLE_KINDS, Event, Kind
from .journal import InputJournal
from .packing import pack
from .seen import SeenKeys
from .spoolstatus import COUNTERS, SpoolStatus

__all__ = ["COUNTERS", "Spool", "SpoolCorrupt", "Spooled"]

# An event's attempts count its failed rounds so far; a dead letter's count the last one too.
_DEAD_COLUMNS = _COLUMNS.replace("attempts", "attempts + 1")
SCHEMA_VERSION = 1
log = logging.getLogger(__name__)
_T = TypeVar("_T")
#: How long a write waits for SQLite's write lock held by another connection (a second
#: process opening the spool, say) before it fails.
BUSY_TIMEOUT_MS = 5000
_CHUNK = 500  # ids per statement (SQLite's variable limit is 32766; keep statements small)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    job_id      TEXT NOT NULL,
    fuzzer      TEXT NOT NULL,
    ts_ns       INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    peer_pid    INTEGER NOT NULL,
    peer_uid    INTEGER NOT NULL,
    body        BLOB NOT NULL,
    size        INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS events_kind_seq ON events(kind, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    job_id      TEXT NOT NULL,
    fuzzer      TEXT NOT NULL,
    ts_ns       INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    peer_pid    INTEGER NOT NULL,
    peer_uid    INTEGER NOT NULL,
    body        BLOB NOT NULL,
    size        INTEGER NOT NULL,
    attempts    INTEGER NOT NULL,
    status      INTEGER,
    error       TEXT NOT NULL,
    failed_ns   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    kind  TEXT NOT NULL,
    name  TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pending_inputs (
    sha256 TEXT PRIMARY KEY,
    data   BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen (
    kind     TEXT NOT NULL,
    job_id   TEXT NOT NULL,
    key      TEXT NOT NULL,
    first_id TEXT NOT NULL,
    hits     INTEGER NOT NULL,
    last_ns  INTEGER NOT NULL,
    PRIMARY KEY (kind, job_id, key)
) WITHOUT ROWID;
"""


class SpoolCorrupt(Exception):
    """The spool database cannot be read. The message names the file and SQLite's complaint."""


@dataclass(frozen=True, slots=True)
class Spooled:
    """An undelivered event as read back from the spool."""

    seq: int
    event: Event
    #: Bytes counted against the spool limit (the event, plus a crash input stored aside).
    size: int
    attempts: int
    #: Bytes of the event's own fields: what the batch byte budget counts (inputs are not
    #: part of the master's JSON).
    wire_size: int = 0


class Spool(DeadLetters, InputJournal, SeenKeys, SpoolStatus):
    """The durable store. Every method is blocking and thread-safe; call from a worker thread
    (:meth:`append_now` never waits: the event loop's thread may call it).

    Listing and requeueing dead letters: :class:`~pfcollector.deadletters.DeadLetters`.
    """

    def __init__(self, path: Path, *, max_bytes: int = 1024**3) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        #: Seconds the last group's COMMIT took (its fsync, mostly).
        self.last_commit_s = 0.0
        self._reads: sqlite3.Connection | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            # Debian builds SQLite with secure_delete on: every delivered row and every
            # written input's journal blob was overwritten with zeros, a second write of each.
            # FAST zeroes what costs no extra I/O; the inputs themselves stay in their files.
            self._db.execute("PRAGMA secure_delete=FAST")
            self._db.executescript(_SCHEMA + bugs.SCHEMA)
            idcheck.migrate(self._db)
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
            rows = self._db.execute(
                "SELECT kind, COUNT(*), COALESCE(SUM(size), 0) FROM events GROUP BY kind"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise SpoolCorrupt(f"spool database {self.path} cannot be read: {exc}") from exc
        self._count: Counter[str] = Counter({kind: n for kind, n, _ in rows})
        self._bytes: Counter[str] = Counter({kind: b for kind, _, b in rows})

    # -- writing -------------------------------------------------------------------------

    def append(
        self,
        events: Sequence[Event],
        sizes: Sequence[int] | None = None,
        keys: Sequence[Sequence[str] | None] | None = None,
        blobs: Sequence[Sequence[tuple[str, bytes]]] | None = None,
        stored: list[Spooled] | None = None,
    ) -> list[str | None]:
        """Store a group of events in one durable transaction.

        Returns, per event, ``None`` when it is stored (or was already: a producer's resend,
        and storing it again would duplicate it), or the code it was refused with:
        ``"spool_full"``, or ``"id_conflict"`` when its id is stored for a different event
        (:mod:`pfcollector.idcheck`). When the spool is full, stats, coverage and lifecycle
        events make room by dropping the oldest of their own kind; crash and corpus events
        are refused, never dropped. ``sizes`` adds bytes stored outside the database (crash
        inputs) to each event's accounted size. ``keys`` are dedupe keys per event (a
        crash's signature, or one key per corpus entry): an event whose keys were all seen
        in its job under another id is accepted but only counted (``deduped``, and a hit on
        the first one); a corpus event keeps only its unseen entries. ``blobs`` are the
        ``(sha256, bytes)`` of inputs an event refers to that are not on disk yet: kept
        here, in the event's own transaction, until :meth:`drop_inputs` says the files are
        durable. ``stored``, if given, gets each row the commit stored, as :meth:`read_after`
        would read it back (the delivery pipeline takes them from memory: pipeline.py).
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            return self._write_group(events, sizes, keys, blobs, stored)

    def append_now(
        self,
        events: Sequence[Event],
        sizes: Sequence[int] | None = None,
        keys: Sequence[Sequence[str] | None] | None = None,
        blobs: Sequence[Sequence[tuple[str, bytes]]] | None = None,
        stored: list[Spooled] | None = None,
    ) -> list[str | None] | None:
        """:meth:`append`, if nothing has to be waited for; else ``None``, nothing written.

        For the event loop's own thread (ingest.py): it never waits for the lock (another
        thread's write) or for SQLite's write lock (another connection: ``busy_timeout`` 0).
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            db = self._db
            db.execute("PRAGMA busy_timeout=0")
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error:
                return None
            finally:
                db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            return self._write_group(events, sizes, keys, blobs, stored)
        finally:
            self._lock.release()

    def _write_group(
        self,
        events: Sequence[Event],
        sizes: Sequence[int] | None,
        keys: Sequence[Sequence[str] | None] | None,
        blobs: Sequence[Sequence[tuple[str, bytes]]] | None,
        stored: list[Spooled] | None,
    ) -> list[str | None]:
        """Inserts and COMMIT in the transaction the caller began, holding the lock."""
        rows: list[Spooled] = []
        try:
            results = self._insert(events, sizes, keys, blobs, rows)
            self._commit()
        except BaseException:
            _rollback(self._db)
            self._reload_totals()
            raise
        if stored is not None:
            stored.extend(rows)
        return results

    def _commit(self) -> None:
        started = time.monotonic()
        self._db.execute("COMMIT")
        self.last_commit_s = time.monotonic() - started

    def _insert(
        self,
        events: Sequence[Event],
        sizes: Sequence[int] | None,
        keys: Sequence[Sequence[str] | None] | None,
        blobs: Sequence[Sequence[tuple[str, bytes]]] | None,
        rows: list[Spooled],
    ) -> list[str | None]:
        """The rows of a group, inside its transaction (the caller commits); ``rows`` gets
        each one stored."""
        results: list[str | None] = []
        delta: Counter[tuple[str, str]] = Counter()
        # Written once per group (executemany), not per event: the per-statement cost, not
        # SQLite's per-row cost, is what a crash-heavy group pays.
        seen_rows: list[tuple[str, str, str, str, int]] = []
        hit_rows: list[tuple[int, str, str, str]] = []
        blob_rows: list[tuple[str, bytes]] = []
        db = self._db
        dropped: set[int] = set()  # rows deleted to make room, this group's among them
        now = time.time_ns()
        known = self._seen_before(events, keys) if keys is not None else {}
        for i, ev in enumerate(events):
            sent = ev.fields  # what the producer sent, before dedupe trims a corpus
            fresh: list[str] = []
            event_keys = keys[i] if keys is not None else None
            if event_keys:
                deduped = self._dedupe(ev, event_keys, known, hit_rows, now, delta)
                if deduped is None:
                    results.append(None)  # a repeat: counted, durably, not resent
                    if blobs is not None and bugs.is_bug_key(event_keys):
                        blob_rows.extend(blobs[i])  # another input of a known bug
                    continue
                ev, fresh = deduped
            body = pack(dict(ev.fields))
            digest = idcheck.body_digest(body if ev.fields is sent else pack(sent))
            size = len(body) + (sizes[i] if sizes else 0)
            if self.total_bytes + size > self.max_bytes and not self._make_room(
                ev.kind, size, delta, dropped
            ):
                delta[ev.kind, "refused"] += 1
                results.append("spool_full")
                continue
            cur = db.execute(
                f"INSERT OR IGNORE INTO events ({_COLUMNS}, digest) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (
                    ev.id,
                    ev.kind.value,
                    ev.job_id,
                    ev.fuzzer,
                    ev.timestamp_ns,
                    now,
                    ev.peer_pid,
                    ev.peer_uid,
                    body,
                    size,
                    digest,
                ),
            )
            if cur.rowcount == 0 and idcheck.conflict(db, ev, digest):
                results.append(idcheck.ID_CONFLICT)  # not a resend: refused
                continue
            if cur.rowcount == 1:
                self._count[ev.kind] += 1
                self._bytes[ev.kind] += size
                delta[ev.kind, "accepted"] += 1
                rows.append(Spooled(cur.lastrowid or 0, ev, size, 0, len(body)))
            if blobs is not None and blobs[i]:
                blob_rows.extend(blobs[i])
            for key in fresh:  # only now: a refused event must not make repeats "seen"
                known[ev.kind.value, ev.job_id, key] = ev.id
                seen_rows.append((ev.kind.value, ev.job_id, key, ev.id, now))
            results.append(None)
        if dropped and rows:  # a row of this group made room for a later one
            rows[:] = [row for row in rows if row.seq not in dropped]
        db.executemany("INSERT OR IGNORE INTO pending_inputs VALUES (?, ?)", blob_rows)
        db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?, 1, ?)", seen_rows)
        db.executemany(
            "UPDATE seen SET hits = hits + 1, last_ns = ? "
            "WHERE kind = ? AND job_id = ? AND key = ?",
            hit_rows,
        )
        self._bump(delta)
        return results

    def read(self, query: Callable[..., _T], *args: Any) -> _T:
        """``query(db, *args)`` under the lock: a read of the dedupe tables (:mod:`.bugs`)."""
        with self._lock:
            return query(self._db, *args)

    def _make_room(
        self, kind: Kind, size: int, delta: Counter[tuple[str, str]], dropped: set[int]
    ) -> bool:
        if kind in DURABLE_KINDS:
            return False
        need = self.total_bytes + size - self.max_bytes
        rows = self._db.execute(
            "SELECT seq, size FROM events WHERE kind = ? ORDER BY seq LIMIT 1000", (kind.value,)
        ).fetchall()
        victims, freed = [], 0
        for seq, victim_size in rows:
            if freed >= need:
                break
            victims.append(seq)
            freed += victim_size
        if freed < need:
            return False
        self._db.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s in victims])
        dropped.update(victims)
        self._count[kind] -= len(victims)
        self._bytes[kind] -= freed
        delta[kind, "dropped"] += len(victims)
        return True

    def _bump(self, delta: Counter[tuple[str, str]]) -> None:
        if delta:
            self._db.executemany(
                "INSERT INTO counters VALUES (?, ?, ?) "
                "ON CONFLICT (kind, name) DO UPDATE SET value = value + excluded.value",
                [(kind, name, n) for (kind, name), n in delta.items() if n],
            )

    def _reload_totals(self) -> None:
        rows = self._db.execute(
            "SELECT kind, COUNT(*), COALESCE(SUM(size), 0) FROM events GROUP BY kind"
        ).fetchall()
        self._count = Counter({kind: n for kind, n, _ in rows})
        self._bytes = Counter({kind: b for kind, _, b in rows})

    # -- reading and settling ------------------------------------------------------------

    def read_after(self, cursor: int, limit: int) -> list[Spooled]:
        """Up to ``limit`` undelivered events with ``seq > cursor``, oldest first.

        On a connection of its own (WAL: readers and the writer do not wait for each other),
        so the delivery pipeline's reads never hold up a group commit.
        """
        with self._read_lock:
            if self._reads is None:
                self._reads = sqlite3.connect(self.path, isolation_level=None,
                                              check_same_thread=False)  # fmt: skip
                self._reads.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            rows = self._reads.execute(
                f"SELECT seq, {_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (cursor, limit),
            ).fetchall()
        return [_spooled(row) for row in rows]

    def delivered(self, ids: Iterable[str]) -> int:
        """Forget events the master has; count them as delivered. Returns how many."""
        return self._remove(list(ids), "delivered", None)

    def dead_letter(self, failures: Sequence[tuple[str, int | None, str]]) -> int:
        """Move events the master refused (``(id, status, error)``) to the dead letters."""
        return self._remove([f[0] for f in failures], "dead_lettered", failures)

    def _remove(
        self, ids: list[str], counter: str, failures: Sequence[tuple[str, int | None, str]] | None
    ) -> int:
        delta: Counter[tuple[str, str]] = Counter()
        removed = 0
        with self._lock:
            try:
                with self._forgetting() as db:  # lost, it is delivered again (journal.py)
                    if failures is not None:
                        now = time.time_ns()
                        db.executemany(
                            "INSERT OR REPLACE INTO dead_letters "
                            f"({_COLUMNS}, status, error, failed_ns) "
                            f"SELECT {_DEAD_COLUMNS}, ?, ?, ? FROM events WHERE id = ?",
                            [(status, error, now, id_) for id_, status, error in failures],
                        )
                    for start in range(0, len(ids), _CHUNK):
                        chunk = ids[start : start + _CHUNK]
                        marks = ",".join("?" * len(chunk))
                        for kind, size in db.execute(
                            f"DELETE FROM events WHERE id IN ({marks}) RETURNING kind, size",
                            chunk,
                        ).fetchall():
                            self._count[kind] -= 1
                            self._bytes[kind] -= size
                            delta[kind, counter] += 1
                            removed += 1
                    self._bump(delta)
            except BaseException:
                self._reload_totals()
                raise
        return removed

    def note_retry(self, ids: Sequence[str]) -> None:
        """Count one more failed delivery round for these events."""
        delta: Counter[tuple[str, str]] = Counter()
        with self._lock, self._forgetting() as db:  # a lost count is no lost event
            for start in range(0, len(ids), _CHUNK):
                chunk = list(ids[start : start + _CHUNK])
                marks = ",".join("?" * len(chunk))
                for (kind,) in db.execute(
                    f"UPDATE events SET attempts = attempts + 1 WHERE id IN ({marks}) "
                    "RETURNING kind",
                    chunk,
                ).fetchall():
                    delta[kind, "retried"] += 1
            self._bump(delta)

    def close(self) -> None:
        """Checkpoint the WAL and close the database."""
        with self._read_lock:
            if self._reads is not None:
                self._reads.close()
                self._reads = None
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()


def _spooled(row: tuple[Any, ...]) -> Spooled:
    seq, id_, kind, job_id, fuzzer, ts_ns, _received, pid, uid, body, size, attempts = row
    event = Event(
        id=id_,
        kind=Kind(kind),
        job_id=job_id,
        fuzzer=fuzzer,
        timestamp_ns=ts_ns,
        fields=msgpack.unpackb(body, raw=False),
        peer_pid=pid,
        peer_uid=uid,
    )
    return Spooled(seq=seq, event=event, size=size, attempts=attempts, wire_size=len(body))
