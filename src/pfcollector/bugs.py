"""Crashes bucketed by bug: the dedupe key of a crash, and the per-job table of bugs.

With ``crash_dedupe = "bug"`` (the default) a crash whose report :func:`pfcollector.report.parse`
understands is deduplicated per job by its **bug signature** (crash type plus the top frames)
rather than by its input: the first crash of a bug is stored and sent with its report, later
ones are acknowledged and counted as hits, and their inputs are kept in the input store. A
crash without a recognisable report falls back to the input key (``sha256:type:signal``).

The dedupe itself is the spool's ``seen`` table (same transaction as the append, so it
survives ``kill -9``): a bug is a row whose key is ``bug:<signature>``. This module adds the
``bugs`` table, filled by a trigger on that insert in the same transaction, which remembers
when a bug was first seen; hits, first id and last seen are the ``seen`` row's. The readers
(:func:`list_bugs`, :func:`top_repeats`) take a connection: ``Spool.read(list_bugs, ...)``
runs them under the spool's lock, :func:`read_bugs` on a read-only connection of its own.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .events import Event
from .policies import crash_signature
from .report import parse

__all__ = [
    "BUG_PREFIX",
    "DEDUPE_MODES",
    "SCHEMA",
    "DedupeMode",
    "bug_id",
    "crash_key",
    "dedupe_mode",
    "is_bug_key",
    "list_bugs",
    "read_bugs",
    "top_per_job",
    "top_repeats",
]

DedupeMode = Literal["bug", "input", "off"]
#: ``crash_dedupe`` values: per bug (report signature), per input, or none.
DEDUPE_MODES: tuple[DedupeMode, ...] = ("bug", "input", "off")
#: Prefix of a bug's key in the spool's ``seen`` table (an input key is a hex digest).
BUG_PREFIX = "bug:"

SCHEMA = """
CREATE TABLE IF NOT EXISTS bugs (
    job_id   TEXT NOT NULL,
    key      TEXT NOT NULL,
    first_ns INTEGER NOT NULL,
    PRIMARY KEY (job_id, key)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS bugs_first_seen AFTER INSERT ON seen
WHEN NEW.kind = 'crash' AND substr(NEW.key, 1, 4) = 'bug:'
BEGIN
    INSERT OR IGNORE INTO bugs VALUES (NEW.job_id, NEW.key, NEW.last_ns);
END;
"""


def crash_key(event: Event, sha256: str, mode: DedupeMode) -> tuple[Event, list[str] | None]:
    """The dedupe keys of a crash under ``mode``, and the event as it is to be stored.

    In ``bug`` mode a recognised report gives the key ``bug:<signature>`` and the crash's
    ``type`` becomes the sanitizer's crash type (``heap-buffer-overflow READ 4``), which is
    what the master shows.
    """
    fields = event.fields
    if mode == "off":
        return event, None
    if mode == "bug":
        report = parse(str(fields.get("output", "")), str(fields.get("stack_trace", "")))
        signature = report.signature
        if signature is not None:
            if report.crash_type != fields.get("type"):
                event = event.with_fields(_retyped(fields, report.crash_type))
            return event, [BUG_PREFIX + signature]
    return event, [crash_signature(sha256, str(fields["type"]), int(fields["signal"]))]


def _retyped(fields: Mapping[str, Any], crash_type: str) -> dict[str, Any]:
    out = dict(fields)
    out["type"] = crash_type
    return out


def is_bug_key(keys: Sequence[str] | None) -> bool:
    """Whether an event's dedupe keys are a bug's (its repeats' inputs are then kept)."""
    return keys is not None and len(keys) > 0 and keys[0].startswith(BUG_PREFIX)


def dedupe_mode(value: object) -> DedupeMode:
    """A ``crash_dedupe`` setting as a mode. Its older form, a boolean (``true``/``false``, or
    an environment variable's ``1``/``yes``/``no``/...), reads as ``bug``/``off``."""
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        value = True
    elif isinstance(value, str) and value.strip().lower() in ("0", "false", "no"):
        value = False
    if value is True:
        return "bug"
    if value is False:
        return "off"
    for mode in DEDUPE_MODES:
        if value == mode:
            return mode
    raise ValueError(f"must be one of 'bug', 'input', 'off', got {value!r}")


def bug_id(job_id: str, signature: str) -> str:
    """A short stable name for a bug (metrics labels, tables): 12 hex digits."""
    return hashlib.sha256(f"{job_id}\n{signature}".encode()).hexdigest()[:12]


_QUERY = """
SELECT s.job_id, s.key, s.first_id, s.hits, b.first_ns, s.last_ns
FROM seen AS s JOIN bugs AS b ON b.job_id = s.job_id AND b.key = s.key
WHERE s.kind = 'crash' {where}
ORDER BY s.hits DESC, b.first_ns LIMIT ?
"""


def list_bugs(
    db: sqlite3.Connection, job_id: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Bugs, most hit first: ``job_id, bug, type, signature, first_id, hits, first_ns, last_ns``."""
    where, args = ("AND s.job_id = ?", (job_id, limit)) if job_id else ("", (limit,))
    out = []
    for job, key, first_id, hits, first_ns, last_ns in db.execute(_QUERY.format(where=where), args):
        signature = key[len(BUG_PREFIX) :]
        out.append(
            {
                "job_id": job,
                "bug": bug_id(job, signature),
                "type": signature.split("\n", 1)[0],
                "signature": signature,
                "first_id": first_id,
                "hits": hits,
                "first_ns": first_ns,
                "last_ns": last_ns,
            }
        )
    return out


def top_repeats(db: sqlite3.Connection, kind: str, limit: int = 10) -> list[dict[str, Any]]:
    """The most repeated crashes (or corpus entries) of any key: job, key, first id, hits."""
    rows = db.execute(
        "SELECT job_id, key, first_id, hits, last_ns FROM seen WHERE kind = ? "
        "AND hits > 1 ORDER BY hits DESC LIMIT ?",
        (kind, limit),
    ).fetchall()
    names = ("job_id", "key", "first_id", "hits", "last_ns")
    return [dict(zip(names, row, strict=True)) for row in rows]


def top_per_job(rows: Sequence[Mapping[str, Any]], per_job: int = 5) -> list[dict[str, Any]]:
    """The first ``per_job`` rows of each job, in the rows' order (most hit first)."""
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        n = seen.get(row["job_id"], 0)
        if n < per_job:
            seen[row["job_id"]] = n + 1
            out.append(dict(row))
    return out


def read_bugs(path: Any, job_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """:func:`list_bugs` of a spool file, read-only (safe beside a running daemon).

    Raises ``sqlite3.Error`` when the file cannot be read; an older spool without the
    ``bugs`` table has no bugs.
    """
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        if not {"bugs", "seen"} <= tables:
            return []
        return list_bugs(db, job_id, limit)
    finally:
        db.close()
