"""The fast path of event validation: msgspec's typed MessagePack decoder, checking in C.

:mod:`pfcollector.eventcheck` validates an event in Python, field by field: about 4.4 us a
stats frame here, where decoding alone (``msgpack.unpackb``) is 1.2 us. This module turns
:data:`pfcollector.events.SCHEMAS` into one ``msgspec.Struct`` per kind, tagged by ``kind``,
whose decoder refuses whatever the schema refuses (types, int64 and the fields' ranges, ids,
names, lengths, unknown and missing fields) while it decodes: 1.6 us a frame with the fields
dict built (``benchmarks/typed_decode.py``).

It is only a fast path: :func:`decode_event` answers ``None`` for anything it does not take
(an invalid event, a string to truncate, invalid UTF-8, a hello or control message) and the
Python validator then handles that frame as before, so every error keeps its code, field and
text. What it does take, the Python validator takes too, with the same result
(``tests/test_typed.py`` checks the two against each other on generated frames).

The fields dict is in schema order, every field present (defaults filled): the Python path
orders its dict the same way, so the spool packs an event to the same bytes whichever path
took it (its digest tells a resend from an impostor: :mod:`pfcollector.idcheck`).

A :class:`RunDecoder` is the same for the kinds the reader takes a run at a time (stats and
coverage): it leaves the characters of ids and job ids to one check for the whole run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Union

import msgspec

from .checks import ID_MAX, ID_PATTERN, NAME_FORBIDDEN, NAME_MAX, NAME_PATTERN
from .events import FILE_NAME_MAX, INT64_MAX, INT64_MIN, SCHEMAS, FieldSpec, Kind

__all__ = [
    "KIND_OF", "TS_LIMIT", "RunDecoder", "decode_event", "event_parts", "fields_of", "run_struct",
    "ts_ns",
]  # fmt: skip

#: Timestamps are seconds since the epoch whose nanoseconds fit in int64.
TS_LIMIT = INT64_MAX / 1e9

_REQUIRED: Any = msgspec.UNSET  # an envelope key without a default


_FILE_NAME = Annotated[str, msgspec.Meta(max_length=FILE_NAME_MAX)]


def _annotation(spec: FieldSpec) -> Any:
    """The msgspec type of one field: what :meth:`.checks.Checker.field` accepts unchanged."""
    if spec.type is int or spec.type is float:
        low, high = spec.bounds()
        return Annotated[spec.type, msgspec.Meta(ge=low, le=high)]
    if spec.type is str:
        # min_len: "not empty once blanks are stripped", i.e. one non-blank character.
        pattern = r"\S" if spec.min_len else None
        return Annotated[str, msgspec.Meta(max_length=spec.max_len, pattern=pattern)]
    if spec.type is bytes:
        return Annotated[bytes, msgspec.Meta(max_length=spec.max_len)]
    item: Any = bytes if spec.item is bytes else _FILE_NAME
    return Annotated[list[item], msgspec.Meta(max_length=spec.max_len)]


# Envelope keys after the kind's own fields; ``kind`` is the tag. Nil means absent for these
# (as in protocol.py), and for no other field: an optional field sent as nil is refused there,
# so its type here does not take None either (the default None is only for absence).
_ID = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
_NAME = Annotated[str, msgspec.Meta(max_length=NAME_MAX, pattern=NAME_PATTERN)]
_ENVELOPE: list[tuple[str, Any, Any]] = [
    ("t", Literal["event"], _REQUIRED),
    ("seq", Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)], _REQUIRED),
    ("id", _ID | None, None),
    ("ts", int | float | None, None),
    ("job_id", _NAME | None, None),
]
# The same for a run (RunDecoder): the id's and job_id's lengths only; their characters are
# checked for the whole run at once (msgspec's pattern check was 0.3 us of a stats frame's 0.55).
_RUN_NAMES = {
    "id": Annotated[str, msgspec.Meta(min_length=1, max_length=ID_MAX)] | None,
    "job_id": Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_MAX)] | None,
}
_RUN_ENVELOPE = [(name, _RUN_NAMES.get(name, annotation), default)
                 for name, annotation, default in _ENVELOPE]  # fmt: skip
# What an id may hold, and the newline valid_names joins ids with: deleted, nothing is left.
_ID_CHARS = b"".join(bytes([c]) for c in range(128) if re.fullmatch(ID_PATTERN, chr(c))) + b"\n"


def _struct(
    kind: Kind, specs: tuple[FieldSpec, ...], envelope: list[tuple[str, Any, Any]]
) -> type[msgspec.Struct]:
    fields: list[Any] = []
    for spec in specs:
        annotation = _annotation(spec)
        fields.append((spec.name, annotation) if spec.required else
                      (spec.name, annotation, spec.default))  # fmt: skip
    for name, annotation, default in envelope:
        fields.append((name, annotation) if default is _REQUIRED else (name, annotation, default))
    return msgspec.defstruct(f"{kind.value.capitalize()}Event", fields, tag_field="kind",
                             tag=kind.value, forbid_unknown_fields=True, kw_only=True)  # fmt: skip


_STRUCTS = {kind: _struct(kind, specs, _ENVELOPE) for kind, specs in SCHEMAS.items()}
_RUN_STRUCTS = {kind: _struct(kind, specs, _RUN_ENVELOPE) for kind, specs in SCHEMAS.items()}
#: The kind of each decoded struct type (decode_event's and RunDecoder's).
KIND_OF: dict[type, Kind] = {struct: kind for kind, struct in _STRUCTS.items()} | {
    struct: kind for kind, struct in _RUN_STRUCTS.items()
}
# Decodes and checks one event frame body into its kind's struct; raises
# ``msgspec.DecodeError`` (``ValidationError`` is one) for anything it does not take.
_DECODER: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(
    Union[tuple(_STRUCTS.values())]  # noqa: UP007 (a union of types made at run time)
)
_asdict = msgspec.structs.asdict
_ID_RE = re.compile(ID_PATTERN)
_NAME_RE = re.compile(NAME_PATTERN)
_NOT_NAME = re.compile(NAME_FORBIDDEN)
_CORPUS = Kind.CORPUS


class RunDecoder:
    """Decodes and checks events of ``kinds`` as :func:`decode_event` does, a run at a time: its
    :attr:`decode` checks everything but the characters of ids and job ids, which
    :meth:`valid_names` checks for a whole run in a few C calls
    (:meth:`.ServerConnection.next_run`)."""

    def __init__(self, kinds: Iterable[Kind]) -> None:
        types = tuple(_RUN_STRUCTS[kind] for kind in kinds)
        self.decode = msgspec.msgpack.Decoder(Union[types]).decode  # noqa: UP007

    @staticmethod
    def valid_names(run: list[Any]) -> int:
        """How many events at the head of ``run`` have a valid id and job id (or none):
        ``len(run)`` unless an id has other characters than ``[A-Za-z0-9._:-]`` or a job id
        a control character."""
        joined = "\n".join([event.id or "-" for event in run])
        jobs = "".join([event.job_id for event in run if event.job_id is not None])
        if joined.isascii() and not (jobs and _NOT_NAME.search(jobs)):
            raw = joined.encode()
            if not raw.translate(None, _ID_CHARS) and raw.count(10) == len(run) - 1:
                return len(run)
        bad = (i for i, event in enumerate(run)
               if (event.id is not None and not _ID_RE.fullmatch(event.id))
               or (event.job_id is not None and not _NAME_RE.fullmatch(event.job_id)))  # fmt: skip
        return next(bad, len(run))


def run_struct(kind: Kind) -> type:
    """The struct type a :class:`RunDecoder` gives for events of ``kind``."""
    return _RUN_STRUCTS[kind]


def fields_of(event: Any) -> dict[str, Any]:
    """A decoded event's own fields: every one, defaults filled, in schema order."""
    fields = _asdict(event)  # the kind's fields in schema order, then the envelope's
    del fields["t"], fields["seq"], fields["id"], fields["ts"], fields["job_id"]
    return fields


