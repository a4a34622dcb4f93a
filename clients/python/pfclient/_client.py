"""The blocking, thread-safe pfcollector client that fuzz harnesses embed.

Resource handling:
    A :class:`Client` owns one Unix socket. It starts no thread (harnesses fork): every call does
    its own I/O under one lock, and after each send it reads whatever acks are already waiting,
    without blocking, so the daemon's writes never back up. Frames not yet acknowledged are kept
    (at most ``max_unacked``; beyond that a call blocks reading acks: flow control) and are
    resent, with the same event ids and fresh seqs, after a reconnect.

Error handling:
    A broken connection (EPIPE, ECONNRESET, EOF, a garbled frame) is repaired by reconnecting
    once per call; if that fails the call raises :class:`DaemonUnavailable` and the events stay
    queued for the next call. A waiting call raises :class:`FlushTimeout` when its time is up.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import socket
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ._errors import DaemonUnavailable, EventRejected, FlushTimeout, PfClientError
from ._wire import (
    HEADER_SIZE,
    PROTOCOL_VERSION,
    FrameBuffer,
    WireError,
    default_socket_path,
    encode_frame,
)

__all__ = ["REJECTED_KEEP", "Client", "status"]

#: Most rejections :attr:`Client.rejected` keeps (the oldest are dropped first).
REJECTED_KEEP = 1024
_DEFAULT_MAX_FRAME = 16 * 1024 * 1024
_READ_SIZE = 64 * 1024
_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)  # no SIGPIPE, ever
_LIFECYCLE = ("started", "stopped", "error", "timeout")
_SEQ_PLACEHOLDER = 2**63 - 1  # widest seq encoding, to size a frame before it has its seq
_clients: weakref.WeakSet[Client] = weakref.WeakSet()


class _Broken(Exception):
    """The connection is unusable (internal; turned into a reconnect)."""


class _Pending:
    __slots__ = ("body", "done", "error", "id", "seq", "waited")

    def __init__(self, event_id: str, body: dict[str, Any], waited: bool) -> None:
        self.id = event_id
        self.body = body
        self.seq = 0  # on the current connection; 0 while not sent on it
        self.done = False
        self.error: EventRejected | None = None
        self.waited = waited  # a caller raises the rejection itself: flush need not


def _path_of(socket_path: str | os.PathLike[str] | None) -> str:
    return default_socket_path() if socket_path is None else os.fspath(socket_path)


def _open(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.settimeout(None)  # blocking; waits go through poll() with deadlines
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise DaemonUnavailable(f"cannot reach the pfcollector daemon at {path}: {reason}") from exc
    return sock


def _rejection(msg: dict[str, Any], event_id: str | None = None) -> EventRejected:
    seq, fld = msg.get("seq"), msg.get("field")
    return EventRejected(
        str(msg.get("code", "error")),
        str(msg.get("message", "")),
        seq if isinstance(seq, int) else None,
        fld if isinstance(fld, str) else None,
        event_id=event_id,
        fatal=msg.get("fatal") is True,
    )


class Client:
    """A connection to the pfcollector daemon for one fuzzing job.

    Every method may be called from any thread. A call that waits (``crash``, ``flush``,
    ``status``, or any call while ``max_unacked`` events are outstanding) holds the client
    while it waits: other threads' calls queue behind it.

    Args:
        socket_path: The daemon's socket; :func:`default_socket_path` when ``None``.
        job_id: The job every event belongs to unless a call names another.
        fuzzer: The fuzzer's name, e.g. ``"afl++"``.
        timeout: Seconds for connecting and the default for every wait.
        max_unacked: Events sent but not yet acknowledged before a call blocks.

    Raises:
        DaemonUnavailable: the daemon cannot be reached or does not answer the hello.
        EventRejected: the daemon refused the hello (e.g. ``unsupported_version``).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        job_id: str,
        fuzzer: str,
        timeout: float = 10.0,
        max_unacked: int = 4096,
    ) -> None:
        if max_unacked < 1:
            raise ValueError(f"max_unacked must be at least 1, got {max_unacked}")
        self.socket_path = _path_of(socket_path)
        self.job_id = job_id
        self.fuzzer = fuzzer
        self.timeout = timeout
        self.max_unacked = max_unacked
        #: Every rejection seen (newest last, at most :data:`REJECTED_KEEP`).
        self.rejected: list[EventRejected] = []
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._poll = select.poll()
        self._frames = FrameBuffer()
        self._seq = 0
        self._req = 0
        self._unacked: OrderedDict[str, _Pending] = OrderedDict()  # by event id, in send order
        self._replies: dict[int, dict[str, Any]] = {}
        self._unreported: list[EventRejected] = []
        self._welcome: dict[str, Any] | None = None
        self._hello_error: EventRejected | None = None
        self._max_frame = _DEFAULT_MAX_FRAME
        self._reconnected = False
        self._closed = False
        _clients.add(self)
        with self._lock:
            self._connect()

    # -- public API -------------------------------------------------------------------------

    def crash(
        self,
        type: str,
        input: bytes,
        *,
        signal: int = 0,
        exit_code: int = 0,
        output: str = "",
        stack_trace: str = "",
        job_id: str | None = None,
        ts: float | None = None,
        id: str | None = None,
    ) -> str:
        """Report a crash and wait until the daemon has stored it durably.

        ``id`` makes the event's id stable across retries by the caller (a watcher that
        restarts, say): the daemon stores an id once. By default a uuid4 is made here.

        Returns:
            The event id.

        Raises:
            EventRejected: the daemon refused this crash.
            FlushTimeout: no acknowledgement within :attr:`timeout`.
            DaemonUnavailable: the daemon cannot be reached (the crash stays queued).
        """
        fields = {"type": type, "signal": signal, "exit_code": exit_code, "output": output,
                  "stack_trace": stack_trace, "input": bytes(input)}  # fmt: skip
        return self._submit("crash", fields, job_id, ts, wait=True, event_id=id)

    def coverage(
        self,
        edges: int,
        *,
        new_edges: int = 0,
        exec_count: int = 0,
        job_id: str | None = None,
        ts: float | None = None,
        id: str | None = None,
    ) -> str:
        """Report coverage; returns the event id without waiting for the ack."""
        fields = {"edges": edges, "new_edges": new_edges, "exec_count": exec_count}
        return self._submit("coverage", fields, job_id, ts, event_id=id)

    def corpus(
        self,
        files: list[str],
        *,
        total_size: int = 0,
        contents: list[bytes] | None = None,
        job_id: str | None = None,
        ts: float | None = None,
        id: str | None = None,
    ) -> str:
        """Report corpus files; returns the event id without waiting for the ack.

        ``contents`` (one ``bytes`` per file) lets the daemon store the inputs once and
        deduplicate the corpus by content hash; without it, entries are deduplicated by name.
        """
        fields: dict[str, Any] = {"files": list(files), "total_size": total_size}
        if contents is not None:
            fields["contents"] = [bytes(c) for c in contents]
        return self._submit("corpus", fields, job_id, ts, event_id=id)

    def stats(
        self,
        *,
        job_id: str | None = None,
        ts: float | None = None,
        id: str | None = None,
        **fields: float,
    ) -> str:
        """Report fuzzer statistics (``executions=``, ``exec_per_second=``, ...); no wait."""
        return self._submit("stats", dict(fields), job_id, ts, event_id=id)

    def lifecycle(
        self,
        kind: str,
        message: str = "",
        *,
        job_id: str | None = None,
        ts: float | None = None,
        id: str | None = None,
    ) -> str:
        """Report ``started``, ``stopped``, ``error`` or ``timeout``; no wait."""
        if kind not in _LIFECYCLE:
            raise ValueError(f"lifecycle kind must be one of {', '.join(_LIFECYCLE)}, got {kind!r}")
        return self._submit(kind, {"message": message}, job_id, ts, event_id=id)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every event sent so far is acknowledged.

        Raises:
            FlushTimeout: events still unacknowledged after ``timeout`` (default
                :attr:`timeout`) seconds.
            EventRejected: the first event refused since the last flush (all of them are in
                :attr:`rejected`).
            DaemonUnavailable: the connection broke and reconnecting failed.
        """
        with self._lock:
            self._begin()
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            if not self._wait_until(lambda: not self._unacked, deadline):
                raise FlushTimeout(f"{len(self._unacked)} events not acknowledged by the daemon "
                                   f"at {self.socket_path} in time")  # fmt: skip
            if self._unreported:
                first = self._unreported[0]
                self._unreported.clear()
                raise first

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        """The daemon's status (control op ``status``)."""
        result = self.control("status", timeout=timeout)
        return result if isinstance(result, dict) else {"result": result}

    def control(
        self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Send control request ``op`` and return the reply's ``result``.

        Raises:
            PfClientError: the daemon answered ``ok: false`` (its error is the message).
            FlushTimeout: no reply in time.
        """
        with self._lock:
            self._begin()
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            self._req += 1
            req = self._req
            frame = encode_frame({"t": "control", "req": req, "op": op, "args": args or {}})
            self._send_control(frame, deadline)
            again = lambda: self._send_control(frame, deadline)  # noqa: E731
            if not self._wait_until(lambda: req in self._replies, deadline, resend=again):
                raise FlushTimeout(f"no reply to control op {op!r} from {self.socket_path}")
            reply = self._replies.pop(req)
        if reply.get("ok") is not True:
            raise PfClientError(f"control op {op!r} failed: {reply.get('error')}")
        return reply.get("result")

    def close(self) -> None:
        """Flush (best effort, up to :attr:`timeout`), then close the socket. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self.flush()
            except PfClientError:
                pass
            finally:
                self._drop()
                self._closed = True

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- sending ----------------------------------------------------------------------------

    def _begin(self) -> None:
        if self._closed:
            raise PfClientError("the client is closed")
        self._reconnected = False  # each public call may reconnect once

    def _submit(
        self, kind: str, fields: dict[str, Any], job_id: str | None, ts: float | None,
        wait: bool = False, event_id: str | None = None,
    ) -> str:  # fmt: skip
        event_id = event_id or str(uuid.uuid4())
        body: dict[str, Any] = {
            "t": "event", "seq": _SEQ_PLACEHOLDER, "kind": kind, "id": event_id,
            "ts": time.time() if ts is None else ts,
        }  # fmt: skip
        if job_id is not None:
            body["job_id"] = job_id
        body.update(fields)
        with self._lock:
            self._begin()
            size = len(encode_frame(body)) - HEADER_SIZE
            if size > self._max_frame:
                raise EventRejected("frame_too_large", f"{kind} event is {size} bytes, the "
                                    f"daemon's max_frame is {self._max_frame}")  # fmt: skip
            deadline = time.monotonic() + self.timeout
            if not self._wait_until(lambda: len(self._unacked) < self.max_unacked, deadline):
                raise FlushTimeout(f"{len(self._unacked)} events unacknowledged by the daemon at "
                                   f"{self.socket_path}; it is not keeping up")  # fmt: skip
            pending = _Pending(event_id, body, waited=wait)
            self._unacked[event_id] = pending
            try:
                self._send_event(pending, deadline)
            except _Broken:
                self._recover()  # resends everything queued, this event included
            if wait:
                if not self._wait_until(lambda: pending.done, deadline):
                    pending.waited = False  # so a late rejection reaches flush()
                    raise FlushTimeout(f"{kind} event {event_id} not acknowledged in time")
                if pending.error is not None:
                    raise pending.error
        return event_id

    def _send_control(self, frame: bytes, deadline: float) -> None:
        try:
            self._send(frame, deadline)
        except _Broken:
            self._recover()
            try:
                self._send(frame, deadline)
            except _Broken as exc:
                raise self._unavailable(exc) from None

    def _send_event(self, pending: _Pending, deadline: float) -> None:
        self._seq += 1
        pending.seq = pending.body["seq"] = self._seq
        self._send(encode_frame(pending.body), deadline)

    def _send(self, frame: bytes, deadline: float) -> None:
        """Write ``frame`` whole, reading acks while the socket is full. Raises ``_Broken``."""
        sock = self._sock
        if sock is None:
            raise _Broken("not connected")
        view = memoryview(frame)
        try:
            while view:
                with contextlib.suppress(BlockingIOError):
                    view = view[sock.send(view, _SEND_FLAGS) :]
                if view:
                    ready = self._poll_for(select.POLLIN | select.POLLOUT, deadline)
                    if not ready:
                        raise _Broken("timed out writing to the daemon")
                    if ready & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        self._drain()
            self._drain()
        except OSError as exc:
            raise _Broken(f"sending failed: {exc}") from exc

    # -- receiving --------------------------------------------------------------------------

    def _poll_for(self, mask: int, deadline: float) -> int:
        sock = self._sock
        assert sock is not None
        self._poll.modify(sock, mask)
        remaining = max(0.0, deadline - time.monotonic())
        events = self._poll.poll(math.ceil(remaining * 1000))
        return events[0][1] if events else 0

    def _drain(self) -> None:
        """Handle every message already readable, without blocking. Raises ``_Broken``."""
        sock = self._sock
        assert sock is not None
        while True:
            try:
                data = sock.recv(_READ_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                raise _Broken(f"receiving failed: {exc}") from exc
            if not data:
                raise _Broken("the daemon closed the connection")
            try:
                messages = self._frames.feed(data)
            except WireError as exc:
                raise _Broken(str(exc)) from exc
            for msg in messages:
                self._handle(msg)

    def _handle(self, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "ack" and isinstance(msg.get("seq"), int):
            acked: int = msg["seq"]
            unacked = self._unacked
            while unacked:
                pending = unacked[next(iter(unacked))]  # O(1): an OrderedDict
                if not 0 < pending.seq <= acked:
                    break
                del unacked[pending.id]
                pending.done = True
        elif t == "error":
            if self._welcome is None:
                self._hello_error = _rejection(msg)
                return
            found = next((p for p in self._unacked.values() if p.seq == msg.get("seq")), None)
            error = _rejection(msg, found.id if found is not None else None)
            if found is not None:
                del self._unacked[found.id]
                found.done, found.error = True, error
            self.rejected.append(error)
            del self.rejected[:-REJECTED_KEEP]
            if found is None or not found.waited:
                self._unreported.append(error)
        elif t == "reply" and isinstance(msg.get("req"), int):
            self._replies[msg["req"]] = msg
        elif t == "welcome":
            self._welcome = msg

    def _wait_until(
        self, done: Callable[[], bool], deadline: float, resend: Callable[[], None] | None = None
    ) -> bool:
        """Read from the daemon until ``done()`` or the deadline; False if time ran out."""
        while not done():
            if self._sock is None:
                self._recover()
                if resend is not None:
                    resend()
                continue
            try:
                if self._poll_for(select.POLLIN, deadline):
                    self._drain()
                elif time.monotonic() >= deadline:
                    return False
            except _Broken:
                self._drop()
        return True

    # -- connecting -------------------------------------------------------------------------

    def _recover(self) -> None:
        """Reconnect (once per public call) and resend every unacknowledged event."""
        if self._reconnected:
            self._drop()
            raise DaemonUnavailable(f"lost the connection to the pfcollector daemon at "
                                    f"{self.socket_path} again after reconnecting")  # fmt: skip
        self._reconnected = True
        self._drop()
        self._connect()

    def _connect(self) -> None:
        deadline = time.monotonic() + self.timeout
        sock = _open(self.socket_path, self.timeout)
        self._sock, self._frames, self._seq = sock, FrameBuffer(), 0
        self._reset_handshake()
        self._poll.register(sock, select.POLLIN)
        hello = {"t": "hello", "v": PROTOCOL_VERSION, "job_id": self.job_id,
                 "fuzzer": self.fuzzer, "pid": os.getpid()}  # fmt: skip
        try:
            self._send(encode_frame(hello), deadline)
            while self._welcome is None and self._hello_error is None:
                if not self._poll_for(select.POLLIN, deadline):
                    raise _Broken("no welcome from the daemon in time")
                self._drain()
        except _Broken as exc:
            if self._refusal() is None:
                raise self._unavailable(exc) from None
        refused = self._refusal()
        if refused is not None:
            self._drop()
            raise refused
        assert self._welcome is not None
        max_frame = self._welcome.get("max_frame")
        self._max_frame = max_frame if isinstance(max_frame, int) else _DEFAULT_MAX_FRAME
        for pending in self._unacked.values():
            pending.seq = 0
        try:
            for pending in list(self._unacked.values()):
                self._send_event(pending, deadline)  # same id, fresh seq
        except _Broken as exc:
            raise self._unavailable(exc) from None

    def _reset_handshake(self) -> None:
        # a method, so mypy does not narrow these to None for the handshake loop
        self._welcome = self._hello_error = None

    def _refusal(self) -> EventRejected | None:
        return self._hello_error

    def _unavailable(self, reason: object) -> DaemonUnavailable:
        self._drop()
        return DaemonUnavailable(f"pfcollector daemon at {self.socket_path}: {reason}")

    def _drop(self) -> None:
        """Forget the connection (events stay queued for the next one)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._poll.unregister(sock)
            sock.close()
        self._replies.clear()

    def _after_fork(self) -> None:
        """In a forked child: the parent's connection and queue are the parent's."""
        self._lock = threading.RLock()
        self._poll = select.poll()
        if self._sock is not None:
            self._sock.close()  # only the child's copy of the descriptor; the parent's stays open
            self._sock = None
        self._unacked.clear()
        self._replies.clear()


def _reset_after_fork() -> None:
    for client in list(_clients):
        client._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


def status(
    socket_path: str | os.PathLike[str] | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """Ask the daemon for its status over a fresh connection, without a hello.

    Raises:
        DaemonUnavailable: no daemon at the path, or it closed the connection.
        FlushTimeout: no reply within ``timeout``.
        PfClientError: the daemon answered an error.
    """
    path = _path_of(socket_path)
    deadline = time.monotonic() + timeout
    frames = FrameBuffer()
    with _open(path, timeout) as sock:
        try:
            sock.settimeout(timeout)
            sock.sendall(encode_frame({"t": "control", "req": 1, "op": "status", "args": {}}))
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = sock.recv(_READ_SIZE)
                if not data:
                    raise DaemonUnavailable(f"pfcollector daemon at {path}: closed the connection")
                for msg in frames.feed(data):
                    if msg["t"] == "error":
                        raise _rejection(msg)
                    if msg["t"] == "reply" and msg.get("req") == 1:
                        if msg.get("ok") is not True:
                            raise PfClientError(f"status failed: {msg.get('error')}")
                        result = msg.get("result")
                        return result if isinstance(result, dict) else {"result": result}
        except TimeoutError:
            raise FlushTimeout(f"no status reply from the daemon at {path} in time") from None
        except WireError as exc:
            raise PfClientError(f"the daemon at {path} sent garbage: {exc}") from exc
        except OSError as exc:
            raise DaemonUnavailable(f"pfcollector daemon at {path}: {exc}") from exc
