"""The pfcollector wire protocol, sans-I/O: bytes in, validated messages out, messages to bytes.

A frame is a 4-byte unsigned big-endian length ``N`` followed by ``N`` bytes holding exactly one
msgpack map with string keys; key ``"t"`` names the message type. :class:`ServerConnection` is
the daemon's side (like ``h11.Connection``): feed it what the socket read with
:meth:`~ServerConnection.receive_data`, pull messages with :meth:`~ServerConnection.next_message`
(or, for the kinds a reader takes in bulk, runs of them with :meth:`~ServerConnection.next_run`).
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

import struct
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeAlias

import msgpack
from msgspec import DecodeError

from pfcollector.checks import (
    ID_MAX,
    NAME_MAX,
    Checker,
    ErrorMsg,
    FrameError,
    MessageError,
    ProtocolError,
    SessionError,
    describe,
)
from pfcollector.eventcheck import parse_event
from pfcollector.events import Kind
from pfcollector.packing import pack
from pfcollector.typed import TS_LIMIT, RunDecoder, decode_event

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

    def next_run(self, decoder: RunDecoder, limit: int) -> list[Any]:
        """Up to ``limit`` events of the decoder's kinds from the head of the buffer, consumed
        and returned as the structs it made of them (checked in C, names checked together, seq
        going up, ``ts`` in range); ``[]`` when the first frame is not one of them.

        A read's worth of stats costs one loop turn an event, with no message object and no
        fields dict: the caller makes those only for what it keeps. The run stops before a
        frame that is incomplete, of a bad size, refused by the decoder or out of order:
        :meth:`next_message` takes that one, and names what is wrong with it.
        """
        if self._error is not None or self.hello is None:
            return []
        run: list[Any] = []
        buf, pos, last, max_frame = self._buf, 0, self.last_seq, self.max_frame
        have, unpack_from, decode = len(buf), _HEADER.unpack_from, decoder.decode
        with memoryview(buf) as view:
            while len(run) < limit and pos + HEADER_SIZE <= have:
                (size,) = unpack_from(buf, pos)
                start = pos + HEADER_SIZE
                if not 0 < size <= max_frame or start + size > have:
                    break
                try:
                    event = decode(view[start : start + size])
                except DecodeError:
                    break
                ts = event.ts
                if event.seq <= last or (ts is not None and not 0 <= ts < TS_LIMIT):
                    break
                last = event.seq
                run.append(event)
                pos = start + size
        valid = decoder.valid_names(run) if run else 0
        if valid < len(run):  # rare: the frames from the bad name on are left for next_message
            del run[valid:]
            last = run[-1].seq if run else self.last_seq
            pos = 0
            for _ in run:
                pos += HEADER_SIZE + _HEADER.unpack_from(buf, pos)[0]
        del buf[:pos]  # O(1) at the front of a bytearray
        self.last_seq = last
        return run

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
                event = EventMsg(*parse_event(obj, self.last_seq))
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
