"""The PandaFuzz master's HTTP API as pure functions: bodies out, answers classified.

No I/O and no event loop here (see ``shared/pandafuzz-master-api.md`` for the master's rules):
:mod:`pfcollector.sender` does the HTTP and the retrying, this module decides what goes in a
request and what an answer means.

* :func:`encode_batches` packs events into batch bodies that are each at most ``limit`` bytes,
  counted exactly (the master answers an oversize body with 413 or, now and then, with a
  connection reset).
* :func:`item_request` builds one per-item (or ``/results/status``) request.
* :func:`classify` turns an answer into :data:`Outcome`: :class:`Delivered`, :class:`Partial`,
  :class:`Transient` (try again later) or :class:`Poison` (this payload will never be taken).

The bot endpoints (register, heartbeat) are in :mod:`pfcollector.botapi`.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import msgspec

from pfcollector.events import BATCH_KINDS, STATUS_KINDS, Event, Kind, to_master

__all__ = [
    "BATCH_BODY_LIMIT",
    "BATCH_MARGIN",
    "BATCH_MAX_ITEMS",
    "BATCH_PATH",
    "ITEM_BODY_LIMITS",
    "ITEM_PATHS",
    "STATUS_PATH",
    "Delivered",
    "EncodeError",
    "EncodedBatch",
    "MasterError",
    "Outcome",
    "Partial",
    "Poison",
    "Transient",
    "classify",
    "compact_json",
    "encode_batches",
    "error_text",
    "item_request",
    "json_object",
    "parse_retry_after",
    "transient_status",
]

MiB: Final = 1024 * 1024

BATCH_PATH: Final = "/api/v1/results/batch"
STATUS_PATH: Final = "/api/v1/results/status"
#: Per-item endpoint of each kind; every status kind goes to ``/results/status``.
ITEM_PATHS: Final[Mapping[Kind, str]] = {
    Kind.CRASH: "/api/v1/results/crash",
    Kind.COVERAGE: "/api/v1/results/coverage",
    Kind.CORPUS: "/api/v1/results/corpus",
    **{kind: STATUS_PATH for kind in STATUS_KINDS},
}
#: The master's body limit for the batch endpoint.
BATCH_BODY_LIMIT: Final = 1 * MiB
#: Bytes kept free under :data:`BATCH_BODY_LIMIT`.
BATCH_MARGIN: Final = 4096
#: Items per batch body at most: the master stores one row per transaction, so a huge batch
#: risks its request timeout (504) even when it fits in the byte limit.
BATCH_MAX_ITEMS: Final = 500
#: The master's body limit of each per-item endpoint.
ITEM_BODY_LIMITS: Final[Mapping[str, int]] = {
    "/api/v1/results/crash": 10 * MiB,
    "/api/v1/results/coverage": 1 * MiB,
    "/api/v1/results/corpus": 100 * MiB,
    STATUS_PATH: 1 * MiB,
}

#: The name of each batch kind's list in a batch body, and in the master's error strings.
_LIST_NAMES: Final[Mapping[Kind, str]] = {
    Kind.CRASH: "crashes",
    Kind.COVERAGE: "coverage",
    Kind.CORPUS: "corpus",
}
_ERROR_NAMES: Final[Mapping[Kind, str]] = {
    Kind.CRASH: "crash",
    Kind.COVERAGE: "coverage",
    Kind.CORPUS: "corpus",
}
# The batch handler formats item errors as fmt.Sprintf("%s %d: %v", "crash"|"coverage"|"corpus").
_ITEM_ERROR = re.compile(r"\s*(crash|crashes|coverage|corpus)\s+(\d+)\s*:\s*(.*)", re.DOTALL)
# Item errors that say "not now" rather than "never": such items are sent again, not set aside.
_TRANSIENT_ITEM_ERROR = re.compile(
    r"database is locked|SQLITE_BUSY|database table is locked|deadline exceeded"
    r"|timed? ?out|connection (?:refused|reset)|too many connections",
    re.IGNORECASE,
)
_ERROR_TEXT_MAX: Final = 1024
# Statuses that say "not this request, not now" although they are 4xx.
_TRANSIENT_STATUSES: Final = frozenset({408, 425, 429})
# 4xx that speak of the bot's access (a proxy, a wrong base URL), not of the payload:
# dead-lettering every event because a proxy token expired would lose a day of results.
_ACCESS_STATUSES: Final = frozenset({401, 403, 404, 405, 407})


# -- errors --------------------------------------------------------------------------------


class MasterError(Exception):
    """Base of the errors this module raises."""


class EncodeError(MasterError, ValueError):
    """An event cannot be turned into a body the master would take (never will be)."""


# -- outcomes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivered:
    """The master stored every item sent."""

    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Partial:
    """A batch answered 200 with ``partial_success``.

    Attributes:
        delivered: Ids the master stored.
        failed: Id to the master's error for items it will never take (set them aside).
        retryable: Id to the master's error for items it failed to store for a passing
            reason (a locked database): send them again later.
    """

    delivered: tuple[str, ...]
    failed: Mapping[str, str]
    retryable: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Transient:
    """Try again later: 5xx, 408, 429, an access problem, or no answer at all.

    Attributes:
        reason: Short text for logs and status.
        retry_after: Seconds the master asked to wait (``Retry-After``), if it did.
    """

    reason: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Poison:
    """The master refused the payload itself (4xx): sending it again cannot help.

    Attributes:
        status: The HTTP status.
        error_text: The master's ``error`` and ``details``, or its raw answer, truncated.
    """

    status: int
    error_text: str


Outcome = Delivered | Partial | Transient | Poison


# -- encoding ------------------------------------------------------------------------------


class EncodedBatch(NamedTuple):
    """One request's worth of events from :func:`encode_batches`.

    Attributes:
        events: The events in the body, in order.
        body: The exact batch body (``b""`` when ``per_item``).
        per_item: The event (alone in ``events``) cannot go through the batch endpoint: it is
            too big for it, or it cannot be encoded at all. Send it with :func:`item_request`,
            which has the per-item limit and raises :class:`EncodeError` for the latter.
    """

    events: list[Event]
    body: bytes
    per_item: bool = False


def compact_json(obj: Any) -> bytes:
    """Compact JSON as the master takes it; UTF-8 unless a string cannot be (lone surrogate)."""
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"cannot encode as JSON: {exc}") from exc
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")


#: msgspec's JSON encoder, for batch items: 0.3 against 3.7 us a crash (``json.dumps``),
#: 4% of the daemon's GIL end to end. ``to_master`` gives them only ``str``, ``int``, ``bool``
#: and lists of ``str``, for which both write the same bytes (tests/test_master.py checks it
#: on generated events); what msgspec refuses (a lone surrogate) goes to ``compact_json``.
_FAST_JSON = msgspec.json.Encoder()


def _encode_item(event: Event, bot_id: str) -> bytes:
    try:
        obj = to_master(event, bot_id)
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"event {event.id}: bad field: {exc}") from exc
    if event.kind in BATCH_KINDS:
        try:
            return _FAST_JSON.encode(obj)
        except (TypeError, ValueError, OverflowError):  # UnicodeEncodeError is a ValueError
            pass
    return compact_json(obj)


def _batch_frame(kind: Kind, job_id: str, bot_id: str) -> tuple[bytes, bytes]:
    """The bytes of a batch body before and after ``kind``'s items."""
    names = list(_LIST_NAMES.values())
    at = names.index(_LIST_NAMES[kind])
    head = f'{{"bot_id":{json.dumps(bot_id)},"job_id":{json.dumps(job_id)},'
    prefix = head + "".join(f'"{n}":[],' for n in names[:at]) + f'"{names[at]}":['
    suffix = "]" + "".join(f',"{n}":[]' for n in names[at + 1 :]) + "}"
    return prefix.encode(), suffix.encode()


