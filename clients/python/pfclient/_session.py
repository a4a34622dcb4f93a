"""The client side of the pfcollector protocol without I/O, shared by every pfclient client.

:class:`Session` does the bookkeeping of ``docs/protocol.md``: it makes the hello, event and
control frames, numbers events per connection, keeps every event until an ack covers it (or
an error names its seq), resends the queue with the same ids after a reconnect, and turns the
daemon's messages (bytes in, through :meth:`Session.feed`) into state: acknowledged events,
rejections, control replies, the welcome and its ``max_frame``.

The blocking :class:`pfclient.Client`, :class:`pfclient.aio.AsyncClient` and
:class:`pfclient.trio_client.TrioClient` add only the I/O, the waiting and the reconnect policy.

Resource handling:
    Nothing but memory: at most the caller's ``max_unacked`` events, the replies not yet
    collected and :data:`REJECTED_KEEP` rejections.

Error handling:
    :meth:`Session.feed` raises :class:`~pfclient._wire.WireError` on garbage (the caller
    drops the connection); :meth:`Session.event` raises :class:`EventRejected` for an event
    larger than the daemon's ``max_frame``. Everything else is state for the caller to read.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from ._errors import EventRejected
from ._wire import HEADER_SIZE, PROTOCOL_VERSION, FrameBuffer, encode_frame

__all__ = [
    "DEFAULT_MAX_FRAME",
    "LIFECYCLE",
    "REJECTED_KEEP",
    "Pending",
    "Session",
    "check_lifecycle",
    "rejection",
]

#: Most rejections :attr:`Session.rejected` keeps (the oldest are dropped first).
REJECTED_KEEP = 1024
#: The daemon's ``max_frame`` until a welcome says otherwise.
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
#: The lifecycle event kinds.
LIFECYCLE = ("started", "stopped", "error", "timeout")
_SEQ_PLACEHOLDER = 2**63 - 1  # widest seq encoding, to size a frame before it has its seq


class Pending:
    """One event from its creation until an ack covers it or an error names its seq."""

    __slots__ = ("body", "done", "error", "id", "kind", "seq", "size", "waited")

    def __init__(self, event_id: str, body: dict[str, Any], waited: bool, size: int = 0) -> None:
        self.id = event_id
        self.body = body
        self.kind: str = body.get("kind", "")
        self.size = size  # bytes of its frame, for the queue's bound
        self.seq = 0  # on the current connection; 0 while not sent on it
        self.done = False
        self.error: EventRejected | None = None
        self.waited = waited  # a caller raises the rejection itself: flush need not


def rejection(msg: dict[str, Any], event_id: str | None = None) -> EventRejected:
    """The :class:`EventRejected` for the daemon's ``error`` message ``msg``."""
    seq, fld = msg.get("seq"), msg.get("field")
    return EventRejected(
        str(msg.get("code", "error")),
        str(msg.get("message", "")),
        seq if isinstance(seq, int) else None,
        fld if isinstance(fld, str) else None,
        event_id=event_id,
        fatal=msg.get("fatal") is True,
    )


def check_lifecycle(kind: str) -> None:
    """Raise ValueError unless ``kind`` is a lifecycle kind."""
    if kind not in LIFECYCLE:
        raise ValueError(f"lifecycle kind must be one of {', '.join(LIFECYCLE)}, got {kind!r}")


