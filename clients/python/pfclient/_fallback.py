"""What a fail-open client does with events no daemon holds: a queue bounded in bytes, and the
outbox. Shared by :class:`pfclient.Client` and the async clients; no I/O but the outbox file.

The queue is the :class:`~pfclient._session.Session`'s ``unacked``. :meth:`Fallback.make_room`
drops the oldest stats and coverage until a new event fits in ``queue_bytes`` (and
``max_unacked``), counting them in :attr:`Fallback.dropped`; what still does not fit, and
every crash the daemon could not acknowledge, goes to the outbox (:mod:`pfclient._outbox`).

Error handling:
    :meth:`Fallback.to_outbox` raises :class:`OutboxUnavailable` naming the socket, the outbox
    and the OS error.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from ._errors import OutboxUnavailable
from ._outbox import default_outbox_dir, write_event
from ._session import Pending, Session

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_QUEUE_BYTES",
    "DROPPABLE",
    "RETRY_LATER",
    "Fallback",
    "FallbackCounters",
    "durable",
    "holds_bytes",
    "prune",
]

log = logging.getLogger("pfclient")

#: Seconds a non-waiting call may spend on I/O with the daemon (fail-open).
DEFAULT_BUDGET = 0.005
#: Bytes of events a client keeps for a daemon that has not acknowledged them.
DEFAULT_QUEUE_BYTES = 32 * 1024 * 1024
#: The kinds dropped (oldest first) from a full queue.
DROPPABLE = ("stats", "coverage")
#: Refusals that mean "not now" (the daemon's disk or spool): a crash goes to the outbox.
RETRY_LATER = frozenset({"spool_full", "disk_full", "spool_write_failed", "draining"})
#: The outbox each daemon (by socket path) named in its last welcome to this process, so a
#: client made while that daemon is away still writes where it imports.
_known_outboxes: dict[str, str] = {}


class Fallback:
    """The bounded queue's policy and the outbox, for one client.

    Attributes:
        dropped: Stats and coverage events dropped from a full queue, by kind.
        outboxed: Events written to the outbox.
    """

    def __init__(self, session: Session, socket_path: str, *, queue_bytes: int,
                 max_unacked: int, outbox: str | None) -> None:  # fmt: skip
        if queue_bytes < 1:
            raise ValueError(f"queue_bytes must be at least 1, got {queue_bytes}")
        self.session = session
        self.socket_path = socket_path
        self.queue_bytes = queue_bytes
        self.max_unacked = max_unacked
        self.outbox = outbox
        self.dropped: Counter[str] = Counter()
        self.outboxed = 0
        self._droppable: deque[Pending] = deque()  # stats and coverage, oldest first
        self._daemon_outbox: str | None = None

    def welcome(self, msg: dict[str, Any]) -> None:
        """Remember the outbox the daemon named in its welcome."""
        outbox = msg.get("outbox")
        if isinstance(outbox, str) and outbox:
            self._daemon_outbox = _known_outboxes[self.socket_path] = outbox

    def outbox_dir(self) -> str:
        """The daemon's outbox if one ever said, else the client's argument, else the default."""
        known = self._daemon_outbox or _known_outboxes.get(self.socket_path)
        return known or self.outbox or default_outbox_dir()

    def make_room(self, pending: Pending) -> bool:
        """Drop the oldest stats and coverage until ``pending`` fits; False if it cannot."""
        s = self.session

        def fits() -> bool:
            return (s.queued_bytes + pending.size <= self.queue_bytes
                    and len(s.unacked) < self.max_unacked)  # fmt: skip

        while not fits() and self._droppable:
            victim = self._droppable.popleft()
            if s.discard(victim):
                self.dropped[victim.kind] += 1
        return fits()

    def queued(self, pending: Pending) -> None:
        """``pending`` joined the session's queue."""
        if pending.kind in DROPPABLE:
            droppable = self._droppable
            droppable.append(pending)
            if len(droppable) > 2 * len(self.session.unacked) + 64:  # acked ones linger: prune
                self._droppable = prune(droppable, self.session)

    def to_outbox(self, pending: Pending) -> None:
        """Write ``pending`` to the outbox (durable on return). Raises OutboxUnavailable."""
        s = self.session
        hello = {"job_id": s.job_id, "fuzzer": s.fuzzer, "pid": os.getpid()}
        directory = self.outbox_dir()
        try:
            write_event(directory, hello, pending.body)
        except (OSError, ValueError) as exc:
            raise OutboxUnavailable(f"{pending.kind} event {pending.id}: no daemon took it at "
                                    f"{self.socket_path} and the outbox {directory} cannot be "
                                    f"written: {exc}") from exc  # fmt: skip
        self.outboxed += 1

    def spill(self, which: Callable[[Pending], bool]) -> None:
        """Move queued events matching ``which`` to the outbox (best effort, logged)."""
        s = self.session
        for pending in [p for p in s.unacked.values() if which(p)]:
            try:
                self.to_outbox(pending)
            except OutboxUnavailable as exc:
                log.warning("%s", exc)
                return
            s.discard(pending)

    def clear(self) -> None:
        """Forget the queue's order (a forked child)."""
        self._droppable.clear()


def prune(queue: deque[Pending], session: Session) -> deque[Pending]:
    """``queue`` without the events the session no longer keeps (amortised O(1) per event)."""
    unacked = session.unacked
    return deque(p for p in queue if unacked.get(p.id) is p)


def durable(pending: Pending) -> bool:
    """Events worth the outbox at close: everything but stats and coverage."""
    return pending.kind not in DROPPABLE


def holds_bytes(pending: Pending) -> bool:
    """A corpus event carrying its files' bytes, which only this process holds."""
    return pending.kind == "corpus" and "contents" in pending.body


class FallbackCounters:
    """What a fail-open client's :class:`Fallback` counted, as the client's own properties."""

    _fallback: Fallback

    @property
    def dropped(self) -> Counter[str]:
        """Stats and coverage events dropped from a full queue, by kind (fail-open)."""
        return self._fallback.dropped

    @property
    def outboxed(self) -> int:
        """Events this client wrote to the outbox."""
        return self._fallback.outboxed
