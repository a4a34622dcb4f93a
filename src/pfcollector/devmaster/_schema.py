"""Decoding of the master's request bodies with the rules of Go's ``encoding/json`` (pure).

The reference master must refuse exactly what the PandaFuzz master (Go) refuses, so this module
mimics the parts of ``encoding/json`` that a client can trip over:

* an ``int`` field takes only a JSON integer within int64 (``11.0``, ``1e3``, ``true`` and
  ``"11"`` are type errors);
* a ``string`` field takes only a string, a ``bool`` only ``true``/``false``;
* ``null`` leaves a field at its zero value (so ``files: null`` stays nil and later fails the
  database's NOT NULL constraint, as on the master);
* a ``time.Time`` field takes only an RFC 3339 string (Go's strict JSON parser: ``T`` and ``Z``
  upper case, two-digit fields in range, any number of fractional digits);
* object keys match field names exactly or, failing that, ASCII case-insensitively;
* strict decoding (``DisallowUnknownFields``) refuses an unknown key, lenient decoding ignores it.

Every refusal is one :class:`DecodeError`, whose message reads like Go's.
"""

from __future__ import annotations

import calendar
import json
import re
from collections.abc import Mapping
from typing import Any, Final, Literal

__all__ = [
    "BATCH_FIELDS",
    "CORPUS_FIELDS",
    "COVERAGE_FIELDS",
    "CRASH_FIELDS",
    "HEARTBEAT_FIELDS",
    "HEARTBEAT_STATUSES",
    "ITEM_FIELDS",
    "REGISTER_FIELDS",
    "DecodeError",
    "FieldType",
    "decode_object",
    "is_rfc3339",
    "parse_json",
    "validate_register",
]

FieldType = Literal["str", "int", "bool", "time", "strlist", "list", "nullable_str"]

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

CRASH_FIELDS: Final[Mapping[str, FieldType]] = {
    "id": "str",
    "job_id": "str",
    "bot_id": "str",
    "hash": "str",
    "file_path": "str",
    "type": "str",
    "signal": "int",
    "exit_code": "int",
    "timestamp": "time",
    "size": "int",
    "is_unique": "bool",
    "output": "str",
    "stack_trace": "str",
}
COVERAGE_FIELDS: Final[Mapping[str, FieldType]] = {
    "id": "str",
    "job_id": "str",
    "bot_id": "str",
    "edges": "int",
    "new_edges": "int",
    "timestamp": "time",
    "exec_count": "int",
}
CORPUS_FIELDS: Final[Mapping[str, FieldType]] = {
    "id": "str",
    "job_id": "str",
    "bot_id": "str",
    "files": "strlist",
    "timestamp": "time",
    "total_size": "int",
}
#: Item schema per result kind, the kind being the per-item endpoint's last path segment.
ITEM_FIELDS: Final[Mapping[str, Mapping[str, FieldType]]] = {
    "crash": CRASH_FIELDS,
    "coverage": COVERAGE_FIELDS,
    "corpus": CORPUS_FIELDS,
}
BATCH_FIELDS: Final[Mapping[str, FieldType]] = {
    "bot_id": "str",
    "job_id": "str",
    "crashes": "list",
    "coverage": "list",
    "corpus": "list",
}
REGISTER_FIELDS: Final[Mapping[str, FieldType]] = {
    "hostname": "str",
    "name": "str",
    "capabilities": "strlist",
    "api_endpoint": "str",
}
HEARTBEAT_FIELDS: Final[Mapping[str, FieldType]] = {
    "status": "str",
    "current_job": "nullable_str",
    "last_activity": "time",
}
HEARTBEAT_STATUSES: Final = frozenset({"registering", "idle", "busy", "timed_out", "failed"})

_ZERO: Final[Mapping[FieldType, Any]] = {
    "str": "",
    "int": 0,
    "bool": False,
    "time": None,
    "strlist": None,
    "list": None,
    "nullable_str": None,
}
_GO_TYPE: Final[Mapping[FieldType, str]] = {
    "str": "string",
    "nullable_str": "*string",
    "int": "int",
    "bool": "bool",
    "time": "time.Time",
    "strlist": "[]string",
    "list": "[]",
}
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]+)?"
    r"(?:Z|[+-]([0-9]{2}):([0-9]{2}))",
    re.ASCII,
)
_CAPABILITY = re.compile(r"[A-Za-z_-][A-Za-z0-9_-]*", re.ASCII)
_MAX_CAPABILITIES: Final = 10


class DecodeError(ValueError):
    """The body is not what the Go master would decode: answered 400 with this as details."""


def _refuse_constant(name: str) -> Any:
    raise DecodeError(f"invalid character '{name[0]}' looking for beginning of value")