class Session:
    """The client side of one daemon conversation, without I/O: frames out, bytes in.

    Attributes:
        unacked: The events not yet acknowledged, by id, in send order (add with
            :meth:`queue`, remove with :meth:`discard`, so :attr:`queued_bytes` stays true).
        queued_bytes: The frame bytes of :attr:`unacked`.
        replies: Control replies not yet collected, by request number.
        rejected: Every rejection seen (newest last, at most :data:`REJECTED_KEEP`).
        unreported: Rejections no caller has raised yet (see :meth:`take_unreported`).
        welcome: This connection's welcome, ``None`` until it arrives.
        hello_error: The daemon's refusal of this connection's hello, if any.
        max_frame: The largest frame body the daemon takes.
    """

    def __init__(self, job_id: str, fuzzer: str) -> None:
        self.job_id = job_id
        self.fuzzer = fuzzer
        self.unacked: OrderedDict[str, Pending] = OrderedDict()  # by event id, in send order
        self.queued_bytes = 0
        self.replies: dict[int, dict[str, Any]] = {}
        self.rejected: list[EventRejected] = []
        self.unreported: list[EventRejected] = []
        self.welcome: dict[str, Any] | None = None
        self.hello_error: EventRejected | None = None
        self.max_frame = DEFAULT_MAX_FRAME
        self._frames = FrameBuffer()
        self._seq = 0
        self._req = 0

    # -- frames out -----------------------------------------------------------------------------

    def hello(self, pid: int) -> bytes:
        """Start a new connection: forget the old one's seqs and buffer; the hello frame."""
        self._frames, self._seq = FrameBuffer(), 0
        self.welcome = self.hello_error = None
        self.replies.clear()
        for pending in self.unacked.values():
            pending.seq = 0
        return encode_frame({"t": "hello", "v": PROTOCOL_VERSION, "job_id": self.job_id,
                             "fuzzer": self.fuzzer, "pid": pid})  # fmt: skip

    def handshake_over(self) -> bool:
        """Whether the daemon answered this connection's hello (welcome or refusal)."""
        return self.welcome is not None or self.hello_error is not None

    def resend(self) -> Iterator[bytes]:
        """After the welcome: every unacknowledged event again, same id, fresh seq.

        Encoded one at a time as the caller iterates (a long queue is never encoded whole).
        """
        for pending in list(self.unacked.values()):
            yield self.frame(pending)

    def event(self, kind: str, fields: dict[str, Any], job_id: str | None, ts: float | None,
              event_id: str | None, waited: bool) -> Pending:  # fmt: skip
        """A new event (not yet queued). Raises EventRejected if it exceeds ``max_frame``."""
        event_id = event_id or str(uuid.uuid4())
        body: dict[str, Any] = {
            "t": "event", "seq": _SEQ_PLACEHOLDER, "kind": kind, "id": event_id,
            "ts": time.time() if ts is None else ts,
        }  # fmt: skip
        if job_id is not None:
            body["job_id"] = job_id
        body.update(fields)
        size = len(encode_frame(body)) - HEADER_SIZE
        if size > self.max_frame:
            raise EventRejected("frame_too_large", f"{kind} event is {size} bytes, the "
                                f"daemon's max_frame is {self.max_frame}")  # fmt: skip
        return Pending(event_id, body, waited, size + HEADER_SIZE)

    def queue(self, pending: Pending) -> None:
        """Keep ``pending`` until an ack covers it."""
        self.unacked[pending.id] = pending
        self.queued_bytes += pending.size

    def discard(self, pending: Pending) -> bool:
        """Stop keeping ``pending`` (dropped, or written to the outbox); False if not kept."""
        if self.unacked.get(pending.id) is not pending:
            return False
        del self.unacked[pending.id]
        self.queued_bytes -= pending.size
        return True

    def frame(self, pending: Pending) -> bytes:
        """``pending`` with the next seq of this connection."""
        self._seq += 1
        pending.seq = pending.body["seq"] = self._seq
        return encode_frame(pending.body)

    def control(self, op: str, args: dict[str, Any] | None) -> tuple[int, bytes]:
        """A new control request: its number and frame."""
        self._req += 1
        frame = encode_frame({"t": "control", "req": self._req, "op": op, "args": args or {}})
        return self._req, frame

    # -- bytes in -------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Handle bytes from the daemon. Raises WireError on garbage."""
        for msg in self._frames.feed(data):
            self._handle(msg)

    def _handle(self, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "ack" and isinstance(msg.get("seq"), int):
            acked: int = msg["seq"]
            unacked = self.unacked
            while unacked:
                pending = unacked[next(iter(unacked))]  # O(1): an OrderedDict
                if not 0 < pending.seq <= acked:
                    break
                del unacked[pending.id]
                self.queued_bytes -= pending.size
                pending.done = True
        elif t == "error":
            if self.welcome is None:
                self.hello_error = rejection(msg)
                return
            found = next((p for p in self.unacked.values() if p.seq == msg.get("seq")), None)
            error = rejection(msg, found.id if found is not None else None)
            if found is not None:
                self.discard(found)
                found.done, found.error = True, error
            self.rejected.append(error)
            del self.rejected[:-REJECTED_KEEP]
            if found is None or not found.waited:
                self.unreported.append(error)
        elif t == "reply" and isinstance(msg.get("req"), int):
            self.replies[msg["req"]] = msg
        elif t == "welcome":
            self.welcome = msg
            max_frame = msg.get("max_frame")
            self.max_frame = max_frame if isinstance(max_frame, int) else DEFAULT_MAX_FRAME

    # -- state ----------------------------------------------------------------------------------

    def take_unreported(self) -> EventRejected | None:
        """The first rejection no caller has raised yet (``None`` if none); forgets them all."""
        if not self.unreported:
            return None
        first = self.unreported[0]
        self.unreported.clear()
        return first

    def forget(self) -> None:
        """Drop the queue and the replies (a forked child: they are the parent's)."""
        self.unacked.clear()
        self.queued_bytes = 0
        self.replies.clear()
