"""Fault injection for the reference master: what goes wrong, and for how many requests.

Faults apply to result requests (``/api/v1/results/...``) only, never to ``/health`` or the
``/_dev/`` admin endpoints, so a test can always steer the master. Every method is thread-safe;
the handler threads consume the counted faults under the same lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Faults", "ListenerControl", "Plan"]


class ListenerControl(Protocol):
    """What :class:`Faults` needs from the server to take its listener down and up."""

    def down(self) -> None:
        """Close the listener and every open connection."""

    def up(self) -> None:
        """Reopen the listener on the same port (and cancel a pending timed ``up``)."""

    def down_for(self, seconds: float) -> None:
        """Close as :meth:`down`, and reopen after ``seconds``."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do to one result request, taken from the faults when it arrives.

    Attributes:
        reset: Close the connection with a TCP RST after reading part of the body.
        fail_status: Answer this status instead of handling the request.
        retry_after: With ``fail_status``, the ``Retry-After`` header value in seconds.
        delay: Seconds to wait before answering.
    """

    reset: bool = False
    fail_status: int | None = None
    retry_after: float | None = None
    delay: float = 0.0


_NO_PLAN = Plan()


def _check_status(status: int, low: int, high: int) -> int:
    if not low <= status <= high:
        raise ValueError(f"status must be in {low}..{high}, got {status}")
    return status


class Faults:
    """The faults a :class:`~pfcollector.devmaster.DevMaster` injects.

    Args:
        control: The server's listener, for :meth:`down`, :meth:`up` and :meth:`down_for`.
    """

    def __init__(self, control: ListenerControl) -> None:
        self._control = control
        self._lock = threading.Lock()
        self._fail_n = 0
        self._fail_status = 503
        self._retry_after: float | None = None
        self._slow_seconds = 0.0
        self._slow_n: int | None = None
        self._reset_n = 0
        self._rejected: dict[str, int] = {}
        self._failing: frozenset[str] = frozenset()

    def fail_next(self, n: int, status: int = 503, retry_after: float | None = None) -> None:
        """Answer the next ``n`` result requests with ``status`` (and ``Retry-After``).

        Args:
            n: How many requests (replaces any count left).
            status: Any 4xx or 5xx.
            retry_after: Seconds for a ``Retry-After`` header; an integral value is sent as an
                integer, a fractional one as a decimal (``0.2``, not valid HTTP but handy).
        """
        _check_status(status, 400, 599)
        with self._lock:
            self._fail_n, self._fail_status, self._retry_after = max(0, n), status, retry_after

    def down_for(self, seconds: float) -> None:
        """Close the listener now (connection refused) and reopen it on the same port later."""
        self._control.down_for(seconds)

    def down(self) -> None:
        """Close the listener and all open connections until :meth:`up`."""
        self._control.down()

    def up(self) -> None:
        """Reopen the listener on the same port (no-op when it is up)."""
        self._control.up()

    def slow(self, seconds: float, n: int | None = None) -> None:
        """Delay the answers to the next ``n`` result requests, or all of them if ``n`` is None."""
        with self._lock:
            self._slow_seconds, self._slow_n = max(0.0, seconds), n

    def reject_ids(self, ids: Iterable[str], status: int = 400) -> None:
        """Refuse, with ``status`` (4xx), any request holding one of these item ids."""
        _check_status(status, 400, 499)
        with self._lock:
            self._rejected.update(dict.fromkeys(ids, status))

    def partial_fail_ids(self, ids: Iterable[str]) -> None:
        """Make these item ids fail to store (a batch answers ``partial_success``, else 500)."""
        with self._lock:
            self._failing = self._failing | frozenset(ids)

    def reset_next(self, n: int) -> None:
        """Reset (TCP RST) the next ``n`` result requests after reading part of their body."""
        with self._lock:
            self._reset_n = max(0, n)

    def clear(self) -> None:
        """Remove every fault and bring the listener up if it is down."""
        with self._lock:
            self._fail_n = self._reset_n = 0
            self._slow_seconds, self._slow_n = 0.0, None
            self._rejected = {}
            self._failing = frozenset()
        self._control.up()

    def take(self) -> Plan:
        """Consume what applies to one arriving result request (used by the handler)."""
        with self._lock:
            if self._reset_n > 0:
                self._reset_n -= 1
                return Plan(reset=True)
            delay = 0.0
            if self._slow_seconds > 0 and (self._slow_n is None or self._slow_n > 0):
                delay = self._slow_seconds
                if self._slow_n is not None:
                    self._slow_n -= 1
            if self._fail_n > 0:
                self._fail_n -= 1
                return Plan(
                    fail_status=self._fail_status, retry_after=self._retry_after, delay=delay
                )
            return _NO_PLAN if delay == 0.0 else Plan(delay=delay)

    def rejection(self, ids: Iterable[str]) -> int | None:
        """The status to refuse a request holding ``ids`` with, or None."""
        with self._lock:
            if not self._rejected:
                return None
            for item_id in ids:
                status = self._rejected.get(item_id)
                if status is not None:
                    return status
        return None

    def failing_ids(self) -> frozenset[str]:
        """The ids whose store must fail."""
        with self._lock:
            return self._failing
