"""The result types pfcollector carries, their field schema, and their mapping to the master's JSON.

This module is pure (stdlib only). It is the single source of truth for which fields each event
kind has: :mod:`pfcollector.protocol` validates wire messages against :data:`SCHEMAS`, and
:func:`to_master` turns a stored event into the exact JSON object the PandaFuzz master expects
(see ``shared/pandafuzz-master-api.md``): no field omitted, integers as integers, timestamps as
RFC 3339 with nanoseconds, ``files`` never null.
"""

from __future__ import annotations

import datetime as _dt
import enum
import functools
import signal as _signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BATCH_KINDS",
    "DURABLE_KINDS",
    "INT64_MAX",
    "INT64_MIN",
    "LIFECYCLE_KINDS",
    "SCHEMAS",
    "SIGNAL_MAX",
    "STATUS_KINDS",
    "Event",
    "FieldSpec",
    "Kind",
    "rfc3339",
    "to_master",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class Kind(enum.StrEnum):
    """What an event is. The four result kinds the master stores, then the Go bot's lifecycle."""

    CRASH = "crash"
    COVERAGE = "coverage"
    CORPUS = "corpus"
    STATS = "stats"
    STARTED = "started"
    STOPPED = "stopped"
    ERROR = "error"
    TIMEOUT = "timeout"


#: Kinds that the master's batch endpoint takes (``crashes``, ``coverage``, ``corpus`` lists).
BATCH_KINDS: frozenset[Kind] = frozenset({Kind.CRASH, Kind.COVERAGE, Kind.CORPUS})
#: Lifecycle kinds: sent, like stats, to ``/api/v1/results/status`` (logged by the master).
LIFECYCLE_KINDS: frozenset[Kind] = frozenset({Kind.STARTED, Kind.STOPPED, Kind.ERROR, Kind.TIMEOUT})
#: Kinds delivered through ``/api/v1/results/status``.
STATUS_KINDS: frozenset[Kind] = frozenset({Kind.STATS}) | LIFECYCLE_KINDS
#: Kinds that are never dropped to make room: refused with an error instead when the spool is full.
DURABLE_KINDS: frozenset[Kind] = frozenset({Kind.CRASH, Kind.CORPUS})


