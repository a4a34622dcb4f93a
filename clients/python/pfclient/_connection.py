"""The blocking client's connection: non-blocking socket I/O driven by its calls.

A mixin of :class:`pfclient.Client` (which starts no thread): every call "pumps" the
connection without blocking, for at most its budget: connect if the backoff allows
(:meth:`Connection._try_connect`, which checks the listener's uid before sending anything),
write the encoded frames that fit in the socket, read and handle what the daemon sent. Waiting
calls use :meth:`Connection._wait_until`, which polls until a condition holds, time runs out,
or there is no daemon. A lost connection is dropped and its unacknowledged events are resent
on the next one with the same ids and fresh seqs.

Error handling:
    Socket errors, EOF and garbage become ``_Broken`` inside and a dropped connection outside;
    nothing here raises to a fail-open caller.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable

from ._errors import DaemonUnavailable, EventRejected, PfClientError, UntrustedDaemon
from ._fallback import Fallback, holds_bytes
from ._session import Pending, Session
from ._status import check_peer
from ._wire import WireError

__all__ = ["RECONNECT_MAX", "Connection"]

log = logging.getLogger("pfclient")

#: The longest wait between two reconnection attempts (it starts at :data:`_RECONNECT_MIN`).
RECONNECT_MAX = 2.0
_RECONNECT_MIN = 0.05
_LIVED = 1.0  # seconds a connection must have worked for a loss to be retried at once
_READ_SIZE = 64 * 1024
_OUT_AHEAD = 64 * 1024  # bytes encoded ahead of the socket (the rest stays droppable)
_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_NOSIGNAL", 0)  # no SIGPIPE, ever


class _Broken(Exception):
    """The connection is unusable (internal; turned into a reconnect)."""


class Connection:
    """The socket side of :class:`pfclient.Client` (see the module docstring)."""

    socket_path: str
    job_id: str
    fuzzer: str
    fail_open: bool
    _session: Session
    _fallback: Fallback
    _trusted: frozenset[int]
    _closed: bool

    def _init_connection(self) -> None:
        self._sock: socket.socket | None = None
        self._poll = select.poll()
        self._out = bytearray()  # encoded frames not yet written (hello, events, controls)
        self._unsent: deque[Pending] = deque()  # queued, not yet encoded on this connection
        self._connect_after = 0.0
        self._backoff = _RECONNECT_MIN
        self._welcomed_at = 0.0
        self._reconnected = False
        self._stalled = False  # a crash went unacknowledged on this connection
        self._away_logged = False
        self._last_error: BaseException | str = "not connected yet"
        self._last_refusal: EventRejected | None = None  # the daemon refused our hello

    def _pump(self, deadline: float) -> None:
        """Without blocking: connect if due, write what is ready, read what has arrived."""
        if self._sock is None and not self._try_connect():
            return
        try:
            while True:
                progressed = self._read()
                if self._session.welcome is not None:
                    self._fill(deadline)
                if self._out:
                    progressed = self._write() or progressed
                if not progressed or time.monotonic() >= deadline:
                    return
        except _Broken as exc:
            self._lost(exc)

    def _fill(self, deadline: float) -> None:
        """Encode queued events (fresh seqs) up to :data:`_OUT_AHEAD` bytes ahead, and not past
        ``deadline`` (a backlog of thousands of events is encoded over several calls)."""
        s, out, unsent = self._session, self._out, self._unsent
        n = 0
        while unsent and len(out) < _OUT_AHEAD:
            pending = unsent.popleft()
            if s.unacked.get(pending.id) is pending and pending.seq == 0:
                out += s.frame(pending)
                n += 1
                if n % 32 == 0 and time.monotonic() >= deadline:
                    return

    def _write(self) -> bool:
        sock = self._sock
        assert sock is not None
        try:
            sent = sock.send(self._out, _SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            raise _Broken(f"sending failed: {exc}") from exc
        del self._out[:sent]
        return sent > 0

    def _read(self) -> bool:
        """Handle every message already readable; whether anything came. Raises ``_Broken``."""
        sock = self._sock
        assert sock is not None
        s = self._session
        got = False
        while True:
            try:
                data = sock.recv(_READ_SIZE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return got
            except OSError as exc:
                raise _Broken(f"receiving failed: {exc}") from exc
            if not data:
                raise _Broken("the daemon closed the connection")
            got, self._stalled = True, False
            welcomed = s.welcome is not None
            try:
                s.feed(data)
            except WireError as exc:
                raise _Broken(str(exc)) from exc
            if s.hello_error is not None:
                raise _Broken(f"the daemon refused the hello: {s.hello_error}")
            if not welcomed and s.welcome is not None:
                self._welcomed()

    def _welcomed(self) -> None:
        welcome = self._session.welcome
        assert welcome is not None
        self._fallback.welcome(welcome)
        self._welcomed_at = time.monotonic()
        if self._away_logged:
            log.warning("reconnected to the pfcollector daemon at %s", self.socket_path)
        self._away_logged = False

    def _wait_until(self, done: Callable[[], bool], deadline: float) -> str:
        """Work the connection until ``done()``: ``"done"``, ``"timeout"``, or ``"absent"``
        (no daemon, after one immediate reconnection attempt in this call)."""
        while True:
            self._pump(deadline)
            if done():
                return "done"
            if self._sock is None:
                if self._try_connect(force=True):
                    continue
                return "absent"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            mask = select.POLLIN
            if self._out or (self._unsent and self._session.welcome is not None):
                mask |= select.POLLOUT
            self._poll.modify(self._sock, mask)
            self._poll.poll(math.ceil(remaining * 1000))

    # -- connecting -------------------------------------------------------------------------

    def _try_connect(self, force: bool = False) -> bool:
        """Connect without blocking and queue the hello; False if there is no daemon now.

        Not before the backoff allows, unless ``force`` (once per public call).
        """
        now = time.monotonic()
        if force:
            if self._reconnected:
                return False
            self._reconnected = True
        elif now < self._connect_after:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)  # fmt: skip
        try:
            sock.connect(self.socket_path)
            check_peer(sock, self.socket_path, self._trusted)
        except (OSError, UntrustedDaemon) as exc:
            sock.close()
            self._failed(exc)
            return False
        s = self._session
        s.job_id, s.fuzzer = self.job_id, self.fuzzer  # public attributes: say hello with them
        self._sock = sock
        self._poll.register(sock, select.POLLIN)
        self._out = bytearray(s.hello(os.getpid()))  # every queued event gets a fresh seq
        self._unsent = deque(s.unacked.values())
        self._stalled = False
        return True

    def _failed(self, reason: BaseException | str) -> None:
        """No daemon now: wait a little longer before the next attempt; say so once."""
        self._last_error = reason
        self._connect_after = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, RECONNECT_MAX)
        if self.fail_open and not self._away_logged:
            self._away_logged = True
            log.warning("pfcollector daemon at %s unavailable (%s); events are queued and "
                        "crashes go to the outbox %s until it is back", self.socket_path,
                        _reason(reason), self._fallback.outbox_dir())  # fmt: skip

    def _lost(self, exc: BaseException) -> None:
        s = self._session
        refused = s.hello_error
        was_welcomed = s.welcome is not None
        self._drop()
        if refused is not None:
            self._last_refusal = refused
        lived = time.monotonic() - self._welcomed_at if was_welcomed else 0.0
        if lived >= _LIVED:  # a working daemon went away: try again at once
            self._backoff = _RECONNECT_MIN
        self._failed(exc)
        if lived >= _LIVED and refused is None:
            self._connect_after = 0.0
        # A connection that breaks right after its welcome (a draining daemon, a fatal
        # error) is retried after a growing backoff, never in a tight loop.
        if self.fail_open:  # bytes that only this process holds: keep them durable
            self._fallback.spill(holds_bytes)

    def _connect_strict(self, deadline: float) -> None:
        """Fail-closed construction: connected and welcomed, or an exception."""
        self._reconnected = False
        if not self._try_connect(force=True):
            raise self._unavailable()
        outcome = self._wait_until(lambda: self._session.welcome is not None, deadline)
        if outcome == "done":
            return
        self._drop()
        if outcome == "timeout":
            raise DaemonUnavailable(f"pfcollector daemon at {self.socket_path}: no welcome "
                                    "in time")  # fmt: skip
        raise self._unavailable()

    def _unavailable(self) -> PfClientError:
        """The error for "no daemon": its refusal of our hello, or why it cannot be reached."""
        refused, self._last_refusal = self._last_refusal, None
        if refused is not None:
            return refused
        reason = self._last_error
        if isinstance(reason, DaemonUnavailable):
            return reason
        return DaemonUnavailable(f"cannot reach the pfcollector daemon at {self.socket_path}: "
                                 f"{_reason(reason)}")  # fmt: skip

    def _drop(self) -> None:
        """Forget the connection (events stay queued for the next one)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._poll.unregister(sock)
            sock.close()
        self._out = bytearray()
        self._session.replies.clear()
        self._session.welcome = None



def _reason(reason: BaseException | str) -> str:
    if isinstance(reason, OSError):
        return reason.strerror or str(reason) or type(reason).__name__
    return str(reason)