def encode_batches(
    kind: Kind,
    job_id: str,
    bot_id: str,
    events: Iterable[Event],
    limit: int = BATCH_BODY_LIMIT - BATCH_MARGIN,
    *,
    max_items: int = BATCH_MAX_ITEMS,
) -> list[EncodedBatch]:
    """Pack ``events`` into batch bodies of at most ``limit`` bytes each.

    A body is ``{"bot_id", "job_id", "crashes", "coverage", "corpus"}`` in compact JSON, all
    three lists present and only ``kind``'s filled. Each item is encoded once; a body's size is
    computed exactly from the item sizes (no estimate), and packing is greedy in event order.

    Args:
        kind: A batch kind (crash, coverage or corpus).
        job_id: The job of every event (the master applies the top-level ``job_id`` to all).
        bot_id: The bot id to send.
        events: The events, all of ``kind`` and ``job_id``.
        limit: Largest body in bytes.
        max_items: Most items in one body.

    Returns:
        The groups, their events concatenated in input order. An event whose body alone
        would exceed ``limit``, or that cannot be encoded, comes alone with ``per_item=True``.

    Raises:
        ValueError: ``kind`` is not a batch kind, an event is of another kind or job, or
            ``max_items`` is below 1.
    """
    if kind not in BATCH_KINDS:
        raise ValueError(f"{kind} does not go through the batch endpoint")
    if max_items < 1:
        raise ValueError("max_items must be at least 1")
    prefix, suffix = _batch_frame(kind, job_id, bot_id)
    overhead = len(prefix) + len(suffix)

    out: list[EncodedBatch] = []
    group: list[Event] = []
    parts: list[bytes] = []
    size = overhead

    def flush() -> None:
        nonlocal group, parts, size
        if group:
            out.append(EncodedBatch(group, b"".join((prefix, b",".join(parts), suffix))))
        group, parts, size = [], [], overhead

    for event in events:
        if event.kind is not kind or event.job_id != job_id:
            raise ValueError(
                f"event {event.id} is {event.kind}/{event.job_id}, not {kind}/{job_id}"
            )
        try:
            item: bytes | None = _encode_item(event, bot_id)
        except EncodeError:
            item = None
        if item is None or overhead + len(item) > limit:
            flush()  # keep the groups in event order
            out.append(EncodedBatch([event], b"", per_item=True))
            continue
        added = len(item) + (1 if parts else 0)
        if size + added > limit or len(group) >= max_items:
            flush()
            added = len(item)
        group.append(event)
        parts.append(item)
        size += added
    flush()
    return out


