"""The blocking, thread-safe pfcollector client that fuzz harnesses embed.

The protocol bookkeeping (seqs, the unacknowledged queue, acks, rejections, replies, the
welcome) is the sans-I/O :class:`pfclient._session.Session`, shared with the async clients;
this module adds the socket I/O, the lock, the waiting, the reconnect policy and the outbox.

Fail-open (the default): the harness comes first. Creating the client, ``stats``,
``coverage``, ``corpus`` and ``lifecycle`` never raise because the daemon is absent, hung or
untrusted, and never spend more than ``budget`` seconds (default :data:`DEFAULT_BUDGET`) on
I/O: every socket operation is non-blocking, the handshake completes in the background of
later calls, and a lost daemon is reconnected to (with a backoff up to :data:`RECONNECT_MAX`)
in the background of later calls, which resend what it had not acknowledged, with the same
ids. Meanwhile events wait in a queue bounded in bytes (``queue_bytes``, default
:data:`DEFAULT_QUEUE_BYTES`): past it the oldest stats and coverage are dropped, counted in
:attr:`Client.dropped`. ``crash()`` waits up to ``timeout`` for the daemon's durable ack; without
one (no daemon, a refused or untrusted connection, a hung daemon) it writes the crash to the
outbox (``docs/protocol.md``, "The outbox") and returns its id; it raises only if that fails
too. A corpus event with ``contents`` takes the outbox when no daemon holds it.

``fail_open=False`` keeps the strict behaviour: the constructor and calls raise
:class:`DaemonUnavailable`, waits raise :class:`FlushTimeout`, a full queue blocks.

Resource handling:
    A :class:`Client` owns one Unix socket and starts no thread (harnesses fork).

Error handling:
    A refused event raises :class:`EventRejected` (from ``crash`` or ``flush``) in both modes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from typing import Any

from ._connection import RECONNECT_MAX, Connection
from ._errors import (
    EventRejected,
    FlushTimeout,
    OutboxUnavailable,
    PfClientError,
)
from ._fallback import (
    DEFAULT_BUDGET,
    DEFAULT_QUEUE_BYTES,
    DROPPABLE,
    RETRY_LATER,
    Fallback,
    FallbackCounters,
    durable,
    holds_bytes,
    prune,
)
from ._session import REJECTED_KEEP, Pending, Session, check_lifecycle
from ._status import path_of, status, trusted_uids

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_QUEUE_BYTES",
    "RECONNECT_MAX",
    "REJECTED_KEEP",
    "RETRY_LATER",
    "Client",
    "status",
]

log = logging.getLogger("pfclient")

_CLOSE_FLUSH = 1.0  # seconds close() waits for acks in fail-open mode
_clients: weakref.WeakSet[Client] = weakref.WeakSet()


class Client(Connection, FallbackCounters):
    """A connection to the pfcollector daemon for one fuzzing job.

    Every method may be called from any thread; one lock serialises them.

    Args:
        socket_path: The daemon's socket; :func:`default_socket_path` when ``None``.
        job_id: The job every event belongs to unless a call names another.
        fuzzer: The fuzzer's name, e.g. ``"afl++"``.
        timeout: Seconds ``crash`` waits for the durable ack (then: the outbox), and the
            default of every explicit wait (``flush``, ``status``).
        max_unacked: Events sent and not yet acknowledged before the queue counts as full.
        fail_open: Never raise or block for a missing, hung or untrusted daemon (above).
        budget: Seconds a non-waiting call may spend on I/O (fail-open).
        queue_bytes: Bound of the in-client queue, in bytes of encoded events.
        outbox: The outbox directory to use until a daemon names its own (``welcome``);
            default ``$PFCOLLECTOR_OUTBOX`` or ``<data dir>/outbox``.
        trust_uids: Uids besides this process's own and root that the daemon may run as
            (also ``$PFCOLLECTOR_DAEMON_UID``, comma-separated).

    Attributes:
        dropped: Stats and coverage events dropped from a full queue, by kind.
        outboxed: Events written to the outbox.

    Raises:
        DaemonUnavailable: (``fail_open=False``) the daemon cannot be reached or does not
            answer the hello in time; :class:`UntrustedDaemon` if it runs as a foreign uid.
        EventRejected: (``fail_open=False``) the daemon refused the hello.
        ValueError: bad arguments, or a bad ``$PFCOLLECTOR_DAEMON_UID``.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        job_id: str,
        fuzzer: str,
        timeout: float = 10.0,
        max_unacked: int = 4096,
        fail_open: bool = True,
        budget: float = DEFAULT_BUDGET,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        outbox: str | os.PathLike[str] | None = None,
        trust_uids: Iterable[int] | None = None,
    ) -> None:
        if max_unacked < 1:
            raise ValueError(f"max_unacked must be at least 1, got {max_unacked}")
        self.socket_path = path_of(socket_path)
        self.job_id = job_id
        self.fuzzer = fuzzer
        self.timeout = timeout
        self.max_unacked = max_unacked
        self.fail_open = fail_open
        self.budget = budget
        self.queue_bytes = queue_bytes
        self.outbox = os.fspath(outbox) if outbox is not None else None
        self._trusted = trusted_uids(trust_uids)
        self._session = Session(job_id, fuzzer)
        self._fallback = Fallback(self._session, self.socket_path, queue_bytes=queue_bytes,
                                  max_unacked=max_unacked, outbox=self.outbox)  # fmt: skip
        self._lock = threading.RLock()
        self._closed = False
        self._init_connection()
        _clients.add(self)
        with self._lock:
            if fail_open:  # a live daemon welcomes us within the budget, usually
                self._wait_until(lambda: self._session.welcome is not None,
                                 time.monotonic() + budget)  # fmt: skip
            else:
                self._connect_strict(time.monotonic() + timeout)

    @property
    def rejected(self) -> list[EventRejected]:
        """Every rejection seen (newest last, at most :data:`REJECTED_KEEP`)."""
        return self._session.rejected

    @rejected.setter
    def rejected(self, value: list[EventRejected]) -> None:
        self._session.rejected = value

    @property
    def connected(self) -> bool:
        """Whether the daemon answered this connection's hello (and it is still open)."""
        return self._sock is not None and self._session.welcome is not None

    def outbox_dir(self) -> str:
        """Where this client writes what the daemon could not acknowledge."""
        return self._fallback.outbox_dir()

    @property
    def queued_bytes(self) -> int:
        """Bytes of events waiting for the daemon's ack."""
        return self._session.queued_bytes

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
        """Report a crash; return once it is durable (in the daemon's spool, or the outbox).

        ``id`` makes the event's id stable across retries by the caller (a watcher that
        restarts, say): the daemon stores an id once. By default a uuid4 is made here.

        Returns:
            The event id.

        Raises:
            EventRejected: the daemon refused this crash as invalid.
            OutboxUnavailable: (fail-open) neither the daemon nor the outbox took it.
            FlushTimeout, DaemonUnavailable: (``fail_open=False``) no ack in time, no daemon.
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
        With ``contents``, an event no daemon holds goes to the outbox (fail-open).
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
            DaemonUnavailable: there is no daemon to acknowledge them (they stay queued).
        """
        with self._lock:
            self._begin()
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            s = self._session
            outcome = self._wait_until(lambda: not s.unacked, deadline)
            if outcome == "absent":
                raise self._unavailable()
            if outcome == "timeout":
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
            FlushTimeout: no reply in time. DaemonUnavailable: no daemon.
        """
        with self._lock:
            self._begin()
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            req, frame = self._session.control(op, args)
            replies = self._session.replies
            for _attempt in range(2):
                if self._sock is None and not self._try_connect(force=True):
                    raise self._unavailable()
                self._out += frame
                outcome = self._wait_until(lambda: req in replies or self._sock is None,
                                           deadline)  # fmt: skip
                if req in replies:
                    break
                if outcome == "timeout":
                    raise FlushTimeout(f"no reply to control op {op!r} from {self.socket_path}")
            else:
                raise self._unavailable()
            reply = replies.pop(req)
        if reply.get("ok") is not True:
            raise PfClientError(f"control op {op!r} failed: {reply.get('error')}")
        return reply.get("result")

    def close(self) -> None:
        """Flush (best effort), then close the socket. Idempotent.

        Fail-open: waits at most about a second, never raises, and writes the lifecycle and
        corpus events still unacknowledged to the outbox (stats and coverage are dropped).
        """
        with self._lock:
            if self._closed:
                return
            try:
                if not self.fail_open:
                    self.flush()
                elif self._session.unacked and self._sock is not None and not self._stalled:
                    self.flush(timeout=min(self.timeout, _CLOSE_FLUSH))
            except PfClientError:
                pass
            finally:
                if self.fail_open:
                    self._fallback.spill(durable)
                self._drop()
                self._closed = True

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- submitting -------------------------------------------------------------------------

    def _begin(self) -> None:
        if self._closed:
            raise PfClientError("the client is closed")
        self._reconnected = False  # each public call may reconnect at once, once

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
            if self.fail_open:
                if wait:
                    return self._crash_open(pending)
                self._queue_open(pending)
                return event_id
            deadline = time.monotonic() + self.timeout
            if self._wait_until(self._has_room, deadline) == "timeout":
                raise FlushTimeout(f"{len(s.unacked)} events unacknowledged by the daemon at "
                                   f"{self.socket_path}; it is not keeping up")  # fmt: skip
            self._enqueue(pending)
            outcome = self._wait_until(
                (lambda: pending.done) if wait else self._written, deadline
            )
            if outcome == "absent":
                raise self._unavailable()
            if outcome == "timeout":
                pending.waited = False  # so a late rejection reaches flush()
                raise FlushTimeout(f"{kind} event {event_id} not acknowledged in time")
            if wait and pending.error is not None:
                raise pending.error
        return event_id

    def _queue_open(self, pending: Pending) -> None:
        """Fail-open, non-waiting: queue (making room) and do a budget's worth of I/O."""
        deadline = time.monotonic() + self.budget
        self._pump(deadline)
        fallback = self._fallback
        if holds_bytes(pending) and not self.connected:
            with contextlib.suppress(OutboxUnavailable):
                fallback.to_outbox(pending)  # its bytes would be lost with this process
                return
        if not fallback.make_room(pending):
            if pending.kind in DROPPABLE:
                fallback.dropped[pending.kind] += 1
                return
            try:
                fallback.to_outbox(pending)
                return
            except OutboxUnavailable as exc:
                log.warning("%s; the event stays queued past queue_bytes", exc)
        self._enqueue(pending)
        self._pump(deadline)

    def _crash_open(self, pending: Pending) -> str:
        """Fail-open crash: the daemon's durable ack within ``timeout``, else the outbox."""
        self._pump(time.monotonic() + self.budget)
        if self._sock is None or self._stalled or not self._fallback.make_room(pending):
            self._fallback.to_outbox(pending)
            return pending.id
        self._enqueue(pending)
        outcome = self._wait_until(lambda: pending.done, time.monotonic() + self.timeout)
        if outcome == "done" and pending.error is None:
            return pending.id
        if outcome == "done":
            assert pending.error is not None
            if pending.error.code not in RETRY_LATER:
                raise pending.error
        elif outcome == "timeout":
            self._stalled = True  # the next crashes do not wait for this daemon
            log.warning("the daemon at %s did not acknowledge a crash in %.1fs; crashes go to "
                        "the outbox until it answers", self.socket_path, self.timeout)  # fmt: skip
        self._session.discard(pending)
        self._fallback.to_outbox(pending)
        return pending.id

    def _has_room(self) -> bool:
        s = self._session
        return len(s.unacked) < self.max_unacked

    def _written(self) -> bool:
        return not self._out and not self._unsent and self._session.welcome is not None

    def _enqueue(self, pending: Pending) -> None:
        s = self._session
        s.queue(pending)
        self._unsent.append(pending)
        if len(self._unsent) > 2 * len(s.unacked) + 64:  # dropped ones linger: prune
            self._unsent = prune(self._unsent, s)
        self._fallback.queued(pending)

    def _after_fork(self) -> None:
        """In a forked child: the parent's connection and queue are the parent's."""
        self._lock = threading.RLock()
        self._poll = select.poll()
        if self._sock is not None:
            self._sock.close()  # only the child's copy of the descriptor; the parent's stays open
            self._sock = None
        self._out = bytearray()
        self._unsent.clear()
        self._fallback.clear()
        self._session.forget()


def _reset_after_fork() -> None:
    for client in list(_clients):
        client._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)