_Type = type  # the field named ``type`` below shadows the builtin inside the class


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One kind-specific field as a producer sends it.

    ``type`` is one of ``int``, ``float``, ``str``, ``bytes`` or ``list`` (of ``item``: ``str``
    or ``bytes``).
    A ``float`` field also takes an integer; an ``int`` field takes only an integer (never a
    float, never a bool), as the master does. ``max_len`` bounds a ``str``/``bytes`` length
    (in bytes for ``bytes``, characters for ``str``) or a list's item count. Strings marked
    ``truncate`` are cut to ``max_len`` rather than refused (a long stack trace must not cost
    the crash).

    Values that make no sense are refused (``out_of_range``, naming the field): a number
    outside ``low``..``high`` (counts are ``>= 0``; a float must be finite), a string shorter
    than ``min_len`` characters once blanks are stripped (a crash ``type`` must say something).
    """

    name: str
    type: type
    required: bool = False
    default: Any = None
    max_len: int | None = None
    truncate: bool = False
    item: _Type = str
    low: int | float | None = None
    high: int | float | None = None
    min_len: int = 0

    def bounds(self) -> tuple[int | float, int | float]:
        """The range a number must fall in: ``low``..``high``, else int64 (int) or finite."""
        big: int | float = sys.float_info.max if self.type is float else INT64_MAX
        small: int | float = -big if self.type is float else INT64_MIN
        return (small if self.low is None else self.low), (big if self.high is None else self.high)


_STR_MAX = 256  # ids, names, crash types
_TEXT_MAX = 64 * 1024  # output, stack traces, messages: truncated beyond this
CRASH_INPUT_MAX = 10 * 1024 * 1024  # the master's own crash body limit
#: Highest signal number a crash may report (0 = none): the platform's SIGRTMAX (64 on Linux).
SIGNAL_MAX = int(getattr(_signal, "SIGRTMAX", _signal.NSIG - 1))
_PATH_MAX = 4096
_FILES_MAX = 1024

SCHEMAS: Mapping[Kind, tuple[FieldSpec, ...]] = {
    Kind.CRASH: (
        FieldSpec("type", str, required=True, max_len=_STR_MAX, min_len=1),
        FieldSpec("signal", int, default=0, low=0, high=SIGNAL_MAX),
        FieldSpec("exit_code", int, default=0),
        FieldSpec("output", str, default="", max_len=_TEXT_MAX, truncate=True),
        FieldSpec("stack_trace", str, default="", max_len=_TEXT_MAX, truncate=True),
        FieldSpec("input", bytes, required=True, max_len=CRASH_INPUT_MAX),
    ),
    Kind.COVERAGE: (
        FieldSpec("edges", int, required=True, low=0),
        FieldSpec("new_edges", int, default=0, low=0),
        FieldSpec("exec_count", int, default=0, low=0),
    ),
    Kind.CORPUS: (
        FieldSpec("files", list, required=True, max_len=_FILES_MAX),
        FieldSpec("total_size", int, default=0, low=0),
        # Optional: the bytes of each entry of ``files``, stored content-addressed and used to
        # deduplicate the corpus by content hash. Never sent to the master.
        FieldSpec("contents", list, default=None, max_len=_FILES_MAX, item=bytes),
    ),
    Kind.STATS: (
        FieldSpec("executions", int, default=0, low=0),
        FieldSpec("exec_per_second", float, default=0.0, low=0),
        FieldSpec("total_edges", int, default=0, low=0),
        FieldSpec("covered_edges", int, default=0, low=0),
        FieldSpec("coverage_percent", float, default=0.0, low=0, high=100),
        FieldSpec("unique_crashes", int, default=0, low=0),
        FieldSpec("total_crashes", int, default=0, low=0),
        FieldSpec("corpus_size", int, default=0, low=0),
        FieldSpec("cpu_usage", float, default=0.0, low=0),
        FieldSpec("memory_usage", int, default=0, low=0),
    ),
    **{
        kind: (FieldSpec("message", str, default="", max_len=_TEXT_MAX, truncate=True),)
        for kind in LIFECYCLE_KINDS
    },
}

#: Longest item in a corpus ``files`` list.
FILE_NAME_MAX = _PATH_MAX


# Not frozen: one is built per event on the hot path, and a frozen dataclass's __init__
# costs 4x a plain one (0.95 against 0.2 us measured). Treat it as read-only.
@dataclass(slots=True)
class Event:
    """One accepted event, as the spool stores it and the sender ships it.

    ``fields`` holds the validated kind-specific fields. For a crash, the input bytes are not
    in ``fields``: they are stored content-addressed by the daemon, and ``fields`` carries
    ``hash`` (SHA-256 hex), ``size`` and ``file_path`` instead (plus ``is_unique``).
    ``id`` is stable from acceptance to the master, so a resubmission overwrites, never
    duplicates.
    """

    id: str
    kind: Kind
    job_id: str
    fuzzer: str
    timestamp_ns: int
    fields: Mapping[str, Any] = field(default_factory=dict)
    peer_pid: int = 0
    peer_uid: int = -1

    def with_fields(self, fields: Mapping[str, Any]) -> Event:
        """This event with other fields (``dataclasses.replace`` costs four times as much)."""
        return Event(self.id, self.kind, self.job_id, self.fuzzer, self.timestamp_ns, fields,
                     self.peer_pid, self.peer_uid)  # fmt: skip


def rfc3339(timestamp_ns: int) -> str:
    """Format nanoseconds since the epoch as RFC 3339 in UTC with nanosecond precision.

    >>> rfc3339(1_700_000_000_123_456_789)
    '2023-11-14T22:13:20.123456789Z'
    """
    seconds, nanos = divmod(timestamp_ns, 1_000_000_000)
    return f"{_seconds(seconds)}.{nanos:09d}Z"


@functools.lru_cache(maxsize=256)
def _seconds(seconds: int) -> str:
    """The date and time of a second: a batch's events share a few (3 us each to format)."""
    return _dt.datetime.fromtimestamp(seconds, tz=_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def to_master(event: Event, bot_id: str) -> dict[str, Any]:
    """The JSON object the master expects for ``event``, every field present.

    For batch kinds this is the item of the batch (or per-item) endpoint, with exactly the
    master's fields (its batch decoding refuses unknown fields). For stats and lifecycle kinds
    it is the object posted to ``/api/v1/results/status``.
    """
    f = event.fields
    common = {"id": event.id, "job_id": event.job_id, "bot_id": bot_id}
    ts = rfc3339(event.timestamp_ns)
    if event.kind is Kind.CRASH:
        return {
            **common,
            "hash": str(f.get("hash", "")),
            "file_path": str(f.get("file_path", "")),
            "type": str(f.get("type", "")),
            "signal": int(f.get("signal", 0)),
            "exit_code": int(f.get("exit_code", 0)),
            "timestamp": ts,
            "size": int(f.get("size", 0)),
            "is_unique": bool(f.get("is_unique", True)),
            "output": str(f.get("output", "")),
            "stack_trace": str(f.get("stack_trace", "")),
        }
    if event.kind is Kind.COVERAGE:
        return {
            **common,
            "edges": int(f.get("edges", 0)),
            "new_edges": int(f.get("new_edges", 0)),
            "timestamp": ts,
            "exec_count": int(f.get("exec_count", 0)),
        }
    if event.kind is Kind.CORPUS:
        return {
            **common,
            "files": [str(name) for name in (f.get("files") or [])],
            "timestamp": ts,
            "total_size": int(f.get("total_size", 0)),
        }
    if event.kind is Kind.STATS:
        body: dict[str, Any] = {"type": "fuzzer_stats", "timestamp": ts}
        for spec in SCHEMAS[Kind.STATS]:
            value = f.get(spec.name, spec.default)
            body[spec.name] = float(value) if spec.type is float else int(value)
        return {**body, **common, "fuzzer": event.fuzzer}
    return {
        "type": event.kind.value,
        "timestamp": ts,
        **common,
        "fuzzer": event.fuzzer,
        "message": str(f.get("message", "")),
    }
