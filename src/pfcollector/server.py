"""The Unix socket listener and one task per connection.

Each connection runs two tasks: a reader that feeds bytes to the sans-I/O
:class:`~pfcollector.protocol.ServerConnection` and hands accepted events to the ingest
channel, and an acker that sends cumulative acks (and late errors) as the spool settles them.
One client's garbage costs that client its connection, never the daemon.

Resource handling:
    The socket file is created with the configured mode (0660) before ``listen``
    (:func:`.sockdir.bind_unix`). A socket file left by a dead daemon is replaced; a live daemon
    on the same path is refused with :class:`AddressInUse`. Shutdown has two steps.
    :meth:`Server.stop_ingest` stops every reader that could store events and closes the ingest
    channel once they are gone; from then on the socket still answers control requests
    (``status`` during a drain), and events get the non-fatal ``draining`` refusal.
    :meth:`Server.stop` then closes the listener, removes the socket file, and lets each
    connection send its final ack before it is closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from . import __version__
from .acks import AckTracker, Outbound, run_acker
from .activation import listen_socket
from .events import Event, Kind
from .ingest import Pending
from .membudget import MemoryBudget, Reservation
from .policies import COALESCED_KINDS, Coalescer
from .protocol import (
    Control,
    ErrorMsg,
    EventMsg,
    Hello,
    Reply,
    ServerConnection,
    ServerMessage,
    Welcome,
)
from .reader import READ_SIZE, read_connection
from .sockdir import AddressInUse, bind_unix, peer_credentials
from .typed import event_parts

__all__ = [
    "READ_SIZE",
    "AddressInUse",
    "ConnectionInfo",
    "IngestStats",
    "Limits",
    "Server",
    "bind_unix",
]

log = logging.getLogger(__name__)

#: Bytes of memory budget one coalesced stats or coverage snapshot is counted for.
COALESCED_EVENT_COST = 4096
#: Seconds a stopping daemon gives each connection to send its final acks.
CLOSE_GRACE = 5.0
#: Seconds a connection closed for a fatal error keeps reading (and discarding) its input.
LINGER = 1.0

ControlHandler = Callable[[str, dict[str, Any], "ConnectionInfo"], Awaitable[Any]]


@dataclass(frozen=True)
class Limits:
    """What one connection may do (docs/security.md). ``0`` switches a timeout or the cap off.

    Every violation is answered with a fatal error naming the limit, counted in ``status``,
    and costs only that connection.
    """

    max_frame: int = 16 * 1024 * 1024
    max_connections: int = 256
    #: Seconds a connection may stay silent between frames.
    idle_timeout: float = 3600.0
    #: Seconds a frame may take from its first byte to its last.
    slow_sender_timeout: float = 30.0
    #: Events per second per connection (a token bucket holding one second's worth).
    rate_limit: float = 200_000.0
    allowed_uids: frozenset[int] | None = None
    allowed_gids: frozenset[int] | None = None

    def allows(self, uid: int, gid: int) -> bool:
        """May a peer with these credentials connect? (Either list admits it.)"""
        if self.allowed_uids is None and self.allowed_gids is None:
            return True
        return uid in (self.allowed_uids or ()) or gid in (self.allowed_gids or ())


@dataclass
class ConnectionInfo:
    """What the daemon knows of one live connection (shown by ``status``)."""

    id: int
    pid: int
    uid: int
    gid: int
    connected_at: float
    job_id: str | None = None
    fuzzer: str | None = None
    events: int = 0

    def public(self) -> dict[str, Any]:
        """For ``status``."""
        return {
            "id": self.id,
            "pid": self.pid,
            "uid": self.uid,
            "gid": self.gid,
            "job_id": self.job_id,
            "fuzzer": self.fuzzer,
            "events": self.events,
            "connected_s": round(time.time() - self.connected_at, 3),
        }


@dataclass
class IngestStats:
    """Counters since the daemon started.

    ``received`` counts every event that reached the daemon with a readable kind; each ends
    ``accepted`` (stored, or merged by coalescing) or refused. ``refused`` counts refusals by
    kind and code (validation codes, ``rate_limited``, and the spool's ``spool_full``,
    ``disk_full``, ``spool_write_failed``); ``rejected`` is the validation part of them.
    """

    received: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    refused: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    errors: Counter[str] = field(default_factory=Counter)
    connections_total: int = 0

    def refuse(self, kind: str, code: str, *, accepted: bool = False) -> None:
        """Count one event of ``kind`` refused with ``code`` (after it was counted accepted)."""
        self.refused[kind][code] += 1
        if accepted:
            self.accepted[kind] -= 1


class Server:
    """Accepts connections and runs one handler task per connection."""

    def __init__(
        self,
        socket_path: Path,
        ingest: trio.MemorySendChannel[Pending],
        control: ControlHandler,
        *,
        socket_mode: int = 0o660,
        socket_group: int | None = None,
        limits: Limits = Limits(),
        coalesce_interval: Callable[[], float] | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.limits = limits
        self.max_frame = limits.max_frame
        self.max_connections = limits.max_connections
        self.stats = IngestStats()
        #: Bounds every byte the readers buffer and every event on its way to the spool.
        self.budget = budget if budget is not None else MemoryBudget()
        self.connections: dict[int, ConnectionInfo] = {}
        self._ingest = ingest
        self._control = control
        self._next_id = 0
        self._accepting = trio.CancelScope()
        self._readers: set[trio.CancelScope] = set()
        self._stopping = False
        # Readers that may still put events on the ingest channel; it closes when none is left.
        self._ingest_users = 0
        self._ingest_quiet = trio.Event()
        self._inode: int | None = None
        # Stats and coverage are merged in memory and pushed to the spool once per interval
        # (None: every event goes to the spool as it comes).
        self.coalescer = Coalescer() if coalesce_interval is not None else None
        self._coalesce_interval = coalesce_interval
        self._coalescing = trio.CancelScope()
        self._coalescer_full = trio.Event()
        self._coalesced = Reservation(self.budget)  # what the coalescer holds
        self._taken: list[Pending] = []  # taken from the coalescer, not yet on the channel
        #: Listening on a socket systemd passed (socket activation), not one we bound.
        self.activated = False
        self._no_acks = AckTracker()
        #: Sent in every welcome: where clients write what the daemon cannot ack (outbox.py).
        self.outbox: str | None = None

    async def serve(
        self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until :meth:`stop`; return once every connection is closed.

        The ingest channel is closed on return, so the group commit knows nothing more comes.
        """
        inherited = listen_socket()  # systemd socket activation (LISTEN_FDS), else None
        if inherited is not None:
            # systemd made the socket file and owns it: never chmod, chown or unlink it
            # (_inode stays None, so _remove_socket_file leaves it).
            sock = trio.socket.from_stdlib_socket(inherited)
            self.socket_path = Path(inherited.getsockname())
            self.activated = True  # the daemon's start-up line names it
        else:
            sock = bind_unix(self.socket_path, self.socket_mode)
            if self.socket_group is not None:
                os.chown(self.socket_path, -1, self.socket_group)
            self._inode = os.stat(self.socket_path).st_ino
        listener = trio.SocketListener(sock)
        async with listener, trio.open_nursery() as handlers:
            handlers.start_soon(self._coalesce_loop)
            handlers.start_soon(self._close_ingest)
            task_status.started(self)
            with self._accepting:
                while True:
                    stream = await listener.accept()
                    handlers.start_soon(self._handle, stream)
            self._remove_socket_file()
        log.info("server stopped")

    def stop_ingest(self) -> None:
        """Take no more events: stop the readers that could store one, then close the ingest
        channel. The listener stays, for control requests; events are refused (``draining``).
        """
        if self._stopping:
            return
        self._stopping = True
        self._coalescing.cancel()
        for scope in self._readers:
            scope.cancel()
        if not self._ingest_users:
            self._ingest_quiet.set()

    def stop(self) -> None:
        """Stop accepting and reading; connections send their final acks and close."""
        self.stop_ingest()
        self._accepting.cancel()
        for scope in self._readers:
            scope.cancel()

    async def _close_ingest(self) -> None:
        async with self._ingest:  # closing it tells the group commit that nothing more comes
            await self._ingest_quiet.wait()
            await self._push_coalesced()  # what connections sent last goes to the spool too

    async def _coalesce_loop(self) -> None:
        if self._coalesce_interval is None:
            return
        with self._coalescing:
            while True:
                with trio.move_on_after(self._coalesce_interval()):
                    await self._coalescer_full.wait()  # or flush early rather than grow
                self._coalescer_full = trio.Event()
                await self._push_coalesced()

    async def _push_coalesced(self) -> None:
        """Move what the coalescer holds onto the ingest channel.

        Cancellation (``stop``): what was taken and not yet sent stays in ``_taken``, and the
        last push after the listener closes sends it first: nothing acknowledged is lost.
        """
        if self.coalescer is None:
            return
        taken = self.coalescer.take()
        self._taken.extend(
            Pending(event, None, self._no_acks, 0, self._coalesced.split(COALESCED_EVENT_COST))
            for event in taken
        )
        self._coalesced.release()
        while self._taken:
            await self._ingest.send(self._taken[0])
            self._taken.pop(0)

    def _remove_socket_file(self) -> None:
        with contextlib.suppress(OSError):
            if os.stat(self.socket_path).st_ino == self._inode:
                self.socket_path.unlink()

    async def _handle(self, stream: trio.SocketStream) -> None:
        self._next_id += 1
        pid, uid, gid = peer_credentials(stream.socket)
        info = ConnectionInfo(self._next_id, pid, uid, gid, time.time())
        self.stats.connections_total += 1
        out = Outbound(stream)
        send = out.send

        async with stream:
            refusal = None
            if not self.limits.allows(uid, gid):
                refusal = ErrorMsg(
                    "peer_not_allowed",
                    f"uid {uid} gid {gid} is not in the daemon's allow_uids/allow_gids",
                    fatal=True,
                )
                log.warning("refused pid %d uid %d gid %d: not allowed", pid, uid, gid)
            elif len(self.connections) >= self.max_connections:
                refusal = ErrorMsg(
                    "too_many_connections",
                    f"the daemon has {self.max_connections} connections, its limit",
                    fatal=True,
                )
            if refusal is not None:
                self.stats.errors[refusal.code] += 1
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await send(refusal)
                return
            self.connections[info.id] = info
            tracker = out.tracker
            fatal = False
            try:
                with trio.CancelScope() as closing:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(run_acker, tracker, send, self.stats)
                        with trio.CancelScope() as reading:
                            self._readers.add(reading)
                            ingest_user = not self._stopping
                            self._ingest_users += ingest_user
                            if self._accepting.cancel_called:
                                reading.cancel()
                            try:
                                fatal = await read_connection(self, stream, info, tracker, send)
                            finally:
                                self._readers.discard(reading)
                                self._ingest_users -= ingest_user
                                if self._stopping and not self._ingest_users:
                                    self._ingest_quiet.set()
                        # Let the acker send the final acks, but never wait forever for a
                        # client that does not read them.
                        closing.deadline = trio.current_time() + CLOSE_GRACE
                        tracker.close()
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away; what it sent before is settled all the same
            except* Exception as group:  # a bug must cost one connection, never the daemon
                self.stats.errors["internal_error"] += 1
                log.error("connection %d (pid %d) failed", info.id, info.pid, exc_info=group)
            finally:
                del self.connections[info.id]
            if fatal:
                await self._linger(stream)

    async def _violation(
        self,
        info: ConnectionInfo,
        send: Callable[[ServerMessage], Awaitable[None]],
        error: ErrorMsg,
    ) -> None:
        """Count a fatal error and tell the client; the caller closes the connection."""
        self.stats.errors[error.code] += 1
        log.info("closing connection %d (pid %d): %s", info.id, info.pid, error.message)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await send(error)

    @staticmethod
    async def _linger(stream: trio.SocketStream) -> None:
        """Half-close, then discard what the client still sends for a moment, then close.

        Closing a Unix socket with unread input resets the peer, which may then never read the
        error that says why it was dropped; a client mid-write needs this to see it.
        """
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_eof()
            with trio.move_on_after(LINGER):
                while await stream.receive_some(READ_SIZE):
                    pass

    def _event(
        self, msg: EventMsg, conn: ServerConnection, info: ConnectionInfo
    ) -> tuple[Event, bytes | list[bytes] | None]:
        """The stored form of an accepted event, and the bytes kept beside it (if any)."""
        hello = conn.hello
        assert hello is not None  # the protocol refuses events before hello
        kind, fields = msg.kind, msg.fields  # the decoder's own dict: no copy needed
        data: bytes | list[bytes] | None = None
        if kind is Kind.CRASH:
            data = fields.pop("input")
        elif kind is Kind.CORPUS:
            data = fields.pop("contents")
        info.events += 1
        self.stats.received[kind] += 1
        self.stats.accepted[kind] += 1
        event = Event(
            msg.id or str(uuid.uuid4()),
            kind,
            msg.job_id or hello.job_id,
            hello.fuzzer,
            msg.ts_ns if msg.ts_ns is not None else time.time_ns(),
            fields,
            info.pid,
            info.uid,
        )
        return event, data

    def _coalesce(self, event: Event, seq: int, tracker: AckTracker) -> bool:
        """Merge a stats/coverage event in memory (acked at once); False if it must be spooled."""
        coalescer = self.coalescer
        if coalescer is None or event.kind not in COALESCED_KINDS:
            return False
        keys = len(coalescer)
        taken = coalescer.add(event)
        if len(coalescer) != keys:
            self._coalescer_grew(coalescer)
        if taken:
            tracker.handled(seq)
        # Not taken: full of other keys, so this one goes to the spool (flow control).
        return taken

    def _coalesce_run(self, run: list[Any], hello: Hello, info: ConnectionInfo,
                      tracker: AckTracker) -> list[EventMsg]:  # fmt: skip
        """Merge a run of stats and coverage (:meth:`.ServerConnection.next_run`), acked at
        once; what the coalescer did not take (it is full of other keys) is returned, for the
        reader to take one at a time."""
        coalescer = self.coalescer
        assert coalescer is not None
        keys = len(coalescer)
        taken, kinds = coalescer.add_run(run, hello.job_id, hello.fuzzer, info.pid, info.uid,
                                         time.time_ns())  # fmt: skip
        if len(coalescer) != keys:
            self._coalescer_grew(coalescer)
        for kind, count in kinds.items():
            self.stats.received[kind] += count
            self.stats.accepted[kind] += count
        info.events += taken
        if taken:
            tracker.handled(run[taken - 1].seq)
        return [EventMsg(*event_parts(event)) for event in run[taken:]]

    def _coalescer_grew(self, coalescer: Coalescer) -> None:
        """The coalescer holds a new key: counted per key held, a fixed cost each."""
        self._coalesced.grow(len(coalescer) * COALESCED_EVENT_COST - self._coalesced.held)
        if coalescer.full:
            self._coalescer_full.set()  # push early rather than grow

    async def _spool_event(
        self,
        event: Event,
        data: bytes | list[bytes] | None,
        seq: int,
        tracker: AckTracker,
        hold: Reservation | None = None,
    ) -> None:
        """Hand an event (and the memory it holds) to the group commit; its ack follows."""
        tracker.submitted(seq)
        pending = Pending(event, data, tracker, seq, hold)
        try:
            self._ingest.send_nowait(pending)  # the common case: room, no scheduling round
        except trio.WouldBlock:
            try:
                await self._ingest.send(pending)  # full: this producer waits (flow control)
            except BaseException:
                tracker.withdraw(seq)  # never stored, so never acknowledged
                if hold is not None:
                    hold.release()
                raise

    async def _welcome(
        self, msg: Hello, info: ConnectionInfo, send: Callable[[ServerMessage], Awaitable[None]]
    ) -> None:
        info.job_id, info.fuzzer = msg.job_id, msg.fuzzer
        await send(Welcome(1, f"pfcollector {__version__}", self.max_frame, self.outbox))

    async def _answer(self, msg: Control, info: ConnectionInfo) -> Reply:
        try:
            result = await self._control(msg.op, msg.args, info)
        except (LookupError, ValueError, TypeError) as exc:
            return Reply(msg.req, False, error=str(exc))
        return Reply(msg.req, True, result=result)
