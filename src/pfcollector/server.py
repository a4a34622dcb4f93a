"""The Unix socket listener and one task per connection.

Each connection runs two tasks: a reader that feeds bytes to the sans-I/O
:class:`~pfcollector.protocol.ServerConnection` and hands accepted events to the ingest
channel, and an acker that sends cumulative acks (and late errors) as the spool settles them.
One client's garbage costs that client its connection, never the daemon.

Resource handling:
    The socket file is created with the configured mode (0660) before ``listen``. A socket file
    left by a dead daemon is replaced; a live daemon on the same path is refused with
    :class:`AddressInUse`. :meth:`Server.stop` closes the listener, removes the socket file,
    stops every reader, and lets each connection send its final ack before it is closed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket as stdlib_socket
import stat
import struct
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from . import __version__
from .events import Event, Kind
from .ingest import AckTracker, Pending
from .policies import COALESCED_KINDS, Coalescer
from .protocol import (
    Ack,
    Control,
    ErrorMsg,
    EventMsg,
    Hello,
    MessageError,
    ProtocolError,
    Reply,
    ServerConnection,
    ServerMessage,
    Welcome,
    encode,
)

__all__ = ["READ_SIZE", "AddressInUse", "ConnectionInfo", "IngestStats", "Server", "bind_unix"]

log = logging.getLogger(__name__)

#: Bytes asked of the socket per read.
READ_SIZE = 256 * 1024
#: Seconds a stopping daemon gives each connection to send its final acks.
CLOSE_GRACE = 5.0
_LISTEN_BACKLOG = 512
_PEERCRED = struct.Struct("3i")

ControlHandler = Callable[[str, dict[str, Any], "ConnectionInfo"], Awaitable[Any]]


class AddressInUse(OSError):
    """Another daemon is listening on the socket path, or the path is not a socket."""


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
    """Counters since the daemon started."""

    received: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    connections_total: int = 0


def bind_unix(path: Path, mode: int) -> trio.socket.SocketType:
    """A listening Unix socket at ``path``, its file given ``mode`` before ``listen``.

    Error handling:
        :class:`AddressInUse` when a daemon answers on ``path`` or ``path`` is not a socket;
        other ``OSError`` (permissions, a missing directory we cannot create) propagate.
    """
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise AddressInUse(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
        probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale socket file %s", path)
            path.unlink(missing_ok=True)
        else:
            raise AddressInUse(
                errno.EADDRINUSE, f"another pfcollector daemon is already listening on {path}"
            )
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)  # the file is born with `mode`, never wider
    try:
        sock._sock.bind(str(path))  # type: ignore[attr-defined]  # a path bind never blocks
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(_LISTEN_BACKLOG)
    return sock


class Server:
    """Accepts connections and runs one handler task per connection."""

    def __init__(
        self,
        socket_path: Path,
        ingest: trio.MemorySendChannel[Pending],
        control: ControlHandler,
        *,
        socket_mode: int = 0o660,
        max_frame: int = 16 * 1024 * 1024,
        max_connections: int = 256,
        coalesce_interval: Callable[[], float] | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.socket_mode = socket_mode
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.stats = IngestStats()
        self.connections: dict[int, ConnectionInfo] = {}
        self._ingest = ingest
        self._control = control
        self._next_id = 0
        self._accepting = trio.CancelScope()
        self._readers: set[trio.CancelScope] = set()
        self._stopping = False
        self._inode: int | None = None
        # Stats and coverage are merged in memory and pushed to the spool once per interval
        # (None: every event goes to the spool as it comes).
        self.coalescer = Coalescer() if coalesce_interval is not None else None
        self._coalesce_interval = coalesce_interval
        self._coalescing = trio.CancelScope()
        self._coalescer_full = trio.Event()
        self._no_acks = AckTracker()

    async def serve(
        self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen until :meth:`stop`; return once every connection is closed.

        The ingest channel is closed on return, so the group commit knows nothing more comes.
        """
        sock = bind_unix(self.socket_path, self.socket_mode)
        self._inode = os.stat(self.socket_path).st_ino
        listener = trio.SocketListener(sock)
        async with self._ingest, listener:
            async with trio.open_nursery() as handlers:
                handlers.start_soon(self._coalesce_loop)
                task_status.started(self)
                with self._accepting:
                    while True:
                        stream = await listener.accept()
                        handlers.start_soon(self._handle, stream)
                self._remove_socket_file()
            await self._push_coalesced()  # what connections sent last goes to the spool too
        log.info("server stopped")

    def stop(self) -> None:
        """Stop accepting and reading; connections send their final acks and close."""
        self._stopping = True
        self._accepting.cancel()
        self._coalescing.cancel()
        for scope in self._readers:
            scope.cancel()

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
        if self.coalescer is None:
            return
        for event in self.coalescer.take():
            await self._ingest.send(Pending(event, None, self._no_acks, 0))

    def _remove_socket_file(self) -> None:
        with contextlib.suppress(OSError):
            if os.stat(self.socket_path).st_ino == self._inode:
                self.socket_path.unlink()

    async def _handle(self, stream: trio.SocketStream) -> None:
        self._next_id += 1
        pid, uid, gid = _peer_credentials(stream.socket)
        info = ConnectionInfo(self._next_id, pid, uid, gid, time.time())
        self.stats.connections_total += 1
        send_lock = trio.StrictFIFOLock()

        async def send(msg: ServerMessage) -> None:
            async with send_lock:
                await stream.send_all(encode(msg))

        async with stream:
            if len(self.connections) >= self.max_connections:
                self.stats.errors["too_many_connections"] += 1
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await send(
                        ErrorMsg(
                            "too_many_connections",
                            f"the daemon has {self.max_connections} connections, its limit",
                            fatal=True,
                        )
                    )
                return
            self.connections[info.id] = info
            tracker = AckTracker()
            try:
                with trio.CancelScope() as closing:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._acker, tracker, send)
                        with trio.CancelScope() as reading:
                            self._readers.add(reading)
                            if self._stopping:
                                reading.cancel()
                            try:
                                await self._read(stream, info, tracker, send)
                            finally:
                                self._readers.discard(reading)
                        # Let the acker send the final acks, but never wait forever for a
                        # client that does not read them.
                        closing.deadline = trio.current_time() + CLOSE_GRACE
                        tracker.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away; what it sent before is settled all the same
            finally:
                del self.connections[info.id]

    async def _acker(
        self, tracker: AckTracker, send: Callable[[ServerMessage], Awaitable[None]]
    ) -> None:
        while True:
            await tracker.wait_changed()
            errors, tracker.errors = tracker.errors, []
            for seq, code, message in errors:
                await send(ErrorMsg(code, message, seq=seq))
            if tracker.ack_ready > tracker.acked:
                tracker.acked = tracker.ack_ready
                await send(Ack(tracker.acked))
            if tracker.closing and not tracker.unsettled and not tracker.errors:
                return

    async def _read(
        self,
        stream: trio.SocketStream,
        info: ConnectionInfo,
        tracker: AckTracker,
        send: Callable[[ServerMessage], Awaitable[None]],
    ) -> None:
        conn = ServerConnection(max_frame=self.max_frame)
        while True:
            data = await stream.receive_some(READ_SIZE)
            conn.receive_data(data)
            while True:
                try:
                    msg = conn.next_message()
                except MessageError as exc:
                    self.stats.errors[exc.code] += 1
                    self.stats.rejected[_kind_of(exc)] += 1
                    await send(exc.to_message())
                    if exc.seq is not None:
                        tracker.handled(exc.seq)
                    continue
                except ProtocolError as exc:  # fatal: the framing is lost, close
                    self.stats.errors[exc.code] += 1
                    log.info("closing connection %d (pid %d): %s", info.id, info.pid, exc.message)
                    await send(exc.to_message())
                    return
                if msg is None:
                    break
                if isinstance(msg, EventMsg):
                    await self._accept_event(msg, conn, info, tracker)
                elif isinstance(msg, Hello):
                    info.job_id, info.fuzzer = msg.job_id, msg.fuzzer
                    await send(Welcome(1, f"pfcollector {__version__}", self.max_frame))
                elif isinstance(msg, Control):
                    await send(await self._answer(msg, info))
            if not data:
                return

    async def _accept_event(
        self, msg: EventMsg, conn: ServerConnection, info: ConnectionInfo, tracker: AckTracker
    ) -> None:
        hello = conn.hello
        assert hello is not None  # the protocol refuses events before hello
        fields = dict(msg.fields)
        data: bytes | list[bytes] | None = None
        if msg.kind is Kind.CRASH:
            data = fields.pop("input")
        elif msg.kind is Kind.CORPUS:
            data = fields.pop("contents")
        event = Event(
            id=msg.id or str(uuid.uuid4()),
            kind=msg.kind,
            job_id=msg.job_id or hello.job_id,
            fuzzer=hello.fuzzer,
            timestamp_ns=msg.ts_ns if msg.ts_ns is not None else time.time_ns(),
            fields=fields,
            peer_pid=info.pid,
            peer_uid=info.uid,
        )
        info.events += 1
        self.stats.received[msg.kind] += 1
        self.stats.accepted[msg.kind] += 1
        if self.coalescer is not None and msg.kind in COALESCED_KINDS:
            self.coalescer.add(event)  # accepted now; the spool gets the merge per interval
            if self.coalescer.full:
                self._coalescer_full.set()
            tracker.handled(msg.seq)
            return
        tracker.submitted(msg.seq)
        try:
            await self._ingest.send(Pending(event, data, tracker, msg.seq))
        except BaseException:
            tracker.withdraw(msg.seq)  # never stored, so never acknowledged
            raise

    async def _answer(self, msg: Control, info: ConnectionInfo) -> Reply:
        try:
            result = await self._control(msg.op, msg.args, info)
        except (LookupError, ValueError, TypeError) as exc:
            return Reply(msg.req, False, error=str(exc))
        return Reply(msg.req, True, result=result)


def _kind_of(exc: MessageError) -> str:
    kind = getattr(exc, "kind", None)
    return str(kind) if kind else "unknown"


def _peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    try:
        raw = sock.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return 0, -1, -1
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid
