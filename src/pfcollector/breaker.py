"""A circuit breaker for the link to the master, as a pure state machine.

The breaker never reads a clock: every method takes ``now`` (the caller passes
``trio.current_time()``), so it is tested without an event loop and runs in virtual time under
``autojump_clock``.

How it differs from the Go collector's breaker:

* half-open lets exactly **one** probe through; every other caller waits for its answer;
* the reset timeout backs off (``reset_timeout * backoff**n``, capped at ``max_reset_timeout``)
  while probes keep failing, so a long outage costs one request per minute, not one per second;
* one answer from the master closes it and puts the timeout back to its short base, so
  recovery after an outage takes seconds, not a fixed 60 s.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.StrEnum):
    """Where a :class:`CircuitBreaker` is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive failures and stops calls while the master is down.

    * **closed**: every call goes through; ``failure_threshold`` consecutive failures open it.
    * **open**: no call goes through until ``retry_at()``; the first :meth:`allow` at or after
      that moment turns it half-open and is the probe.
    * **half-open**: the probe is out and nobody else goes through. Its success closes the
      breaker; its failure opens it again with the reset timeout multiplied by ``backoff``.

    Outcomes of calls that started before the breaker opened may still land while it is open or
    half-open. A success always closes it (the master answered, which is all the breaker
    wants to know); a failure while open is counted but changes nothing; a failure while
    half-open is taken as the probe's failure.

    Attributes:
        on_transition: Called as ``on_transition(old, new)`` on every state change, for logging.
            Set by the owner; it must not raise.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout: float = 1.0,
        max_reset_timeout: float = 60.0,
        backoff: float = 2.0,
    ) -> None:
        """Build a closed breaker.

        Args:
            failure_threshold: Consecutive failures that open a closed breaker (at least 1).
            reset_timeout: Seconds an open breaker waits before its first probe.
            max_reset_timeout: Cap of the backed-off reset timeout.
            backoff: Factor applied to the reset timeout on every failed probe (at least 1).

        Raises:
            ValueError: A parameter is out of range.
        """
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_timeout <= 0 or max_reset_timeout < reset_timeout:
            raise ValueError("need 0 < reset_timeout <= max_reset_timeout")
        if backoff < 1:
            raise ValueError("backoff must be at least 1")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.max_reset_timeout = max_reset_timeout
        self.backoff = backoff
        self.on_transition: Callable[[BreakerState, BreakerState], None] | None = None
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at: float | None = None
        self._current_timeout = reset_timeout
        self._opens_total = 0

    # -- queries ---------------------------------------------------------------------------

    def state(self, now: float) -> BreakerState:
        """The current state. Reading it changes nothing (only :meth:`allow` takes the probe).

        An open breaker whose timeout has passed still reads ``OPEN`` until someone calls
        :meth:`allow`; :meth:`retry_at` tells when that is.
        """
        del now  # part of the signature so that callers never need to care
        return self._state

    def retry_at(self) -> float | None:
        """When an open breaker lets its probe through, or ``None`` if it is not open."""
        if self._state is not BreakerState.OPEN or self._opened_at is None:
            return None
        return self._opened_at + self._current_timeout

    def snapshot(self, now: float) -> dict[str, Any]:
        """A JSON-ready picture of the breaker for status output.

        Keys: ``state``, ``consecutive_failures``, ``opened_at`` (trio time or ``None``),
        ``retry_in`` (seconds until the probe may go, ``None`` unless open), ``current_timeout``,
        ``opens_total``.
        """
        retry_at = self.retry_at()
        return {
            "state": self._state.value,
            "consecutive_failures": self._consecutive_failures,
            "opened_at": self._opened_at,
            "retry_in": None if retry_at is None else max(0.0, retry_at - now),
            "current_timeout": self._current_timeout,
            "opens_total": self._opens_total,
        }

    # -- transitions -----------------------------------------------------------------------

    def allow(self, now: float) -> bool:
        """Whether a call may go to the master now.

        Closed: always. Open: not before ``retry_at()``; the first call at or after it turns
        the breaker half-open and is let through as the probe. Half-open: never (the probe
        is out).
        """
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            retry_at = self.retry_at()
            if retry_at is not None and now >= retry_at:
                self._set_state(BreakerState.HALF_OPEN)
                return True
        return False

    def record_success(self, now: float) -> None:
        """The master answered: close, forget the failures, reset the timeout to its base."""
        del now
        self._consecutive_failures = 0
        self._current_timeout = self.reset_timeout
        self._opened_at = None
        self._set_state(BreakerState.CLOSED)

    def record_failure(self, now: float) -> None:
        """A call failed in a way that says the master is not answering properly.

        Closed: counted; the ``failure_threshold``-th consecutive failure opens the breaker.
        Half-open (the probe failed): opens again with the reset timeout backed off.
        Open: counted only.
        """
        self._consecutive_failures += 1
        if self._state is BreakerState.CLOSED:
            if self._consecutive_failures >= self.failure_threshold:
                self._open(now)
        elif self._state is BreakerState.HALF_OPEN:
            self._current_timeout = min(
                self._current_timeout * self.backoff, self.max_reset_timeout
            )
            self._open(now)

    def abandon_probe(self, now: float) -> None:
        """The probe ended without an answer either way (its task was cancelled).

        Half-open goes back to open with the probe due at once, so the next caller probes
        instead of everyone waiting for an answer that will never come. Otherwise a no-op.
        """
        if self._state is BreakerState.HALF_OPEN:
            self._opened_at = now - self._current_timeout
            self._set_state(BreakerState.OPEN)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._opens_total += 1
        self._set_state(BreakerState.OPEN)

    def _set_state(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if old is not new and self.on_transition is not None:
            self.on_transition(old, new)
