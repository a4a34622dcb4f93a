"""The pfcollector wire protocol, sans-I/O: bytes in, validated messages out, messages to bytes.

A frame is a 4-byte unsigned big-endian length ``N`` followed by ``N`` bytes holding exactly one
msgpack map with string keys; key ``"t"`` names the message type. :class:`ServerConnection` is
the daemon's side (like ``h11.Connection``): feed it what the socket read with
:meth:`~ServerConnection.receive_data`, pull messages with :meth:`~ServerConnection.next_message`.
It owns the frame-size limit and the per-connection session rules (hello first, increasing
``seq``). Event fields are validated against :data:`pfcollector.events.SCHEMAS`.

This module never does I/O and never imports trio. ``docs/protocol.md`` is the prose version.

Error handling:
    Everything that is wrong with the peer's bytes raises a :class:`ProtocolError`, and nothing
    else. A :class:`MessageError` is not fatal: the bad frame is consumed and the connection
    stays usable. A :class:`FrameError` or :class:`SessionError` is fatal: reply with
    :meth:`ProtocolError.to_message`, then close; the connection raises it again on every call.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeAlias

import msgpack

from pfcollector.checks import (
    ID_MAX,
    ID_PATTERN,
    NAME_MAX,
    Checker,
    ErrorMsg,
    FrameError,
    MessageError,
    ProtocolError,
    SessionError,
    describe,
)
from pfcollector.events import INT64_MAX, INT64_MIN, SCHEMAS, FieldSpec, Kind
from pfcollector.packing import pack
from pfcollector.typed import TS_LIMIT as _TS_LIMIT
from pfcollector.typed import decode_event

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HEADER_SIZE",
    "ID_MAX",
    "NAME_MAX",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "Ack",
    "ClientMessage",
    "Control",
    "ErrorMsg",
    "EventMsg",
    "FrameError",
    "Hello",
    "MessageError",
    "ProtocolError",
    "Reply",
    "ServerConnection",
    "ServerMessage",
    "SessionError",
    "Welcome",
    "encode",
    "parse_server_message",
]

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: frozenset[int] = frozenset({1})
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
HEADER_SIZE = 4
_HEADER = struct.Struct(">I")
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
# Nothing legitimate nests deeply or holds huge containers; the frame length bounds the rest.
_MAX_CONTAINER_LEN = 4096


@dataclass(frozen=True, slots=True)
class Hello:
    """A producer introduces itself: first message of an event-sending connection."""

    version: int
    job_id: str
    fuzzer: str
    pid: int


# Not frozen: one is built per event on the hot path, and a frozen dataclass's __init__
# costs 4x a plain one (0.95 against 0.2 us measured). Treat it as read-only.
@dataclass(slots=True)
class EventMsg:
    """One validated event. ``fields`` has every field of the kind's schema (defaults filled);
    a crash's input bytes are ``fields["input"]``. ``ts_ns`` is nanoseconds since the epoch."""

    seq: int
    kind: Kind
    fields: dict[str, Any]
    id: str | None = None
    ts_ns: int | None = None
    job_id: str | None = None


@dataclass(frozen=True, slots=True)
class Control:
    """A control request (``status``, ``tune``, ...); answered by a :class:`Reply` with ``req``."""

    req: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Welcome:
    """The daemon's answer to a supported :class:`Hello`."""

    version: int
    daemon: str
    max_frame: int
    #: The daemon's outbox directory (absolute), where clients write events it cannot ack.
    outbox: str | None = None


@dataclass(frozen=True, slots=True)
class Ack:
    """Every event of this connection with ``seq`` at most this one has been handled."""

    seq: int


@dataclass(frozen=True, slots=True)
class Reply:
    """The daemon's answer to a :class:`Control` request."""

    req: int
    ok: bool
    result: Any = None
    error: str | None = None


ClientMessage: TypeAlias = Hello | EventMsg | Control
ServerMessage: TypeAlias = Welcome | Ack | ErrorMsg | Reply


