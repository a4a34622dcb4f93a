"""The sender against a scripted master (``httpx.MockTransport``) in virtual time.

Rules of this module: every test takes ``autojump_clock``, so waits cost no real time and
elapsed times are asserted exactly; every ``AsyncClient`` is closed (``async with``); the fake
master records each request with the trio time it arrived.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from pfcollector.botapi import RegisterError
from pfcollector.bots import heartbeat_loop, register
from pfcollector.breaker import BreakerState, CircuitBreaker
from pfcollector.events import Event, Kind
from pfcollector.sender import Batch, RetryPolicy, Sender, TransientError

TS = 1_700_000_000_000_000_000
Reply = httpx.Response | Exception


def crash(i: int, job: str = "job-1") -> Event:
    return Event(f"c{i}", Kind.CRASH, job, "afl", TS, {"type": "SEGV", "signal": 11})


def corpus(i: int) -> Event:
    return Event(f"p{i}", Kind.CORPUS, "job-1", "afl", TS, {"files": [f"id:{i}"]})


def ok(**extra: Any) -> httpx.Response:
    return httpx.Response(200, json={"status": "processed", **extra})


def error(status: int, text: str = "boom", headers: dict[str, str] | None = None) -> Reply:
    return httpx.Response(status, json={"error": text, "status": status}, headers=headers)


def refused() -> Reply:
    return httpx.ConnectError("connection refused")


class FakeMaster:
    """Answers from ``script(request, n)`` (n counts from 1); records (time, request)."""

    def __init__(self, script: Callable[[httpx.Request, int], Reply], latency: float = 0.0):
        self.script = script
        self.latency = latency
        self.requests: list[tuple[float, httpx.Request]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append((trio.current_time(), request))
        n = len(self.requests)
        if self.latency:
            await trio.sleep(self.latency)
        reply = self.script(request, n)
        if isinstance(reply, Exception):
            raise reply
        return reply

    @property
    def paths(self) -> list[str]:
        return [r.url.path for _, r in self.requests]

    @property
    def times(self) -> list[float]:
        return [t for t, _ in self.requests]


@asynccontextmanager
async def sender_for(
    master: FakeMaster, *, breaker: CircuitBreaker | None = None, **kwargs: Any
) -> AsyncIterator[Sender]:
    transport = httpx.MockTransport(master)
    async with httpx.AsyncClient(transport=transport, base_url="http://master:8080") as client:
        yield Sender(client, bot_id="bot-1", breaker=breaker or CircuitBreaker(), **kwargs)


def batch(kind: Kind, events: list[Event]) -> Batch:
    return Batch(kind, "job-1", events)


async def test_retries_then_success(autojump_clock: trio.testing.MockClock) -> None:
    master = FakeMaster(lambda req, n: error(503) if n < 3 else ok())
    async with sender_for(master) as sender:
        result = await sender.deliver(batch(Kind.CRASH, [crash(0), crash(1)]))
    assert result.delivered == ["c0", "c1"]
    assert (result.poisoned, result.requeue) == ([], [])
    assert master.paths == ["/api/v1/results/batch"] * 3
    assert (sender.stats.requests, sender.stats.retries) == (3, 2)
    assert sender.stats.delivered["crash"] == 2
    assert sender.breaker.state(trio.current_time()) is BreakerState.CLOSED
    body = json.loads(master.requests[-1][1].content)
    assert [c["id"] for c in body["crashes"]] == ["c0", "c1"]


async def test_retry_after_is_honoured(autojump_clock: trio.testing.MockClock) -> None:
    master = FakeMaster(
        lambda req, n: error(429, headers={"Retry-After": "10"}) if n == 1 else ok()
    )
    async with sender_for(master) as sender:
        result = await sender.deliver(batch(Kind.CRASH, [crash(0)]))
    assert result.delivered == ["c0"]
    first, second = master.times
    assert second - first == pytest.approx(10.0)  # the jitter window (0.5 s) is shorter


async def test_retry_after_beyond_the_cap_requeues_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster(lambda req, n: error(503, headers={"Retry-After": "300"}))
    async with sender_for(master, retry=RetryPolicy(cap=30.0)) as sender:
        result = await sender.deliver(batch(Kind.CRASH, [crash(0)]))
    assert result.requeue == ["c0"]
    assert result.retry_after == 300.0
    assert len(master.requests) == 1
    assert trio.current_time() < 1.0


async def test_exhausted_attempts_requeue_everything(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    master = FakeMaster(lambda req, n: refused())
    events = [crash(i) for i in range(3)]
    caplog.set_level(logging.DEBUG, logger="pfcollector.sender")
    async with sender_for(master, mode="item", item_concurrency=1) as sender:
        result = await sender.deliver(batch(Kind.CRASH, events))
    assert sorted(result.requeue) == ["c0", "c1", "c2"]
    assert result.delivered == []
    assert result.reason is not None
    assert "ConnectError" in result.reason
    # the first event used its 4 attempts; the rest were not tried once the master was down
    assert len(master.requests) == 4
    assert sender.stats.requeued["crash"] == 3
    assert sender.stats.last_error is not None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1  # the first failure, not every retry


async def test_400_is_poisoned_without_retry(autojump_clock: trio.testing.MockClock) -> None:
    master = FakeMaster(lambda req, n: error(400, "Invalid batch request"))
    async with sender_for(master) as sender:
        result = await sender.deliver(batch(Kind.CRASH, [crash(0)]))
    assert result.poisoned == [("c0", 400, "Invalid batch request")]
    assert (result.delivered, result.requeue) == ([], [])
    assert len(master.requests) == 1
    assert sender.stats.poisoned["crash"] == 1
    # a refusal means the master is up
    assert sender.breaker.snapshot(trio.current_time())["consecutive_failures"] == 0


async def test_refused_batch_is_resent_item_by_item(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    def script(request: httpx.Request, n: int) -> Reply:
        if request.url.path.endswith("/batch"):
            return error(400, "json: unknown field")
        item = json.loads(request.content)
        return error(400, "bad crash") if item["id"] == "c1" else ok()

    master = FakeMaster(script)
    caplog.set_level(logging.DEBUG, logger="pfcollector.sender")
    async with sender_for(master) as sender:
        result = await sender.deliver(batch(Kind.CRASH, [crash(0), crash(1), crash(2)]))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2  # the batch refusal, then one summary of what was set aside
    assert "refused 1 of 3 crash" in warnings[1]
    assert sorted(result.delivered) == ["c0", "c2"]
    assert result.poisoned == [("c1", 400, "bad crash")]
    assert master.paths[0] == "/api/v1/results/batch"
    assert sorted(master.paths[1:]) == ["/api/v1/results/crash"] * 3


async def test_partial_success_splits_the_outcome(autojump_clock: trio.testing.MockClock) -> None:
    master = FakeMaster(
        lambda req, n: ok(
            processed={"crashes": 0, "coverage": 0, "corpus": 1},
            errors=[
                "corpus 1: NOT NULL constraint failed: corpus_updates.files",
                "corpus 2: database is locked",
            ],
            partial_success=True,
        )
    )
    async with sender_for(master) as sender:
        result = await sender.deliver(batch(Kind.CORPUS, [corpus(0), corpus(1), corpus(2)]))
    assert result.delivered == ["p0"]
    assert result.poisoned == [
        ("p1", 200, "corpus 1: NOT NULL constraint failed: corpus_updates.files")
    ]
    assert result.requeue == ["p2"]
    assert len(master.requests) == 1


async def test_breaker_opens_then_lets_exactly_one_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    up_at = 30.0
    master = FakeMaster(
        lambda req, n: refused() if trio.current_time() < up_at else ok(), latency=0.1
    )
    breaker = CircuitBreaker(failure_threshold=5, reset_timeout=1.0, max_reset_timeout=60.0)
    events = [crash(i) for i in range(8)]
    async with sender_for(
        master, breaker=breaker, mode="item", retry=RetryPolicy(attempts=10)
    ) as sender:
        result = await sender.deliver(batch(Kind.CRASH, events))
    assert sorted(result.delivered) == sorted(e.id for e in events)
    times = master.times
    assert times[:8] == [0.0] * 8  # all in flight before the breaker could open
    # then only probes, one at a time, the reset timeout doubling: 1, 2, 4, 8, 16 s
    probes = times[8:13]
    assert probes == pytest.approx([1.1, 3.2, 7.3, 15.4, 31.5])
    # the last probe got through; the 7 waiting requests followed it at once
    assert times[13:] == pytest.approx([31.6] * 7)
    snap = breaker.snapshot(trio.current_time())
    assert snap["state"] == "closed"
    assert snap["opens_total"] == 5
    assert snap["current_timeout"] == 1.0


async def test_cancelled_probe_is_handed_back(autojump_clock: trio.testing.MockClock) -> None:
    master = FakeMaster(lambda req, n: ok(), latency=100.0)
    breaker = CircuitBreaker(failure_threshold=1, reset_timeout=1.0)
    breaker.record_failure(trio.current_time())
    async with sender_for(master, breaker=breaker) as sender:
        with trio.move_on_after(5.0):
            await sender.deliver(batch(Kind.CRASH, [crash(0)]))
        assert breaker.state(trio.current_time()) is BreakerState.OPEN
        assert breaker.allow(trio.current_time())


async def test_item_mode_posts_each_event(autojump_clock: trio.testing.MockClock) -> None:
    master = FakeMaster(lambda req, n: ok())
    async with sender_for(master, mode="item") as sender:
        result = await sender.deliver(batch(Kind.CORPUS, [corpus(0), corpus(1)]))
    assert sorted(result.delivered) == ["p0", "p1"]
    assert master.paths == ["/api/v1/results/corpus"] * 2
    bodies = sorted(json.loads(r.content)["id"] for _, r in master.requests)
    assert bodies == ["p0", "p1"]
    assert json.loads(master.requests[0][1].content)["bot_id"] == "bot-1"


async def test_item_mode_concurrency_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    master = FakeMaster(lambda req, n: ok(), latency=1.0)
    async with sender_for(master, mode="item", item_concurrency=4) as sender:
        result = await sender.deliver(batch(Kind.CRASH, [crash(i) for i in range(10)]))
    assert len(result.delivered) == 10
    assert master.times == [0.0] * 4 + [1.0] * 4 + [2.0] * 2


async def test_status_kinds_go_to_results_status(autojump_clock: trio.testing.MockClock) -> None:
    master = FakeMaster(lambda req, n: httpx.Response(200, json={"status": "received"}))
    events = [
        Event("s1", Kind.STATS, "job-1", "afl", TS, {"executions": 10}),
        Event("l1", Kind.STARTED, "job-1", "afl", TS, {"message": "go"}),
    ]
    async with sender_for(master) as sender:  # batch mode
        r1 = await sender.deliver(batch(Kind.STATS, events[:1]))
        r2 = await sender.deliver(batch(Kind.STARTED, events[1:]))
    assert (r1.delivered, r2.delivered) == (["s1"], ["l1"])
    assert master.paths == ["/api/v1/results/status"] * 2
    assert json.loads(master.requests[0][1].content)["type"] == "fuzzer_stats"


async def test_unencodable_event_is_poisoned_locally(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster(lambda req, n: ok())
    bad = Event("s9", Kind.STATS, "job-1", "afl", TS, {"cpu_usage": float("inf")})
    async with sender_for(master) as sender:
        result = await sender.deliver(batch(Kind.STATS, [bad]))
    [(event_id, status, text)] = result.poisoned
    assert (event_id, status) == ("s9", None)
    assert "JSON" in text
    assert master.requests == []


async def test_headers(autojump_clock: trio.testing.MockClock) -> None:
    master = FakeMaster(lambda req, n: ok())
    async with sender_for(master, token="s3cret") as sender:
        await sender.deliver(batch(Kind.CRASH, [crash(0)]))
    async with sender_for(master) as sender:
        await sender.deliver(batch(Kind.CRASH, [crash(1)]))
    with_token, without = (r for _, r in master.requests)
    assert with_token.headers["Content-Type"] == "application/json"
    assert with_token.headers["Authorization"] == "Bearer s3cret"
    assert with_token.headers["User-Agent"].startswith("pfcollector/")
    assert with_token.headers["User-Agent"].endswith("(bot bot-1)")
    assert "Authorization" not in without.headers
    assert "Content-Encoding" not in without.headers


async def test_events_of_two_jobs_go_in_separate_bodies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster(lambda req, n: ok())
    async with sender_for(master) as sender:
        result = await sender.deliver(batch(Kind.CRASH, [crash(0, "a"), crash(1, "b")]))
    assert sorted(result.delivered) == ["c0", "c1"]
    assert sorted(json.loads(r.content)["job_id"] for _, r in master.requests) == ["a", "b"]


async def test_register(autojump_clock: trio.testing.MockClock) -> None:
    answer = b'{"bot_id":"bot-77","status":"registered"}'
    master = FakeMaster(
        lambda req, n: (
            error(503)
            if n == 1
            else httpx.Response(201, content=answer, headers={"Content-Type": "text/plain"})
        )
    )
    transport = httpx.MockTransport(master)
    async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:
        bot_id = await register(
            client,
            hostname="h",
            name="n",
            capabilities=["afl++"],
            api_endpoint="http://h:1",
        )
        assert bot_id == "bot-77"
        _, request = master.requests[-1]
        assert request.url.path == "/api/v1/bots/register"
        assert request.headers["Content-Type"] == "application/json"
        assert json.loads(request.content)["capabilities"] == ["aflpp"]

        master.script = lambda req, n: error(400, "Invalid request body")
        with pytest.raises(RegisterError):
            await register(client, hostname="h", name="n", capabilities=[], api_endpoint="http://h")
        master.script = lambda req, n: refused()
        with pytest.raises(TransientError):
            await register(client, hostname="h", name="n", capabilities=[], api_endpoint="http://h")


async def test_heartbeat_loop_keeps_going(autojump_clock: trio.testing.MockClock) -> None:
    master = FakeMaster(lambda req, n: refused() if n == 2 else httpx.Response(200, json={}))
    transport = httpx.MockTransport(master)
    async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:
        with trio.move_on_after(35.0):
            await heartbeat_loop(
                client, "bot-1", interval=10.0, status_fn=lambda: ("busy", "job-1", TS)
            )
    assert master.times == [0.0, 10.0, 20.0, 30.0]
    assert master.paths == ["/api/v1/bots/bot-1/heartbeat"] * 4
    body = json.loads(master.requests[0][1].content)
    assert body == {
        "status": "busy",
        "current_job": "job-1",
        "last_activity": "2023-11-14T22:13:20.000000000Z",
    }


async def test_heartbeat_status_alone(autojump_clock: trio.testing.MockClock) -> None:
    master = FakeMaster(lambda req, n: httpx.Response(200, json={}))
    transport = httpx.MockTransport(master)
    async with httpx.AsyncClient(transport=transport, base_url="http://m") as client:
        with trio.move_on_after(1.0):
            await heartbeat_loop(client, "bot-1", interval=10.0, status_fn=lambda: "idle")
    body = json.loads(master.requests[0][1].content)
    assert (body["status"], body["current_job"]) == ("idle", None)
    assert body["last_activity"].endswith("Z")
