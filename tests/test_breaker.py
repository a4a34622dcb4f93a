"""The circuit breaker as a pure state machine.

Rules of this module: no event loop, no clock; time is a plain float passed in.
"""

from __future__ import annotations

import pytest

from pfcollector.breaker import BreakerState, CircuitBreaker


def opened(now: float = 0.0, **kwargs: float) -> CircuitBreaker:
    breaker = CircuitBreaker(**kwargs)  # type: ignore[arg-type]
    for _ in range(breaker.failure_threshold):
        breaker.record_failure(now)
    assert breaker.state(now) is BreakerState.OPEN
    return breaker


def test_closed_allows_and_counts_to_the_threshold() -> None:
    breaker = CircuitBreaker(failure_threshold=3)
    for _ in range(2):
        breaker.record_failure(0.0)
        assert breaker.allow(0.0)
    breaker.record_failure(0.0)
    assert breaker.state(0.0) is BreakerState.OPEN
    assert not breaker.allow(0.0)


def test_failures_must_be_consecutive() -> None:
    breaker = CircuitBreaker(failure_threshold=3)
    for _ in range(2):
        breaker.record_failure(0.0)
    breaker.record_success(0.0)
    for _ in range(2):
        breaker.record_failure(0.0)
    assert breaker.state(0.0) is BreakerState.CLOSED


def test_open_waits_then_lets_exactly_one_probe() -> None:
    breaker = opened(10.0, reset_timeout=1.0)
    assert breaker.retry_at() == 11.0
    assert not breaker.allow(10.999)
    assert breaker.allow(11.0)
    assert breaker.state(11.0) is BreakerState.HALF_OPEN
    assert breaker.retry_at() is None
    assert [breaker.allow(11.0 + i) for i in range(100)] == [False] * 100


def test_probe_success_closes_and_resets() -> None:
    breaker = opened(0.0, reset_timeout=1.0)
    assert breaker.allow(1.0)
    breaker.record_success(1.5)
    assert breaker.state(1.5) is BreakerState.CLOSED
    assert all(breaker.allow(1.5) for _ in range(10))
    snap = breaker.snapshot(1.5)
    assert snap["consecutive_failures"] == 0
    assert snap["current_timeout"] == 1.0


def test_probe_failure_backs_off_up_to_the_cap() -> None:
    breaker = opened(0.0, reset_timeout=1.0, max_reset_timeout=5.0, backoff=2.0)
    now, timeouts = 0.0, []
    for _ in range(6):
        retry_at = breaker.retry_at()
        assert retry_at is not None
        timeouts.append(retry_at - now)
        now = retry_at
        assert breaker.allow(now)
        breaker.record_failure(now)
    assert timeouts == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_success_after_backoff_restores_the_short_timeout() -> None:
    breaker = opened(0.0, reset_timeout=1.0, backoff=2.0)
    for now in (1.0, 3.0, 7.0):  # three failed probes: timeout now 8
        assert breaker.allow(now)
        breaker.record_failure(now)
    assert breaker.retry_at() == 15.0
    assert breaker.allow(15.0)
    breaker.record_success(15.0)
    for _ in range(breaker.failure_threshold):
        breaker.record_failure(16.0)
    assert breaker.retry_at() == 17.0  # back to the 1 s base


def test_failure_while_open_changes_nothing() -> None:
    breaker = opened(0.0, reset_timeout=1.0)
    breaker.record_failure(0.5)  # a call that started before it opened
    assert breaker.retry_at() == 1.0
    assert breaker.snapshot(0.5)["opens_total"] == 1


def test_abandoned_probe_is_handed_to_the_next_caller() -> None:
    breaker = opened(0.0, reset_timeout=4.0)
    assert breaker.allow(4.0)
    breaker.abandon_probe(5.0)
    assert breaker.state(5.0) is BreakerState.OPEN
    assert breaker.allow(5.0)
    assert not breaker.allow(5.0)


def test_snapshot_and_transitions() -> None:
    seen: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout=3.0)
    breaker.on_transition = lambda old, new: seen.append((old, new))
    assert breaker.snapshot(0.0) == {
        "state": "closed",
        "consecutive_failures": 0,
        "opened_at": None,
        "retry_in": None,
        "current_timeout": 3.0,
        "opens_total": 0,
    }
    breaker.record_failure(1.0)
    breaker.record_failure(2.0)
    assert breaker.snapshot(3.0) == {
        "state": "open",
        "consecutive_failures": 2,
        "opened_at": 2.0,
        "retry_in": 2.0,
        "current_timeout": 3.0,
        "opens_total": 1,
    }
    assert breaker.snapshot(9.0)["retry_in"] == 0.0
    assert breaker.allow(9.0)
    breaker.record_success(9.0)
    assert seen == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"failure_threshold": 0},
        {"reset_timeout": 0.0},
        {"reset_timeout": 10.0, "max_reset_timeout": 5.0},
        {"backoff": 0.5},
    ],
)
def test_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]
