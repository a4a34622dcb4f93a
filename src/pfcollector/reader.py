"""One connection's reader: socket bytes -> frames -> events, within the memory budget.

The reader reserves memory (:mod:`pfcollector.membudget`) before each read: the bytes it may
buffer, and once a frame's length prefix is known the whole frame, so ``max_connections x
max_frame`` cannot escape the budget. Every accepted event leaves with its share of that
reservation. When the budget is spent the reader waits before reading: the kernel's socket
buffer fills and the producer's writes wait (flow control, never a disconnect).

The slow-sender timer (:class:`FrameClock`) measures one frame's bytes arriving, from that
frame's own first byte, and counts only the time the reader spent waiting on the socket: time
the daemon itself was not reading (a full ingest channel, a spent budget, a control answer) is
never charged to the client.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from .acks import AckTracker
from .membudget import Reservation
from .policies import COALESCED_KINDS
from .protocol import (
    HEADER_SIZE,
    Control,
    ErrorMsg,
    EventMsg,
    Hello,
    MessageError,
    ProtocolError,
    ServerConnection,
    ServerMessage,
)
from .typed import RunDecoder

if TYPE_CHECKING:
    from .server import ConnectionInfo, Limits, Server

#: The non-fatal refusal of an event while the daemon drains (control requests still work).
DRAINING_MESSAGE = (
    "the daemon is shutting down and stores no more events: this one was not stored; "
    "send it again to the next daemon"
)

__all__ = [
    "DRAINING_MESSAGE",
    "EVENT_OVERHEAD",
    "READ_SIZE",
    "SMALL_READ",
    "FrameClock",
    "read_connection",
    "read_size",
]

#: Bytes asked of the socket per read while reads come back full (less when the budget is
#: small: :func:`read_size`). Its bytes object (the size and a header) is above the mmap
#: threshold (membudget.py), so a big read's memory goes back at once: fixed 64 KiB reads,
#: from the heap, kept 13 MiB more peak RSS in ``memory_pressure.py --quick``.
READ_SIZE = 256 * 1024
#: A connection's first read, and its reads while frames are small (a crash and its ack at a
#: time): from the heap, where freed reads are reused at once. A read allocates its size first,
#: and a 256 KiB one is an mmap and a munmap (a TLB shootdown with threads running): 16% of
#: the daemon's time in the end-to-end run (py-spy --gil). Reads grow to READ_SIZE while they
#: come back full (:func:`_next_read`), so big frames still come in big reads.
SMALL_READ = 16 * 1024
#: Bytes an accepted event costs beyond its frame (the Python objects that hold it).
EVENT_OVERHEAD = 512
#: Stats and coverage frames are taken a run at a time (:meth:`.ServerConnection.next_run`):
#: decoded and checked in C, merged by the coalescer, one ack for the run. One loop turn an
#: event where the message-at-a-time path cost five times the decode (docs/performance.md).
RUN_DECODER = RunDecoder(COALESCED_KINDS)
#: Events in one run at most, when no rate limit counts them (a read holds fewer).
RUN_MAX = 1 << 16

Send = Callable[[ServerMessage], Awaitable[None]]


class TokenBucket:
    """A connection's events/s limit: ``rate`` tokens a second, a second's worth at most.
    Pure logic: times are given. A rate of 0 is no limit."""

    __slots__ = ("rate", "refilled", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate, self.tokens, self.refilled = rate, rate, now

    def available(self, now: float) -> int:
        """Whole events the connection may send now (RUN_MAX without a limit)."""
        if not self.rate:
            return RUN_MAX
        self.tokens = min(self.rate, self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        return int(self.tokens)

    def spend(self, events: int) -> None:
        """``events`` were taken."""
        self.tokens -= events


class FrameClock:
    """The idle and slow-sender deadlines of one connection. Pure logic: times are given.

    ``waited`` is the time spent waiting on the socket since the current frame's first byte
    arrived; only that time counts toward ``slow_sender_timeout``.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.in_frame = False
        self.waited = 0.0

    def deadline(self, now: float) -> float:
        """When the next socket wait, starting ``now``, times out."""
        if self.in_frame:
            timeout = self.limits.slow_sender_timeout
            return now + max(timeout - self.waited, 0.0) if timeout > 0 else math.inf
        timeout = self.limits.idle_timeout
        return now + timeout if timeout > 0 else math.inf

    def received(self, waited: float, *, partial: bool, new_frame: bool) -> None:
        """A read returned after ``waited`` seconds on the socket.

        ``partial``: a frame is incomplete after handling what was read; ``new_frame``: that
        frame began in this read (an earlier frame ended in it, or none was pending).
        """
        if not partial:
            self.in_frame, self.waited = False, 0.0
        elif new_frame or not self.in_frame:
            self.in_frame, self.waited = True, 0.0  # its first byte came with this read
        else:
            self.waited += waited

    def error(self) -> tuple[str, str]:
        """The fatal error for a wait that timed out."""
        if not self.in_frame:
            return "idle_timeout", f"no frame for {self.limits.idle_timeout:g}s (idle_timeout)"
        return "slow_sender", (
            f"a frame was not complete {self.limits.slow_sender_timeout:g}s after its first "
            "byte, counting only time the daemon was reading (slow_sender_timeout)"
        )


