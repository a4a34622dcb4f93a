"""Retries honour backoff and ``Retry-After`` whatever the caller asks: a real SQLite spool, the
real pipeline and sender, a scripted master (``httpx.MockTransport``) in virtual time
(``autojump_clock``; spool calls inline). Rules: ``flush`` sends what is ready once and never
releases a retry early; a master's ``Retry-After`` holds every request of the sender; a
``partial_success`` with retryable errors counts as a failure for the breaker and backoff."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing

from pfcollector.breaker import BreakerState, CircuitBreaker
from pfcollector.events import Kind
from pfcollector.pipeline import BatchPolicy, Pipeline
from pfcollector.sender import Batch, Sender
from pfcollector.spool import Spool

from .conftest import make_event


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


class Master:
    """Answers every request with ``answer(request)``; records the trio time of each."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response]) -> None:
        self.answer = answer
        self.times: list[float] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.times.append(trio.current_time())
        return self.answer(request)


async def run_for(
    spool: Spool, master: Master, seconds: float, *, flushes: int, breaker: CircuitBreaker
) -> Pipeline:
    """Run pipeline and sender for ``seconds``, calling ``flush`` ``flushes`` times a second."""
    transport = httpx.MockTransport(master)
    async with httpx.AsyncClient(transport=transport, base_url="http://master") as client:
        sender = Sender(client, bot_id="b", breaker=breaker)
        pipeline = Pipeline(spool, BatchPolicy(100, 512 * 1024, 3600.0), offload=inline)
        send, recv = trio.open_memory_channel[Batch](4)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipeline.run, send)
            nursery.start_soon(pipeline.deliver, recv, sender.deliver)
            end = trio.current_time() + seconds
            while trio.current_time() < end:
                for _ in range(flushes):
                    pipeline.flush_now()
                    await trio.sleep(0.001)
                await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
    return pipeline


def crashes(spool: Spool, n: int, jobs: int = 1) -> None:
    spool.append([make_event(Kind.CRASH, job_id=f"job-{i % jobs}") for i in range(n)])


async def test_flush_does_not_shorten_retry_after(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    spool = Spool(tmp_path / "s.db")
    crashes(spool, 3)
    master = Master(
        lambda req: httpx.Response(429, json={"error": "slow down"}, headers={"Retry-After": "120"})
    )
    await run_for(spool, master, 600, flushes=50, breaker=CircuitBreaker())
    # One attempt at the first flush, then one per 120 s at most: never 100,000 in 2 s.
    assert 2 <= len(master.times) <= 6
    gaps = [b - a for a, b in zip(master.times, master.times[1:], strict=False)]
    assert all(gap >= 120 for gap in gaps), gaps
    assert spool.total_count == 3  # nothing lost, nothing dead-lettered


async def test_retry_after_holds_every_batch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    spool = Spool(tmp_path / "s.db")
    # Four jobs: four batches; the master's wait applies to all of them, not to one.
    crashes(spool, 4, jobs=4)
    master = Master(
        lambda req: httpx.Response(503, json={"error": "busy"}, headers={"Retry-After": "100"})
    )
    await run_for(spool, master, 450, flushes=5, breaker=CircuitBreaker(failure_threshold=100))
    windows = {int(t // 100) for t in master.times}
    assert len(master.times) <= len(windows) + 1  # about one request per Retry-After window


async def test_retryable_partial_success_is_not_hammered(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    spool = Spool(tmp_path / "s.db")
    crashes(spool, 2)

    def locked(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "status": "processed",
                "processed": {"crashes": 0, "coverage": 0, "corpus": 0},
                "errors": ["crash 0: database is locked", "crash 1: database is locked"],
                "partial_success": True,
            },
        )

    master = Master(locked)
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout=1.0, max_reset_timeout=60.0)
    await run_for(spool, master, 600, flushes=20, breaker=breaker)
    # Backoff (capped at 30 s) and the breaker (backing off to 60 s) set the pace; a
    # loop of flushes does not. Without them: thousands of requests.
    assert len(master.times) <= 40
    assert breaker.snapshot(trio.current_time())["opens_total"] >= 1
    assert breaker.state(trio.current_time()) is not BreakerState.CLOSED
    assert spool.total_count == 2
