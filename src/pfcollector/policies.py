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

import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .events import Event, Kind
from .typed import KIND_OF, fields_of, run_struct, ts_ns

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
_COVERAGE = run_struct(Kind.COVERAGE)  # a run's coverage events are of this type
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

    def add_run(
        self, run: Sequence[Any], job_id: str, fuzzer: str, pid: int, uid: int, now_ns: int
    ) -> tuple[int, Counter[Kind]]:
        """Merge a run of decoded stats and coverage events of one connection (the structs of
        a :class:`.typed.RunDecoder`, from :meth:`.ServerConnection.next_run`) as :meth:`add`
        would one by one; how many it took, with their kinds. What it took is a prefix of
        ``run``: it stops at an event of a new key that does not fit, and the caller takes
        that one and the rest one at a time (:meth:`add`, else the spool).

        ``job_id``, ``fuzzer``, ``pid`` and ``uid`` are the connection's (the hello's job for
        an event without its own); ``now_ns`` is the time of an event without ``ts``. Only the
        last event of each key becomes an :class:`Event`: a read of 300 stats makes one.
        """
        ids, old_ids, half = self._ids, self._old_ids, self.max_ids // 2
        pending, room = self._pending, self.max_keys - len(self._pending)
        latest: dict[tuple[type, str], list[Any]] = {}  # [event, count, new_edges sum]
        kinds: Counter[Kind] = Counter()
        taken = 0
        for event in run:
            id_, cls = event.id, type(event)
            if id_ is not None and (id_ in ids or id_ in old_ids):
                self.resends += 1
                kinds[KIND_OF[cls]] += 1
                taken += 1
                continue  # already merged: taken, and nothing to add
            job = event.job_id or job_id
            entry = latest.get((cls, job))
            if entry is None:
                if (KIND_OF[cls], job, fuzzer, pid) not in pending:
                    if room <= 0:
                        break
                    room -= 1
                entry = latest[cls, job] = [event, 0, 0]
            entry[0] = event
            entry[1] += 1
            if cls is _COVERAGE:
                entry[2] += event.new_edges
            if id_ is not None:
                ids.add(id_)
                if len(ids) >= half:
                    self._old_ids, old_ids = ids, ids
                    self._ids = ids = set()
            taken += 1
        for (cls, job), (event, count, new_edges) in latest.items():
            kind = KIND_OF[cls]
            kinds[kind] += count
            key = (kind, job, fuzzer, pid)
            held = pending.get(key)
            self.absorbed[kind] += count if held is not None else count - 1
            fields = fields_of(event)
            if kind is Kind.COVERAGE:
                held_edges = int(held.fields.get("new_edges", 0)) if held is not None else 0
                fields["new_edges"] = held_edges + new_edges
            ts = event.ts
            pending[key] = Event(event.id or str(uuid.uuid4()), kind, job, fuzzer,
                                 now_ns if ts is None else ts_ns(ts), fields, pid, uid)  # fmt: skip
        return taken, kinds

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
