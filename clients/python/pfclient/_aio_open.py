"""Fail-open behaviour of the async clients (asyncio and trio), as a mixin of
:class:`pfclient.aio.BaseAsyncClient`.

A background connector task (started on entry and whenever the connection is lost) connects,
checks the daemon's uid, says hello, waits for the welcome and resends the queue with the same
ids, retrying with a backoff up to :data:`RECONNECT_MAX`. Calls never wait for it: a
non-waiting call queues its event (the queue bounded by ``queue_bytes``, oldest stats and
coverage dropped first) and writes it if a welcomed connection exists, spending at most
``budget`` seconds; a connection that cannot take a write in that time (a hung daemon) is
dropped and left to the connector. ``crash`` waits up to ``timeout`` for the durable ack, else
writes the crash to the outbox.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ._errors import DaemonUnavailable, FlushTimeout, OutboxUnavailable, PfClientError
from ._fallback import DROPPABLE, RETRY_LATER, Fallback, durable, holds_bytes
from ._session import Pending, Session

__all__ = ["RECONNECT_MAX", "FailOpenMixin"]

log = logging.getLogger("pfclient")

#: The longest wait between two reconnection attempts.
RECONNECT_MAX = 2.0
_RECONNECT_MIN = 0.05
_LIVED = 1.0  # seconds a connection must have worked for a loss to be retried at once
_CLOSE_FLUSH = 1.0


class FailOpenMixin:
    """The fail-open paths; the host class provides the I/O and ``_reconnect``."""

    socket_path: str
    timeout: float
    budget: float
    _session: Session
    _fallback: Fallback
    _connected: bool
    _closed: bool

    def _init_open(self) -> None:
        self._backoff = _RECONNECT_MIN
        self._welcomed_at = 0.0
        self._wait_first = False  # the last connection broke right after its welcome
        self._connector: Any = None  # a cancel handle while the connector runs
        self._stalled = False
        self._away_logged = False

    # -- provided by the host ----------------------------------------------------------------

    async def _reconnect(self, call: Any) -> None:
        raise NotImplementedError

    def _new_call(self, seconds: float) -> Any:
        raise NotImplementedError

    async def _write(self, frame: bytes) -> None:
        raise NotImplementedError

    async def _drop(self) -> None:
        raise NotImplementedError

    def _spawn(self, fn: Callable[[], Any]) -> Any:
        raise NotImplementedError

    async def _sleep(self, seconds: float) -> None:
        raise NotImplementedError

    async def _bounded(self, awaitable: Any, seconds: float) -> bool:
        raise NotImplementedError

    def _changed_event(self) -> Any:
        raise NotImplementedError

    async def _wait_changed(self, event: Any, seconds: float) -> None:
        raise NotImplementedError

    # -- the connector -----------------------------------------------------------------------

    @property
    def _welcomed(self) -> bool:
        return self._is_welcomed()

    def _is_welcomed(self) -> bool:
        return self._connected and self._session.welcome is not None

    def _start_connector(self) -> None:
        if self._connector is None and not self._closed and not self._welcomed:
            self._connector = self._spawn(self._connect_loop)

    async def _connect_loop(self) -> None:
        try:
            if self._wait_first:  # never reconnect in a tight loop to a daemon that drops us
                await self._sleep(self._backoff)
                self._backoff = min(self._backoff * 2, RECONNECT_MAX)
            while not self._closed and not self._welcomed:
                try:
                    await self._reconnect(self._new_call(self.timeout))
                except PfClientError as exc:
                    self._note_away(exc)
                else:
                    if self._is_welcomed():
                        self._welcomed_at = time.monotonic()
                        if self._away_logged:
                            log.warning("reconnected to the pfcollector daemon at %s",
                                        self.socket_path)  # fmt: skip
                        self._away_logged = False
                        return
                await self._sleep(self._backoff)
                self._backoff = min(self._backoff * 2, RECONNECT_MAX)
        finally:
            self._connector = None

    def _note_away(self, exc: BaseException) -> None:
        if not self._away_logged:
            self._away_logged = True
            log.warning("%s; events are queued and crashes go to the outbox %s until it is "
                        "back", exc, self._fallback.outbox_dir())  # fmt: skip

    def _lost_open(self) -> None:
        """The reader saw the connection end (fail-open): keep what only we hold, reconnect."""
        lived = time.monotonic() - self._welcomed_at
        self._wait_first = lived < _LIVED
        if not self._wait_first:
            self._backoff = _RECONNECT_MIN
        self._fallback.spill(holds_bytes)
        self._start_connector()

    # -- calls -------------------------------------------------------------------------------

    async def _submit_open(self, pending: Pending, wait: bool) -> str:
        fb, s = self._fallback, self._session
        if wait:
            return await self._crash_open(pending)
        if holds_bytes(pending) and not self._welcomed:
            try:
                fb.to_outbox(pending)  # its bytes would be lost with this process
                return pending.id
            except OutboxUnavailable as exc:
                log.warning("%s", exc)
        if not fb.make_room(pending):
            if pending.kind in DROPPABLE:
                fb.dropped[pending.kind] += 1
                return pending.id
            try:
                fb.to_outbox(pending)
                return pending.id
            except OutboxUnavailable as exc:
                log.warning("%s; the event stays queued past queue_bytes", exc)
        s.queue(pending)
        fb.queued(pending)
        if self._welcomed and self._connector is None:
            await self._write_within(s.frame(pending), self.budget)
        else:
            self._start_connector()  # it sends what is queued once welcomed
        return pending.id

    async def _crash_open(self, pending: Pending) -> str:
        fb, s = self._fallback, self._session
        deadline = time.monotonic() + self.timeout
        # A connection on its way (not known to be away): wait for its welcome, within timeout.
        while not self._is_welcomed() and self._connector is not None and not self._away_logged:
            changed = self._changed_event()
            remaining = deadline - time.monotonic()
            if self._is_welcomed() or remaining <= 0:
                break
            await self._wait_changed(changed, min(remaining, 0.05))
        if not self._welcomed or self._stalled or not fb.make_room(pending):
            self._start_connector()
            fb.to_outbox(pending)
            return pending.id
        s.queue(pending)
        if self._connector is None:  # else the connector is resending, this one included
            await self._write_within(s.frame(pending), self.timeout)
        while not pending.done and self._connected:
            changed = self._changed_event()
            if _done(pending) or not self._connected:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._stalled = True  # the next crashes do not wait for this daemon
                log.warning("the daemon at %s did not acknowledge a crash in %.1fs; crashes "
                            "go to the outbox until it answers", self.socket_path,
                            self.timeout)  # fmt: skip
                break
            await self._wait_changed(changed, remaining)
        if pending.done and pending.error is None:
            return pending.id
        if pending.done and pending.error is not None and pending.error.code not in RETRY_LATER:
            raise pending.error
        s.discard(pending)
        fb.to_outbox(pending)
        return pending.id

    async def _write_within(self, frame: bytes, seconds: float) -> None:
        """Write ``frame``; a connection that cannot take it in time is dropped (reconnect)."""
        try:
            if await self._bounded(self._write(frame), seconds):
                return
        except OSError:
            pass
        await self._drop()
        self._start_connector()

    async def _flush_open(self, seconds: float) -> None:
        s = self._session
        deadline = time.monotonic() + seconds
        while s.unacked:
            if not self._welcomed and (self._away_logged or self._connector is None):
                self._start_connector()  # known to be away: say so now rather than wait
                raise DaemonUnavailable(f"no pfcollector daemon at {self.socket_path} now; "
                                        f"{len(s.unacked)} events stay queued")  # fmt: skip
            changed = self._changed_event()
            if not s.unacked:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FlushTimeout(f"{len(s.unacked)} events not acknowledged by the daemon "
                                   f"at {self.socket_path} in time")  # fmt: skip
            await self._wait_changed(changed, remaining)

    async def _close_open(self) -> None:
        try:
            if self._session.unacked and (self._connected or self._connector) and not self._stalled:
                await self._flush_open(min(self.timeout, _CLOSE_FLUSH))
        except PfClientError:
            pass
        self._fallback.spill(durable)


def _done(pending: Pending) -> bool:
    return pending.done  # a call, so the checker does not keep the loop condition's narrowing