class _Connection(ServerConnection):
    """The protocol's connection, telling the size of the frame it is receiving.

    Knowing the frame's size before its body arrives lets the reader reserve the whole frame
    at once: a connection either holds room for its frame or waits before buffering it.
    """

    @property
    def frame_total(self) -> int:
        """Bytes of the frame being received, prefix included (0 until the prefix is here)."""
        buf = self._buf
        return HEADER_SIZE + int.from_bytes(buf[:HEADER_SIZE], "big") if len(buf) >= 4 else 0


def _frame_room(conn: _Connection, capacity: int) -> int:
    """Budget for the frame being received and its decoded copy: a quarter at most."""
    return min(2 * (conn.frame_total or conn.pending_bytes), capacity // 4)


def _next_read(size: int, got: int, chunk: int) -> int:
    """The next read's size: four times bigger after a full read (up to ``chunk``), half
    after one that came back less than a quarter full (down to SMALL_READ)."""
    if got >= size:
        return min(chunk, size * 4)
    if got < size // 4:
        return max(min(SMALL_READ, chunk), size // 2)
    return size


def read_size(capacity: int, max_connections: int) -> int:
    """Bytes per read: every connection's read fits in a quarter of the budget."""
    return max(4096, min(READ_SIZE, capacity // (4 * max_connections)))


async def read_connection(
    server: Server,
    stream: trio.SocketStream,
    info: ConnectionInfo,
    tracker: AckTracker,
    send: Send,
) -> bool:
    """Read and dispatch until EOF (False) or a fatal error was sent (True)."""
    limits = server.limits
    conn = _Connection(max_frame=server.max_frame)
    budget = server.budget
    chunk = read_size(budget.capacity, limits.max_connections)
    # One read's worth is granted without waiting (all connections' together fit in a quarter
    # of the budget: read_size), so a control request or a small event is never queued behind
    # big frames waiting for room.
    reserved = Reservation(budget)
    reserved.grow(chunk)
    size = SMALL_READ  # what the next read asks for: up to chunk while reads come back full
    clock = FrameClock(limits)
    tokens = TokenBucket(limits.rate_limit, trio.current_time())
    # Whether to try a run before the next message: while coalescing, unless the connection's
    # last event was of another kind (a crash producer would decode each crash twice).
    runs = coalescing = server.coalescer is not None
    try:
        while True:
            # Room for the whole frame being received (what is buffered of it is less) and
            # its decoded copy (decoding copies the bytes out of the buffer before the buffer
            # lets go of them), and one more read, asked once per frame: a reader never holds
            # part of a frame while waiting for more, so readers cannot deadlock on each
            # other. Frame and copy together count a quarter of the budget at most (a bigger
            # frame still gets through).
            await reserved.ensure(_frame_room(conn, budget.capacity) + chunk)  # not charged
            started = trio.current_time()
            data = None
            with trio.move_on_at(clock.deadline(started)):
                data = await stream.receive_some(size)
            if data is None:
                code, message = clock.error()
                await server._violation(info, send, ErrorMsg(code, message, fatal=True))
                return True
            waited = trio.current_time() - started
            size = _next_read(size, len(data), chunk)
            conn.receive_data(data)
            eof, data = not data, b""  # buffered now: do not hold a second copy while waiting
            completed = False
            while True:
                before = conn.pending_bytes
                if runs and not server._stopping:  # stats and coverage, a read at a time
                    run = conn.next_run(RUN_DECODER, tokens.available(trio.current_time()))
                    if run:
                        completed = True
                        tokens.spend(len(run))
                        hello = conn.hello
                        assert hello is not None  # a run needs the hello
                        left = server._coalesce_run(run, hello, info, tracker)
                        frames = len(run)
                        del run  # not held while this reader waits
                        if left:  # the coalescer is full: the rest one at a time
                            cost = (before - conn.pending_bytes) // frames + EVENT_OVERHEAD
                            for one in left:
                                await _dispatch(server, one, conn, info, tracker, reserved, cost)
                        continue
                try:
                    msg = conn.next_message()
                except MessageError as exc:
                    completed = True
                    server.stats.errors[exc.code] += 1
                    kind = _kind_of(exc)
                    if kind != "unknown":  # an event whose kind cannot be read: errors only
                        server.stats.received[kind] += 1
                        server.stats.rejected[kind] += 1
                        server.stats.refuse(kind, exc.code)
                    await send(exc.to_message())
                    if exc.seq is not None:
                        tracker.handled(exc.seq)
                    continue
                except ProtocolError as exc:  # fatal: the framing is lost, close
                    await server._violation(info, send, exc.to_message())
                    return True
                if msg is None:
                    break
                completed = True
                if isinstance(msg, EventMsg):
                    runs = coalescing and msg.kind in COALESCED_KINDS
                    if not tokens.available(trio.current_time()):
                        server.stats.received[msg.kind] += 1
                        server.stats.refuse(msg.kind, "rate_limited")
                        await server._violation(info, send, ErrorMsg("rate_limited", (
                            f"more than {limits.rate_limit:g} events/s on one connection"
                        ), fatal=True))  # fmt: skip
                        return True
                    tokens.spend(1)
                    if server._stopping:  # draining: control only; the client keeps its event
                        server.stats.errors["draining"] += 1
                        server.stats.received[msg.kind] += 1
                        server.stats.refuse(msg.kind, "draining")
                        await send(ErrorMsg("draining", DRAINING_MESSAGE, seq=msg.seq))
                        tracker.handled(msg.seq)
                        continue
                    cost = before - conn.pending_bytes + EVENT_OVERHEAD
                    if msg.kind in COALESCED_KINDS and server.coalescer is not None:
                        # Stats and coverage: merged in memory and acked, no await per event.
                        event, _ = server._event(msg, conn, info)
                        if not server._coalesce(event, msg.seq, tracker):
                            await server._spool_event(event, None, msg.seq, tracker,
                                                      reserved.split(cost))  # fmt: skip
                        continue
                    await _dispatch(server, msg, conn, info, tracker, reserved, cost)
                elif isinstance(msg, Hello):
                    await server._welcome(msg, info, send)
                elif isinstance(msg, Control):
                    await send(await server._answer(msg, info))
            if eof:
                return False
            if completed:
                # The decoded events left with their bytes and the decode copy is gone: back
                # to one read's worth (what is buffered of the next frame came in this read),
                # so the next frame's room is asked for holding no more than that.
                reserved.shrink(chunk)
            clock.received(waited, partial=bool(conn.pending_bytes), new_frame=completed)
    finally:
        reserved.release()


async def _dispatch(
    server: Server,
    msg: EventMsg,
    conn: ServerConnection,
    info: ConnectionInfo,
    tracker: AckTracker,
    reserved: Reservation,
    cost: int,
) -> None:
    """Coalesce or spool one event. A function of its own so that the reader, waiting for
    its next read, keeps no reference to the event's bytes (they belong to the budget of the
    group commit, which frees them)."""
    event, kept = server._event(msg, conn, info)
    if not server._coalesce(event, msg.seq, tracker):  # no await per snapshot
        await server._spool_event(event, kept, msg.seq, tracker, reserved.split(cost))


def _kind_of(exc: MessageError) -> str:
    kind = getattr(exc, "kind", None)
    return str(kind) if kind else "unknown"
