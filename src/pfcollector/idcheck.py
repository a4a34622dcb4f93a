"""An id names one event: telling a resend from a different event under a known id.

A producer sends an event again when it did not see the ack (a reconnect, a restart, an
outbox file written twice), and the daemon stores it once. But ids are chosen by producers,
some predictably (the watchers derive theirs from the host, directory, job and file name),
and every allowed uid shares one spool: an event that only *reuses* an id must not be taken
for a resend, or the real event is acknowledged and dropped while the master holds the
impostor. So a resend is an event with the same id, kind and job, from the same peer uid,
with the same content: the spool keeps a SHA-256 of each event's fields (the crash input is
in them by its hash), and anything else under a stored id is refused with the non-fatal
``id_conflict`` (field ``id``).

Scope: the events the spool holds (undelivered). Once the master has an event its row is
gone, and an event under that id is stored and sent again like a new one (the master keeps
the last write by id).
"""

from __future__ import annotations

import hashlib
import sqlite3

import msgpack

from .events import Event

__all__ = ["ID_CONFLICT", "ID_CONFLICT_MESSAGE", "body_digest", "conflict", "migrate"]

#: The error code of an event refused because its id names another stored event.
ID_CONFLICT = "id_conflict"
ID_CONFLICT_MESSAGE = (
    "field 'id': this id is already stored for another event (another kind, job, sender uid "
    "or content); the event was not stored: an id names one event, use a new one"
)


def body_digest(packed_fields: bytes) -> bytes:
    """SHA-256 of an event's fields as the producer sent them, packed as the spool stores them
    (in schema order, whatever the producer's: :mod:`pfcollector.typed`)."""
    return hashlib.sha256(packed_fields).digest()


def migrate(db: sqlite3.Connection) -> None:
    """Give a spool made before digests were kept its ``digest`` column (NULL for old rows)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
    if "digest" not in columns:
        db.execute("ALTER TABLE events ADD COLUMN digest BLOB")


def conflict(db: sqlite3.Connection, event: Event, digest: bytes) -> bool:
    """Is ``event``, whose id the ``events`` table already holds, a different event?

    False for a true resend: same kind, job, peer uid and digest (or, when the digests differ,
    the same fields in another order). A row stored without a digest (before they were kept,
    or a requeued dead letter) is compared without it.
    """
    row = db.execute(
        "SELECT kind, job_id, peer_uid, digest, body FROM events WHERE id = ?", (event.id,)
    ).fetchone()
    if row is None:
        return False  # not in the spool: nothing to conflict with
    kind, job_id, uid, stored, body = row
    if (kind, job_id, uid) != (event.kind.value, event.job_id, event.peer_uid):
        return True
    if stored is None or bytes(stored) == digest:
        return False
    # Stored by a daemon that packed fields in the producer's order, not the schema's: the
    # same fields in another order are the same event.
    return bool(msgpack.unpackb(body, raw=False) != dict(event.fields))