def item_request(event: Event, bot_id: str) -> tuple[str, bytes]:
    """The per-item request for ``event``: its endpoint path and exact body.

    Batch kinds go to their own endpoint, stats and lifecycle kinds to ``/results/status``.

    Raises:
        EncodeError: The event cannot be encoded, or its body exceeds the endpoint's limit.
    """
    path = ITEM_PATHS[event.kind]
    body = _encode_item(event, bot_id)
    limit = ITEM_BODY_LIMITS[path]
    if len(body) > limit:
        raise EncodeError(
            f"event {event.id}: body of {len(body)} bytes exceeds the master's {limit} for {path}"
        )
    return path, body


# -- answers -------------------------------------------------------------------------------


def json_object(body: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def error_text(body: bytes) -> str:
    """The master's ``error: details``, else the raw answer, truncated."""
    obj = json_object(body)
    if obj is not None and isinstance(obj.get("error"), str):
        text = obj["error"]
        details = obj.get("details")
        if details not in (None, ""):
            text = f"{text}: {details}"
    else:
        text = body.decode("utf-8", "replace").strip()
    return text[:_ERROR_TEXT_MAX] or "(empty answer)"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        for key, candidate in headers.items():
            if key.lower() == lowered:
                return candidate
    return value


def parse_retry_after(
    value: str | None, date: str | None = None, *, wall_now: float | None = None
) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP-date).

    An HTTP-date is taken relative to the answer's own ``Date`` header when there is one (both
    from the master's clock, so local clock skew does not matter), else to ``wall_now``.

    Args:
        value: The ``Retry-After`` value.
        date: The ``Date`` header of the same answer.
        wall_now: The local wall time (``time.time()``), used when ``date`` is missing.

    Returns:
        Seconds, at least 0, or ``None`` when absent, unreadable, or a date with nothing to
        measure it against.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    when = _http_date(value)
    if when is None:
        return None
    reference = _http_date(date) if date is not None else None
    now = reference if reference is not None else wall_now
    return None if now is None else max(0.0, when - now)