def encode(msg: ClientMessage | ServerMessage) -> bytes:
    """The whole frame (length prefix included) carrying ``msg``.

    Raises:
        ValueError: the encoded message does not fit a 32-bit length.
    """
    obj: dict[str, Any]
    if isinstance(msg, EventMsg):
        obj = {"t": "event", "seq": msg.seq, "kind": msg.kind.value}
        if msg.id is not None:
            obj["id"] = msg.id
        if msg.ts_ns is not None:
            obj["ts"] = msg.ts_ns / 1e9
        if msg.job_id is not None:
            obj["job_id"] = msg.job_id
        # An optional field without a value (corpus ``contents``) is left out, not sent as nil.
        obj.update((k, v) for k, v in msg.fields.items() if v is not None)
    elif isinstance(msg, Ack):
        obj = {"t": "ack", "seq": msg.seq}
    elif isinstance(msg, Hello):
        obj = {"t": "hello", "v": msg.version, "job_id": msg.job_id, "fuzzer": msg.fuzzer,
               "pid": msg.pid}  # fmt: skip
    elif isinstance(msg, Control):
        obj = {"t": "control", "req": msg.req, "op": msg.op, "args": msg.args}
    elif isinstance(msg, Welcome):
        obj = {"t": "welcome", "v": msg.version, "daemon": msg.daemon, "max_frame": msg.max_frame}
        if msg.outbox is not None:
            obj["outbox"] = msg.outbox
    elif isinstance(msg, ErrorMsg):
        obj = {"t": "error", "code": msg.code, "message": msg.message, "seq": msg.seq,
               "field": msg.field, "fatal": msg.fatal}  # fmt: skip
    else:
        obj = {"t": "reply", "req": msg.req, "ok": msg.ok, "result": msg.result,
               "error": msg.error}  # fmt: skip
    body: bytes = pack(obj)
    if len(body) > 0xFFFFFFFF:
        raise ValueError(f"message of {len(body)} bytes does not fit a frame")
    return _HEADER.pack(len(body)) + body


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


