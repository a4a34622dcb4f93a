"""Event validation in Python: the path that names what is wrong with an event.

:mod:`pfcollector.typed` checks most events in C; whatever it does not take (an invalid event,
a string to truncate, invalid UTF-8) comes here, from :meth:`.ServerConnection.next_message`,
as the decoded map. :func:`parse_event` accepts it as the typed path would (the same fields
dict, in schema order) or raises the :class:`~pfcollector.checks.MessageError` that names the
field, its code and why. ``tests/test_typed.py`` checks the two paths against each other.
"""

from __future__ import annotations

import re
from typing import Any, TypeAlias

from .checks import ID_MAX, ID_PATTERN, Checker, MessageError, describe
from .events import INT64_MAX, INT64_MIN, SCHEMAS, FieldSpec, Kind
from .typed import TS_LIMIT
from .typed import ts_ns as seconds_to_ns

__all__ = ["Parsed", "parse_event"]

#: ``(seq, kind, fields, id, ts_ns, job_id)`` of a valid event, as :func:`.typed.decode_event`.
Parsed: TypeAlias = tuple[int, Kind, dict[str, Any], str | None, int | None, str | None]

_ID_RE = re.compile(ID_PATTERN)  # the typed path checks the same pattern
_KINDS: dict[str, Kind] = {kind.value: kind for kind in Kind}
_CORPUS = Kind.CORPUS  # a module constant: reading an enum member off its class is slow
_SPECS: dict[Kind, tuple[FieldSpec, ...]] = dict(SCHEMAS)
_NAMES = {kind: tuple(spec.name for spec in specs) for kind, specs in SCHEMAS.items()}
# (name, type checked inline or None, required, default, spec, low, high) per kind, for the
# hot loop: a number of the right type within low..high (which also refuses nan and inf) passes.
_FIELDS = {
    kind: tuple(
        (spec.name, spec.type if spec.type in (int, float) else None, spec.required,
         spec.default, spec, *spec.bounds())
        for spec in specs
    )
    for kind, specs in SCHEMAS.items()
}  # fmt: skip
# The keys an event's fields arrived with (after the envelope), per kind, in wire order: a
# producer sends the same few shapes over and over. A valid shape maps to the checks of the
# fields present and the defaults of those absent. Any event that does not pass them goes
# through the schema-order loop, which names the first error exactly as it always did.
_Shape: TypeAlias = tuple[tuple[tuple[str, Any, FieldSpec, Any, Any], ...], dict[str, Any]]
_SHAPES: dict[tuple[Kind, tuple[str, ...]], _Shape] = {}
_SHAPES_MAX = 4096  # orderings of the schema's names are many: past this they are not remembered
_ENVELOPE = ("t", "seq", "kind", "id", "ts", "job_id")
_MISSING: Any = object()

def _learn_shape(kind: Kind, obj: dict[Any, Any]) -> _Shape | None:
    """The :data:`_SHAPES` entry for the keys of ``obj``, or ``None`` when they are not a valid
    set for ``kind`` (a key unknown or a required one absent). Only valid shapes are remembered
    (while there is room): their keys are the schema's names, so the cache stays small."""
    fields = _FIELDS[kind]
    known = {f[0]: f for f in fields}
    if not all(key in known for key in obj) or not all(f[0] in obj for f in fields if f[2]):
        return None
    checks = tuple((key, known[key][1], known[key][4], *known[key][5:7]) for key in obj)
    shape = checks, {f[0]: f[3] for f in fields if f[0] not in obj}
    if len(_SHAPES) < _SHAPES_MAX:
        _SHAPES[kind, tuple(obj)] = shape
    return shape