def parse_json(body: bytes) -> Any:
    """Parse the first JSON value of ``body`` the way a Go ``json.Decoder`` does.

    Args:
        body: The raw request body.

    Returns:
        The value; what follows it is ignored, as ``Decoder.Decode`` ignores it.

    Raises:
        DecodeError: Empty body, bad syntax, ``NaN``/``Infinity``, or nesting too deep.
    """
    # Go reads UTF-8 only (never UTF-16 as Python's json.loads(bytes) would) and replaces
    # invalid sequences rather than refusing them.
    text = body.decode("utf-8", errors="replace").lstrip(" \t\r\n")
    if not text:
        raise DecodeError("EOF")
    try:
        value, _ = json.JSONDecoder(parse_constant=_refuse_constant).raw_decode(text)
    except json.JSONDecodeError as exc:
        raise DecodeError(f"invalid JSON: {exc.msg} at offset {exc.pos}") from None
    except RecursionError:
        raise DecodeError("exceeded max depth") from None
    return value


def is_rfc3339(value: str) -> bool:
    """Tell whether ``value`` is a time Go's ``Time.UnmarshalJSON`` accepts.

    Args:
        value: The string inside the JSON quotes.

    Returns:
        True for RFC 3339 with in-range fields (no leap second), fractional digits allowed.
    """
    match = _RFC3339.fullmatch(value)
    if match is None:
        return False
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    if not 1 <= month <= 12 or hour > 23 or minute > 59 or second > 59:
        return False
    if not 1 <= day <= calendar.monthrange(year, month)[1]:
        return False
    off_h, off_m = match.group(7), match.group(8)
    return off_h is None or (int(off_h) < 24 and int(off_m) < 60)


def _type_error(what: str, value: Any, where: str, field: str, ftype: FieldType) -> DecodeError:
    return DecodeError(
        f"json: cannot unmarshal {what} {json.dumps(value)[:40]} into Go struct field "
        f"{where}.{field} of type {_GO_TYPE[ftype]}"
    )


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _convert(value: Any, ftype: FieldType, where: str, field: str) -> Any:
    if value is None:
        return _ZERO[ftype]
    ok: bool
    if ftype in ("str", "nullable_str"):
        ok = isinstance(value, str)
    elif ftype == "int":
        ok = type(value) is int and _INT64_MIN <= value <= _INT64_MAX
    elif ftype == "bool":
        ok = isinstance(value, bool)
    elif ftype == "time":
        if isinstance(value, str) and not is_rfc3339(value):
            raise DecodeError(
                f'parsing time {json.dumps(value)[:60]} as "2006-01-02T15:04:05Z07:00": '
                "cannot parse"
            )
        ok = isinstance(value, str)
    elif ftype == "strlist":
        ok = isinstance(value, list)
        if ok:
            for item in value:
                if item is not None and not isinstance(item, str):
                    raise _type_error(_json_kind(item), item, where, field, ftype)
            return ["" if item is None else item for item in value]
    else:  # "list": items are decoded by the caller
        ok = isinstance(value, list)
    if not ok:
        raise _type_error(_json_kind(value), value, where, field, ftype)
    return value


def decode_object(
    value: Any, fields: Mapping[str, FieldType], *, strict: bool, where: str
) -> dict[str, Any]:
    """Decode one JSON object into a Go struct with ``fields``, as ``encoding/json`` would.

    Args:
        value: The parsed JSON value; ``null`` decodes to the zero struct.
        fields: Field name to type.
        strict: Refuse unknown keys (``DisallowUnknownFields``) rather than ignore them.
        where: The Go type name, for error messages (``CrashResult``).

    Returns:
        Every field of ``fields``, at its zero value when absent or ``null``.

    Raises:
        DecodeError: Not an object, an unknown key while strict, or a value of the wrong type.
    """
    out: dict[str, Any] = {name: _ZERO[ftype] for name, ftype in fields.items()}
    if value is None:
        return out
    if not isinstance(value, dict):
        raise DecodeError(
            f"json: cannot unmarshal {_json_kind(value)} into Go value of type {where}"
        )
    for key, item in value.items():
        name = key if key in fields else key.lower()
        ftype = fields.get(name)
        if ftype is None:
            if strict:
                raise DecodeError(f'json: unknown field "{key}"')
            continue
        out[name] = _convert(item, ftype, where, name)
    return out


def validate_register(req: Mapping[str, Any]) -> None:
    """Apply the master's validation of a decoded registration request.

    Args:
        req: The output of :func:`decode_object` with :data:`REGISTER_FIELDS`.

    Raises:
        DecodeError: hostname empty, capabilities not 1 to 10 valid names, or an
            ``api_endpoint`` that is not an http(s) URL.
    """
    if not req["hostname"]:
        raise DecodeError("hostname is required")
    caps = req["capabilities"] or []
    if not 1 <= len(caps) <= _MAX_CAPABILITIES:
        raise DecodeError(f"capabilities must have 1 to {_MAX_CAPABILITIES} items")
    for cap in caps:
        if _CAPABILITY.fullmatch(cap) is None:
            raise DecodeError(f"invalid capability {cap!r}")
    if not req["api_endpoint"].startswith(("http://", "https://")):
        raise DecodeError("api_endpoint must start with http:// or https://")