def _parse_event(obj: dict[Any, Any], last_seq: int) -> EventMsg:
    """Validate an ``event`` map (which it consumes) into an :class:`EventMsg`.

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
        if not 0 <= ts < _TS_LIMIT:  # also refuses nan and inf
            raise Checker("event", seq, kind_name).fail(
                "out_of_range", "ts", f"must be seconds since the epoch, got {ts}")  # fmt: skip
        ts_ns = ts * 1_000_000_000 if type(ts) is int else round(ts * 1e9)
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
    return EventMsg(seq, kind, obj, event_id, ts_ns, job_id)


def _parse_hello(obj: dict[Any, Any]) -> Hello:
    check = Checker("hello")
    check.no_extra(obj, ("t", "v", "job_id", "fuzzer", "pid"))
    version = check.typed(obj, "v", int)
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in sorted(SUPPORTED_VERSIONS))
        raise SessionError("unsupported_version", f"hello: protocol version {version} is not "
                           f"supported; this daemon speaks {supported}", field="v")  # fmt: skip
    job_id, fuzzer = check.name(obj, "job_id"), check.name(obj, "fuzzer")
    pid = check.typed(obj, "pid", int)
    if pid < 0:
        raise check.fail("out_of_range", "pid", f"must not be negative, got {pid}")
    assert job_id is not None
    assert fuzzer is not None
    return Hello(version, job_id, fuzzer, pid)


def _parse_control(obj: dict[Any, Any]) -> Control:
    check = Checker("control")
    check.no_extra(obj, ("t", "req", "op", "args"))
    req, op = check.typed(obj, "req", int), check.typed(obj, "op", str)
    check.label = f"control req {req} op {op!r}"
    args = obj.get("args")
    args = {} if args is None else check.typed(obj, "args", dict)  # nil means no arguments
    for key in args:
        if type(key) is not str:
            raise check.fail("wrong_type", "args", f"keys must be strings, got {describe(key)}")
    return Control(req, op, args)


def parse_server_message(obj: dict[Any, Any]) -> ServerMessage:
    """Validate a decoded daemon->client map. Unknown keys are ignored (forward compatibility).

    Raises:
        MessageError: ``obj`` is not a valid welcome, ack, error or reply.
    """
    t = obj.get("t")
    check = Checker(f"{t} message" if type(t) is str else "message")
    if t == "ack":
        return Ack(check.typed(obj, "seq", int))
    if t == "error":
        seq, fld = obj.get("seq"), obj.get("field")
        if seq is not None:
            seq = check.typed(obj, "seq", int)
        if fld is not None:
            fld = check.typed(obj, "field", str)
        return ErrorMsg(check.typed(obj, "code", str), check.typed(obj, "message", str), seq,
                        fld, check.typed(obj, "fatal", bool))  # fmt: skip
    if t == "reply":
        error = obj.get("error")
        if error is not None:
            error = check.typed(obj, "error", str)
        return Reply(check.typed(obj, "req", int), check.typed(obj, "ok", bool),
                     obj.get("result"), error)  # fmt: skip
    if t == "welcome":
        outbox = obj.get("outbox")
        return Welcome(check.typed(obj, "v", int), check.typed(obj, "daemon", str),
                       check.typed(obj, "max_frame", int),
                       check.typed(obj, "outbox", str) if outbox is not None else None)  # fmt: skip
    raise MessageError("unknown_message", f"unknown message type {describe(t)}; expected "
                       "welcome, ack, error or reply", field="t")  # fmt: skip


class ServerConnection:
    """The daemon's side of one client connection: frames and validates what the client sends.

    Attributes:
        max_frame: Largest accepted frame body, checked as soon as the length prefix arrives.
        hello: The client's :class:`Hello`, once received.
        last_seq: The highest event ``seq`` seen (0 before any): an :class:`Ack` for it covers
            every event that did not raise.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if not 1 <= max_frame <= 0xFFFFFFFF:
            raise ValueError(f"max_frame must be 1..{0xFFFFFFFF}, got {max_frame}")
        self.max_frame = max_frame
        self.hello: Hello | None = None
        self.last_seq = 0
        self._buf = bytearray()
        self._eof = False
        self._error: ProtocolError | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes buffered and not yet returned as a message (a partial frame, once drained)."""
        return len(self._buf)

    @property
    def at_eof(self) -> bool:
        """The peer closed its side and nothing is left buffered."""
        return self._eof and not self._buf

    @property
    def truncated_eof(self) -> bool:
        """The peer closed its side in the middle of a frame."""
        return self._eof and bool(self._buf) and self._error is None

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the socket; ``b""`` means the peer closed its side.

        Raises:
            RuntimeError: data after EOF.
        """
        if self._eof:
            if data:
                raise RuntimeError("received data after EOF")
        elif not data:
            self._eof = True
        elif self._error is None:  # after a fatal error, nothing more is buffered
            self._buf += data

    def next_message(self) -> ClientMessage | None:
        """The next complete message, or ``None`` until more data arrives (or at EOF).

        Raises:
            MessageError: the frame held an invalid message; it is consumed, go on.
            FrameError: the stream cannot be framed; raised again on every later call.
            SessionError: hello missing, repeated or of an unsupported version; sticky too.
        """
        if self._error is not None:
            raise self._error.with_traceback(None)
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        (size,) = _HEADER.unpack_from(buf)
        if not 0 < size <= self.max_frame:
            self._fail(FrameError("empty_frame", "frame length is 0") if size == 0 else
                       FrameError("frame_too_large", f"frame of {size} bytes is larger than "
                                  f"max_frame {self.max_frame}"))  # fmt: skip
        end = HEADER_SIZE + size
        if len(buf) < end:
            return None
        view = memoryview(buf)[HEADER_SIZE:end]
        if self.hello is not None:  # an event, checked in C, or None: the Python way below
            typed = decode_event(view)
            if typed is not None and typed[0] > self.last_seq:
                view.release()
                del buf[:end]
                self.last_seq = typed[0]
                return EventMsg(*typed)
        try:
            # Stack traces and outputs are whatever the target printed: invalid UTF-8 becomes
            # U+FFFD rather than costing the frame (and the connection) its crash.
            obj = msgpack.unpackb(view, raw=False, strict_map_key=True, use_list=True,
                                  max_array_len=_MAX_CONTAINER_LEN,
                                  max_map_len=_MAX_CONTAINER_LEN,
                                  unicode_errors="replace")  # fmt: skip
        except Exception as exc:
            view.release()
            self._fail(FrameError("not_msgpack", f"frame of {size} bytes is not exactly one "
                                  f"msgpack object: {exc}"))  # fmt: skip
        view.release()
        del buf[:end]  # O(1) at the front of a bytearray
        if type(obj) is not dict:
            self._fail(FrameError("not_a_map", f"frame holds {describe(obj)}, not a map"))
        t = obj.get("t")
        if t == "event":
            if self.hello is None:
                self._fail(SessionError("no_hello", "event before hello"))
            try:
                event = _parse_event(obj, self.last_seq)
            except MessageError as exc:
                if exc.seq is not None:
                    self.last_seq = exc.seq  # a refused event still uses up its seq
                raise
            self.last_seq = event.seq
            return event
        if t == "control":
            return _parse_control(obj)
        if t == "hello":
            if self.hello is not None:
                self._fail(SessionError("hello_twice", "hello sent twice on one connection"))
            try:
                self.hello = _parse_hello(obj)
            except SessionError as exc:
                self._fail(exc)
            return self.hello
        raise MessageError("unknown_message", f"unknown message type {describe(t)}; expected "
                           "hello, event or control", field="t")  # fmt: skip

    def _fail(self, error: ProtocolError) -> NoReturn:
        """Make ``error`` sticky (it is fatal), drop the buffer, raise it."""
        self._error = error
        self._buf.clear()
        raise error