def parse_event(obj: dict[Any, Any], last_seq: int) -> Parsed:
    """Validate an ``event`` map (which it consumes): ``(seq, kind, fields, id, ts_ns, job_id)``.

    This is the daemon's hot path: the common case (well-typed ints and floats, a set of keys
    seen before) is checked inline, and the context for error messages is only built on failure.
    """
    seq = obj.get("seq")
    if type(seq) is not int or not INT64_MIN <= seq <= INT64_MAX:
        seq = Checker("event").typed(obj, "seq", int)
    if seq <= last_seq:
        raise MessageError("seq_not_increasing", f"event: seq {seq} is not above the previous "
                           f"seq {last_seq}", field="seq")  # fmt: skip
    kind_name = obj.get("kind")
    kind = _KINDS.get(kind_name) if type(kind_name) is str else None
    if kind is None:
        if kind_name is None and "kind" not in obj:
            raise Checker("event", seq).fail("missing_field", "kind", "is required")
        raise MessageError("unknown_kind", f"event seq {seq}: kind {describe(kind_name)} is not "
                           f"one of {', '.join(_KINDS)}", field="kind", seq=seq)  # fmt: skip
    # kind_name == kind.value (the enum's property is slow); the checker is built only when used
    del obj["t"], obj["seq"], obj["kind"]
    event_id = obj.pop("id", None)
    if event_id is not None and (type(event_id) is not str or not _ID_RE.fullmatch(event_id)):
        raise Checker("event", seq, kind_name).fail(
            "bad_id", "id", f"must be 1..{ID_MAX} characters of [A-Za-z0-9._:-], "
            f"got {describe(event_id)}")  # fmt: skip
    ts_ns = None
    ts = obj.pop("ts", None)  # nil means absent, for every optional envelope key
    if ts is not None:
        if type(ts) is not int and type(ts) is not float:
            raise Checker("event", seq, kind_name).fail(
                "wrong_type", "ts", f"must be a number, got {describe(ts)}")  # fmt: skip
        if not 0 <= ts < TS_LIMIT:  # also refuses nan and inf
            raise Checker("event", seq, kind_name).fail(
                "out_of_range", "ts", f"must be seconds since the epoch, got {ts}")  # fmt: skip
        ts_ns = seconds_to_ns(ts)
    job_id = None
    if "job_id" in obj:
        if obj["job_id"] is not None:
            job_id = Checker("event", seq, kind_name).name(obj, "job_id")
        del obj["job_id"]
    shape = _SHAPES.get((kind, tuple(obj))) or _learn_shape(kind, obj)
    checked = False
    if shape is not None:  # every key known, every required one there: check the values only
        fixed = None
        for name, fast, spec, low, high in shape[0]:
            value = obj[name]
            if type(value) is not fast or not low <= value <= high:
                try:
                    new = Checker("event", seq, kind_name).field(spec, value)
                except MessageError:
                    break  # the schema-order loop below names the first error, as always
                if new is not value:
                    fixed = fixed or []
                    fixed.append((name, new))
        else:
            if fixed:
                obj.update(fixed)
            obj.update(shape[1])  # the absent fields' defaults, in schema order
            checked = True
    if not checked:
        check = Checker("event", seq, kind_name)
        for name, fast, required, default, spec, low, high in _FIELDS[kind]:
            value = obj.get(name, _MISSING)
            if value is _MISSING:
                if required:
                    raise check.fail("missing_field", name, "is required")
                obj[name] = default
            elif type(value) is not fast or not low <= value <= high:
                obj[name] = check.field(spec, value)
        if len(obj) != len(_FIELDS[kind]):
            check.no_extra(obj, _NAMES[kind])
    if (
        kind is _CORPUS
        and obj["contents"] is not None
        and len(obj["contents"]) != len(obj["files"])
    ):
        raise Checker("event", seq, kind_name).fail(
            "out_of_range", "contents", f"has {len(obj['contents'])} items but files has "
            f"{len(obj['files'])}: one content per file")  # fmt: skip
    names = _NAMES[kind]
    if tuple(obj) != names:  # schema order, as the typed path gives it (typed.py)
        obj = {name: obj[name] for name in names}
    return seq, kind, obj, event_id, ts_ns, job_id
