"""What is wrong with a peer's message, and how the daemon says it: the protocol's errors.

:class:`ProtocolError` and its three kinds (fatal or not), the :class:`ErrorMsg` that reports
one, and :class:`Checker`, the field checks whose texts name the message, ``seq``, kind and
field (``crash event seq 7: field 'signal' must be 0..64, got 99``). Split out of
:mod:`pfcollector.protocol`, which re-exports the public names; pure, no I/O.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from .events import FILE_NAME_MAX, INT64_MAX, INT64_MIN, FieldSpec

__all__ = [
    "ID_MAX",
    "ID_PATTERN",
    "NAME_FORBIDDEN",
    "NAME_MAX",
    "NAME_PATTERN",
    "Checker",
    "ErrorMsg",
    "FrameError",
    "MessageError",
    "ProtocolError",
    "SessionError",
    "describe",
]

#: Longest ``job_id`` / ``fuzzer`` (characters).
NAME_MAX = 256
#: Longest event ``id`` (characters of ``[A-Za-z0-9._:-]``).
ID_MAX = 64

#: An event id: 1..ID_MAX characters of ``[A-Za-z0-9._:-]`` (``\Z``: ``$`` would allow a newline).
ID_PATTERN = rf"^[A-Za-z0-9._:-]{{1,{ID_MAX}}}\Z"
#: The control characters a name may not hold.
NAME_FORBIDDEN = r"[\x00-\x1f\x7f-\x9f]"
#: A job or fuzzer name: non-empty, no control characters (its length is bounded apart).
NAME_PATTERN = rf"^[^{NAME_FORBIDDEN[1:-1]}]+\Z"
_NAME_RE = re.compile(NAME_PATTERN)
_MISSING: Any = object()
_INT_SPECS = {name: FieldSpec(name, int) for name in ("seq", "v", "pid", "req", "max_frame")}
_WIRE_TYPE = {
    type(None): "nil", bool: "bool", int: "int", float: "float", str: "str", bytes: "bin",
    list: "array", dict: "map",
}  # fmt: skip
_TYPE_WORD = {int: "an integer", float: "a number", str: "a string", bytes: "binary (bin)",
              list: "an array of strings", dict: "a map"}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ErrorMsg:
    """The daemon reports a :class:`ProtocolError` or a refused event."""

    code: str
    message: str
    seq: int | None = None
    field: str | None = None
    fatal: bool = False


class ProtocolError(Exception):
    """Something the peer sent breaks the protocol; :attr:`code` says what, for machines.

    Attributes:
        code: A stable machine-readable code, e.g. ``"wrong_type"``.
        message: Human-readable text naming the message, seq, kind and field involved.
        field: The offending field's name, or ``None``.
        seq: The offending event's ``seq``, or ``None``.
        kind: The offending event's kind (for metrics), or ``None``.
        fatal: Whether the daemon closes the connection after reporting it.
    """

    fatal: ClassVar[bool] = False

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        seq: int | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.seq = seq
        self.kind = kind

    def to_message(self) -> ErrorMsg:
        """The ``error`` message that reports this error to the peer."""
        return ErrorMsg(self.code, self.message, self.seq, self.field, self.fatal)


class FrameError(ProtocolError):
    """The byte stream cannot be framed or decoded (fatal): ``frame_too_large``, ``empty_frame``,
    ``not_msgpack``, ``not_a_map``."""

    fatal = True


class MessageError(ProtocolError):
    """One message is invalid; it is dropped and the connection goes on (not fatal)."""


class SessionError(ProtocolError):
    """Messages came in an impossible order or version (fatal): ``unsupported_version``,
    ``no_hello``, ``hello_twice``."""

    fatal = True


def describe(value: object) -> str:
    """``value`` for an error message, in msgpack terms and never long: ``float 11.0``."""
    name = _WIRE_TYPE.get(type(value), "ext")
    if isinstance(value, str | bytes) and len(value) > 40:
        return f"{name} of length {len(value)}"
    if isinstance(value, list | dict):
        return f"{name} of {len(value)} items"
    return f"{name} {value!r}" if name != "ext" else f"ext {type(value).__name__}"


class Checker:
    """Validation helpers bound to one message's context (``where``, e.g. ``crash event seq 7``)."""

    __slots__ = ("kind", "label", "seq")

    def __init__(self, label: str, seq: int | None = None, kind: str | None = None) -> None:
        self.label = label
        self.seq = seq
        self.kind = kind

    @property
    def where(self) -> str:
        """The message, for error texts: ``crash event seq 7``. Built only when failing."""
        where = self.label if self.kind is None else f"{self.kind} {self.label}"
        return where if self.seq is None else f"{where} seq {self.seq}"

    def fail(self, code: str, name: str | None, text: str) -> MessageError:
        subject = f"field '{name}' " if name is not None else ""
        text = f"{self.where}: {subject}{text}"
        return MessageError(code, text, field=name, seq=self.seq, kind=self.kind)

    def typed(self, obj: dict[Any, Any], name: str, want: type, required: bool = True) -> Any:
        value: Any = obj.get(name, _MISSING)
        if value is _MISSING:
            if required:
                raise self.fail("missing_field", name, "is required")
            return None
        if type(value) is not want:
            got = describe(value)
            raise self.fail("wrong_type", name, f"must be {_TYPE_WORD[want]}, got {got}")
        if want is int:
            return self.field(_INT_SPECS.get(name) or FieldSpec(name, int), value)
        return value

    def name(self, obj: dict[Any, Any], name: str, required: bool = True) -> str | None:
        value: str | None = self.typed(obj, name, str, required)
        if value is None:
            return None
        if len(value) > NAME_MAX:
            raise self.fail("too_long", name, f"is {len(value)} characters, limit {NAME_MAX}")
        if not _NAME_RE.match(value):
            raise self.fail("out_of_range", name, "must be non-empty without control characters")
        return value

    def no_extra(self, obj: dict[Any, Any], allowed: tuple[str, ...]) -> None:
        for key in obj:
            if key not in allowed:
                raise self.fail("unknown_field", str(key), "is not part of this message")

    def _in_bounds(self, spec: FieldSpec, value: float) -> Any:
        if spec.low is not None and value < spec.low:
            if spec.high is not None:
                raise self.fail("out_of_range", spec.name,
                                f"must be {spec.low}..{spec.high}, got {value}")  # fmt: skip
            raise self.fail("out_of_range", spec.name, f"must be >= {spec.low}, got {value}")
        if spec.high is not None and value > spec.high:
            raise self.fail("out_of_range", spec.name,
                            f"must be {spec.low}..{spec.high}, got {value}")  # fmt: skip
        return value

    def field(self, spec: FieldSpec, value: Any) -> Any:
        """``value`` checked (and possibly truncated or widened) against ``spec``."""
        want, vtype, name, limit = spec.type, type(value), spec.name, spec.max_len
        if vtype is want or (want is float and vtype is int):
            if want is int:
                if not INT64_MIN <= value <= INT64_MAX:
                    raise self.fail("out_of_range", name, f"must fit in int64, got {value}")
                return self._in_bounds(spec, value)
            if want is float:
                value = float(value)
                if not math.isfinite(value):
                    raise self.fail("out_of_range", name, f"must be finite, got {value}")
                return self._in_bounds(spec, value)
            if spec.min_len and len(value.strip() if want is str else value) < spec.min_len:
                raise self.fail("out_of_range", name, "must not be empty")
            if limit is not None and len(value) > limit:
                if spec.truncate:
                    return value[:limit]
                unit = "bytes" if want is bytes else "items" if want is list else "characters"
                raise self.fail("too_long", name, f"is {len(value)} {unit}, limit {limit}")
            if want is list:
                for i, item in enumerate(value):
                    if type(item) is not spec.item:
                        want_item = _TYPE_WORD[spec.item]
                        raise self.fail("wrong_type", name, f"item {i} must be {want_item}, "
                                        f"got {describe(item)}")  # fmt: skip
                    if isinstance(item, str) and len(item) > FILE_NAME_MAX:
                        raise self.fail("too_long", name, f"item {i} is {len(item)} characters, "
                                        f"limit {FILE_NAME_MAX}")  # fmt: skip
            return value
        raise self.fail("wrong_type", name, f"must be {_TYPE_WORD[want]}, got {describe(value)}")