def _http_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.UTC)
    return parsed.timestamp()


def transient_status(status: int) -> bool:
    """Whether an HTTP status means "try again later" (5xx, 408, 425, 429)."""
    return status >= 500 or status in _TRANSIENT_STATUSES


def classify(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    kind: Kind,
    events_sent: Sequence[Event],
    *,
    wall_now: float | None = None,
) -> Outcome:
    """What the master's answer to a request carrying ``events_sent`` means.

    * 2xx: :class:`Delivered`; for a batch answer with ``partial_success``, :class:`Partial`,
      each ``errors[]`` entry (``"<kind> <index>: <message>"``) mapped to the item at that index.
    * 5xx, 408, 425, 429: :class:`Transient`, with ``Retry-After`` when given.
    * 401, 403, 404, 405, 407: :class:`Transient` as well: they speak of the bot's access (a
      proxy, a wrong URL), not of the payload, so the items must not be set aside.
    * any other 4xx: :class:`Poison` with the master's error text.
    * anything else (1xx, 3xx): :class:`Transient` (a misconfigured proxy, not the payload).

    Args:
        status: The HTTP status.
        headers: The answer's headers (looked up case-insensitively).
        body: The answer's body.
        kind: The kind of the events sent.
        events_sent: The events in the request, in body order.
        wall_now: The local wall time, for a ``Retry-After`` HTTP-date without a ``Date``.

    Error handling:
        Never raises: an unreadable body gives the most conservative outcome of its status.
    """
    if 200 <= status < 300:
        obj = json_object(body)
        if obj is not None and obj.get("partial_success") is True and kind in BATCH_KINDS:
            return _partial(obj.get("errors"), kind, events_sent)
        return Delivered(tuple(event.id for event in events_sent))
    text = error_text(body)
    if transient_status(status):
        retry_after = parse_retry_after(
            _header(headers, "Retry-After"), _header(headers, "Date"), wall_now=wall_now
        )
        return Transient(f"HTTP {status}: {text}", retry_after)
    if status in _ACCESS_STATUSES:
        return Transient(f"HTTP {status} (access, not payload): {text}")
    if 400 <= status < 500:
        return Poison(status, text)
    return Transient(f"unexpected HTTP {status}: {text}")


def _partial(errors: Any, kind: Kind, events_sent: Sequence[Event]) -> Partial:
    """Map a ``partial_success`` answer's ``errors`` to the items sent."""
    messages = [str(e) for e in errors] if isinstance(errors, list) else []
    own_names = {_ERROR_NAMES[kind], _LIST_NAMES[kind]}
    named: dict[str, str] = {}
    unmapped: list[str] = []
    for message in messages:
        match = _ITEM_ERROR.fullmatch(message)
        index = int(match.group(2)) if match else -1
        if match and match.group(1) in own_names and 0 <= index < len(events_sent):
            named[events_sent[index].id] = message
        else:
            unmapped.append(message)
    if not named:
        # Nothing can be pinned on an item: set every item aside with the master's words
        # (resending a batch the master half-refused for reasons unknown would loop).
        text = "; ".join(unmapped)[:_ERROR_TEXT_MAX] or "partial_success without errors"
        named = {event.id: text for event in events_sent}
    failed = {i: m for i, m in named.items() if not _TRANSIENT_ITEM_ERROR.search(m)}
    retryable = {i: m for i, m in named.items() if i not in failed}
    delivered = tuple(event.id for event in events_sent if event.id not in named)
    return Partial(delivered, failed, retryable)