def ts_ns(ts: float) -> int:
    """An event's ``ts`` (seconds since the epoch, checked against TS_LIMIT) in nanoseconds."""
    return ts * 1_000_000_000 if type(ts) is int else round(ts * 1e9)


def decode_event(
    body: bytes | memoryview,
) -> tuple[int, Kind, dict[str, Any], str | None, int | None, str | None] | None:
    """``(seq, kind, fields, id, ts_ns, job_id)`` of a valid event frame body, else ``None``.

    ``None`` says only "not taken here": the caller validates the frame the slow way, which
    accepts it (a string it truncates, say) or names what is wrong.
    """
    try:
        event = _DECODER.decode(body)
    except msgspec.DecodeError:  # ValidationError is one
        return None
    ts = event.ts
    if ts is not None and not 0 <= ts < TS_LIMIT:  # also nan and inf
        return None
    fields = fields_of(event)
    kind = KIND_OF[type(event)]
    if kind is _CORPUS:
        contents = fields["contents"]
        if contents is not None and len(contents) != len(fields["files"]):
            return None
    return event_parts(event, fields)


def event_parts(
    event: Any, fields: dict[str, Any] | None = None
) -> tuple[int, Kind, dict[str, Any], str | None, int | None, str | None]:
    """``(seq, kind, fields, id, ts_ns, job_id)`` of a decoded event struct, its ``ts``
    within TS_LIMIT (and a corpus's contents matching its files)."""
    ts = event.ts
    return (event.seq, KIND_OF[type(event)], fields_of(event) if fields is None else fields,
            event.id, None if ts is None else ts_ns(ts), event.job_id)  # fmt: skip
