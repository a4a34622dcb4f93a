"""Per-type policies: what the master needs of each kind, and nothing more. Pure logic.

* **stats** are snapshots: between two flushes only the latest per (job, fuzzer, pid) matters,
  so a fuzzer sending stats 1,000 times a second costs the master one request per interval.
* **coverage** is coalesced the same way per (job, fuzzer, pid): the latest ``edges`` and
  ``exec_count``, the *sum* of ``new_edges`` (no new edge is forgotten), the latest timestamp.
* **crashes** are deduplicated per job by :func:`crash_signature` (SHA-256 of the input, crash
  type, signal): the first is sent, repeats only count hits. That is durable state, so it
  lives in the spool (:meth:`pfcollector.spool.Spool.append`); this module only says what
  the signature is.
* **corpus** entries are deduplicated per job by file name (and by content hash when the
  producer sends the bytes).

Coalesced kinds are acknowledged as *accepted* when they reach the :class:`Coalescer`, not
*durable*: the next snapshot supersedes a lost one. Crash and corpus acks mean durable.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .events import Event, Kind

__all__ = [
    "COALESCED_KINDS",
    "MAX_COALESCE_KEYS",
    "MAX_MERGED_IDS",
    "Coalescer",
    "crash_signature",
]

#: Kinds kept in memory and merged between flushes instead of spooled one by one.
COALESCED_KINDS: frozenset[Kind] = frozenset({Kind.STATS, Kind.COVERAGE})
#: Distinct (kind, job, fuzzer, pid) keys held at most; past this, the caller flushes early.
MAX_COALESCE_KEYS = 4096
#: Ids of merged events remembered per interval, at most (about 100 bytes each), so that a
#: resend is not merged twice; past this the oldest are forgotten (the latest half are always
#: known).
MAX_MERGED_IDS = 16384


def crash_signature(sha256: str, crash_type: str, signal: int) -> str:
    """What makes two crashes of one job the same crash."""
    return f"{sha256}:{crash_type}:{signal}"


class Coalescer:
    """Latest-wins (stats) and merge (coverage) between flushes; bounded by key count."""

    def __init__(self, max_keys: int = MAX_COALESCE_KEYS, max_ids: int = MAX_MERGED_IDS) -> None:
        self.max_keys = max_keys
        self.max_ids = max_ids
        self.absorbed: Counter[str] = Counter()
        self.resends = 0
        self._pending: dict[tuple[Any, ...], Event] = {}
        # Ids taken in this interval: a producer that resends after a lost ack must not have
        # its new_edges counted twice. Two generations of max_ids / 2 each: when the new one
        # is full it becomes the old one and the old one is forgotten, so the latest
        # max_ids / 2 to max_ids ids are known. (A plain set per event costs a third of an
        # OrderedDict with its popitem; deleting a dict's first key slows down as deletions
        # pile up: 4.3 us an event against 0.44 us, benchmarks/run.py.)
        self._ids: set[str] = set()
        self._old_ids: set[str] = set()

    def add(self, event: Event) -> bool:
        """Merge a stats or coverage event into what is pending for its key.

        Returns False, taking nothing, when the event has a new key and the coalescer is
        full: the caller sends it the durable way, which has flow control, so a producer
        inventing a job id per event cannot grow memory without bound.
        """
        if event.id in self._ids or event.id in self._old_ids:
            self.resends += 1
            return True  # already merged: taken, and nothing to add
        key = (event.kind, event.job_id, event.fuzzer, event.peer_pid)
        held = self._pending.get(key)
        if held is None:
            if len(self._pending) >= self.max_keys:
                return False
            self._pending[key] = event
            self._remember(event.id)
            return True
        self._remember(event.id)
        self.absorbed[event.kind] += 1
        if event.kind is Kind.COVERAGE:
            fields = dict(event.fields)
            fields["new_edges"] = int(held.fields.get("new_edges", 0)) + int(
                fields.get("new_edges", 0)
            )
            event = event.with_fields(fields)
        self._pending[key] = event
        return True

    @property
    def full(self) -> bool:
        """Too many distinct keys are held: flush now rather than grow."""
        return len(self._pending) >= self.max_keys

    def __len__(self) -> int:
        return len(self._pending)

    def take(self) -> list[Event]:
        """Everything pending, oldest key first; the coalescer is empty afterwards."""
        events, self._pending = list(self._pending.values()), {}
        self._ids, self._old_ids = set(), set()
        return events

    def _remember(self, id_: str) -> None:
        ids = self._ids
        ids.add(id_)
        if len(ids) >= self.max_ids // 2:
            self._old_ids, self._ids = ids, set()
