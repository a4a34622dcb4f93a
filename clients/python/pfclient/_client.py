"""The blocking, thread-safe pfcollector client that fuzz harnesses embed.

The protocol bookkeeping (seqs, the unacknowledged queue, acks, rejections, replies, the
welcome) is the sans-I/O :class:`pfclient._session.Session`, shared with the async clients;
this module adds the socket I/O, the lock, the waiting and the reconnect policy.

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
from collections.abc import Callable
from typing import Any

from ._errors import DaemonUnavailable, EventRejected, FlushTimeout, PfClientError
from ._session import REJECTED_KEEP, Session, check_lifecycle
from ._status import open_socket, path_of, status
from ._wire import WireError

__all__ = ["REJECTED_KEEP", "Client", "status"]

_READ_SIZE = 64 * 1024
_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)  # no SIGPIPE, ever
_clients: weakref.WeakSet[Client] = weakref.WeakSet()


class _Broken(Exception):
    """The connection is unusable (internal; turned into a reconnect)."""


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
        self.socket_path = path_of(socket_path)
        self.job_id = job_id
        self.fuzzer = fuzzer
        self.timeout = timeout
        self.max_unacked = max_unacked
        self._session = Session(job_id, fuzzer)
        self._lock = threading.RLock()
        self._sock: socket.socket | None = None
        self._poll = select.poll()
        self._reconnected = False
        self._closed = False
        _clients.add(self)
        with self._lock:
            self._connect()

    @property
    def rejected(self) -> list[EventRejected]:
        """Every rejection seen (newest last, at most :data:`REJECTED_KEEP`)."""
        return self._session.rejected

    @rejected.setter
    def rejected(self, value: list[EventRejected]) -> None:
        self._session.rejected = value

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
        check_lifecycle(kind)
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
            s = self._session
            if not self._wait_until(lambda: not s.unacked, deadline):
                raise FlushTimeout(f"{len(s.unacked)} events not acknowledged by the daemon "
                                   f"at {self.socket_path} in time")  # fmt: skip
            first = s.take_unreported()
            if first is not None:
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
            req, frame = self._session.control(op, args)
            replies = self._session.replies
            self._send_control(frame, deadline)
            again = lambda: self._send_control(frame, deadline)  # noqa: E731
            if not self._wait_until(lambda: req in replies, deadline, resend=again):
                raise FlushTimeout(f"no reply to control op {op!r} from {self.socket_path}")
            reply = replies.pop(req)
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
        ts = time.time() if ts is None else ts  # the call's time, not the lock's
        s = self._session
        with self._lock:
            self._begin()
            pending = s.event(kind, fields, job_id, ts, event_id, waited=wait)
            deadline = time.monotonic() + self.timeout
            if not self._wait_until(lambda: len(s.unacked) < self.max_unacked, deadline):
                raise FlushTimeout(f"{len(s.unacked)} events unacknowledged by the daemon at "
                                   f"{self.socket_path}; it is not keeping up")  # fmt: skip
            s.unacked[event_id] = pending
            try:
                self._send(s.frame(pending), deadline)
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
                self._session.feed(data)
            except WireError as exc:
                raise _Broken(str(exc)) from exc

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
        sock = open_socket(self.socket_path, self.timeout)
        s = self._session
        s.job_id, s.fuzzer = self.job_id, self.fuzzer  # public attributes: say hello with them
        self._sock = sock
        hello = s.hello(os.getpid())
        self._poll.register(sock, select.POLLIN)
        try:
            self._send(hello, deadline)
            while not s.handshake_over():
                if not self._poll_for(select.POLLIN, deadline):
                    raise _Broken("no welcome from the daemon in time")
                self._drain()
        except _Broken as exc:
            if s.hello_error is None:
                raise self._unavailable(exc) from None
        if s.hello_error is not None:
            self._drop()
            raise s.hello_error
        try:
            for frame in s.resend():  # same ids, fresh seqs
                self._send(frame, deadline)
        except _Broken as exc:
            raise self._unavailable(exc) from None

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
        self._session.replies.clear()

    def _after_fork(self) -> None:
        """In a forked child: the parent's connection and queue are the parent's."""
        self._lock = threading.RLock()
        self._poll = select.poll()
        if self._sock is not None:
            self._sock.close()  # only the child's copy of the descriptor; the parent's stays open
            self._sock = None
        self._session.forget()


def _reset_after_fork() -> None:
    for client in list(_clients):
        client._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)
