"""Which dedupe keys a job has seen: the spool's lookups for crash and corpus dedupe.

A mixin of :class:`pfcollector.spool.Spool`, called inside its group commit's transaction
(``self._db``, the lock held): :meth:`SeenKeys._seen_before` looks a group's keys up in the
``seen`` table with one query per (kind, job) per chunk of keys, and :meth:`SeenKeys._dedupe`
decides per event what is a repeat, and what a corpus event keeps.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Sequence

from .events import Event, Kind

__all__ = ["SeenKeys"]

_CHUNK = 500  # keys per statement (SQLite's variable limit is 32766; keep statements small)


class SeenKeys:
    """Dedupe lookups for :class:`~pfcollector.spool.Spool` (which provides ``_db``)."""

    _db: sqlite3.Connection

    def _seen_before(
        self, events: Sequence[Event], keys: Sequence[Sequence[str] | None]
    ) -> dict[tuple[str, str, str], str]:
        """``(kind, job, key) -> first id`` for the group's keys already seen: one query per
        (kind, job) per chunk of keys rather than one per key."""
        wanted: dict[tuple[str, str], set[str]] = {}
        for ev, event_keys in zip(events, keys, strict=True):
            if event_keys:
                wanted.setdefault((ev.kind.value, ev.job_id), set()).update(event_keys)
        known: dict[tuple[str, str, str], str] = {}
        for (kind, job), key_set in wanted.items():
            key_list = list(key_set)
            for start in range(0, len(key_list), _CHUNK):
                chunk = key_list[start : start + _CHUNK]
                rows = self._db.execute(
                    "SELECT key, first_id FROM seen WHERE kind = ? AND job_id = ? "
                    f"AND key IN ({','.join('?' * len(chunk))})",
                    (kind, job, *chunk),
                )
                known.update(((kind, job, key), first) for key, first in rows)
        return known

    def _dedupe(
        self,
        ev: Event,
        keys: Sequence[str],
        known: dict[tuple[str, str, str], str],
        hit_rows: list[tuple[int, str, str, str]],
        now: int,
        delta: Counter[tuple[str, str]],
    ) -> tuple[Event, list[str]] | None:
        """``None`` for a repeat; else the event (corpus: only its unseen entries) and the keys
        to record once it is stored. Hits are added to ``hit_rows``."""
        keep: list[int] = []
        fresh: list[str] = []
        for j, key in enumerate(keys):
            first = known.get((ev.kind.value, ev.job_id, key))
            if first is None:
                keep.append(j)
                fresh.append(key)
            elif first == ev.id:
                keep.append(j)  # a resend of the first one, not a repeat
            else:
                hit_rows.append((now, ev.kind.value, ev.job_id, key))
        if not keep:
            delta[ev.kind, "deduped"] += 1
            return None
        if ev.kind is Kind.CORPUS and len(keep) < len(keys):
            fields = dict(ev.fields)
            for name in ("files", "hashes", "sizes"):
                if name in fields:
                    fields[name] = [fields[name][j] for j in keep]
            if "sizes" in fields:  # known when the producer sent the bytes
                fields["total_size"] = sum(fields["sizes"])
            ev = ev.with_fields(fields)
        return ev, fresh
