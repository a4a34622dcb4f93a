"""Prometheus metrics, scraped over real HTTP from a running daemon.

Rules of this module: every figure is checked as a scraper sees it (text exposition parsed by
``prometheus_client.parser``), from a daemon in this test's trio run with a real socket, spool
and, where delivery matters, the reference master on 127.0.0.1; nothing sleeps except polling
under ``trio.fail_after``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from pfcollector.config import Config
from pfcollector.daemon import Daemon
from pfcollector.devmaster import DevMaster
from pfcollector.events import Kind
from pfcollector.metrics import Metrics
from pfcollector.protocol import Ack, EventMsg
from tests.conftest import start_daemon
from tests.wire import RawClient, event


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


async def scrape(port: int, path: str = "/metrics") -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(f"http://127.0.0.1:{port}{path}")


async def send(daemon: Daemon, *events: EventMsg) -> None:
    """Send ``events`` on one connection and return once the daemon has acked them all."""
    client = await RawClient.connect(daemon.config.socket_path)
    await client.hello()
    for ev in events:
        await client.send(ev)
    with trio.fail_after(10):
        while True:
            msg = await client.recv()
            if isinstance(msg, Ack) and msg.seq >= events[-1].seq:
                break
    await client.aclose()


async def test_local_daemon_scrape(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    port = free_port()
    daemon = await start_daemon(
        nursery, make_config(metrics_addr=f"127.0.0.1:{port}", coalesce=False)
    )
    await send(
        daemon,
        event(1, Kind.CRASH),
        event(2, Kind.COVERAGE),
        event(3, Kind.COVERAGE),
        event(4, Kind.COVERAGE, edges=-1),  # refused: out_of_range
    )
    response = await scrape(port)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    got = samples(response.text)
    assert got["pfcollector_events_received_total", (("kind", "crash"),)] == 1
    assert got["pfcollector_events_accepted_total", (("kind", "coverage"),)] == 2
    assert got["pfcollector_events_received_total", (("kind", "coverage"),)] == 3
    assert got["pfcollector_events_rejected_total", (("kind", "coverage"),)] == 1
    refused = (("code", "out_of_range"), ("kind", "coverage"))
    assert got["pfcollector_events_refused_total", refused] == 1
    assert got["pfcollector_spool_events", (("kind", "coverage"),)] == 2
    assert got["pfcollector_spool_bytes", (("kind", "crash"),)] > 0
    assert got["pfcollector_spool_oldest_event_age_seconds", (("kind", "crash"),)] >= 0
    assert got["pfcollector_dead_letters", (("kind", "crash"),)] == 0
    assert got["pfcollector_dedupe_hits_total", (("kind", "crash"),)] == 0
    assert got["pfcollector_connections_accepted_total", ()] >= 1
    assert got["pfcollector_memory_bytes", (("state", "budget"),)] == 256 * 1024 * 1024
    assert got["pfcollector_memory_bytes", (("state", "used"),)] >= 0
    assert ("pfcollector_breaker_state", ()) not in got  # local mode: no breaker
    assert got["pfcollector_build_info", (("mode", "local"), ("version", "0.1.0"))] == 1
    assert (await scrape(port, "/nope")).status_code == 404
    daemon.stop()


async def test_delivery_metrics_against_the_master(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    port = free_port()
    with DevMaster() as master:
        config = make_config(
            master_url=master.url,
            bot_id="bot-m",
            metrics_addr=f"127.0.0.1:{port}",
            coalesce=False,
            flush_interval=0.1,
            retry_base=0.01,
            retry_cap=0.05,
        )
        master.faults.fail_next(1, status=503)
        daemon = await start_daemon(nursery, config)
        await send(daemon, *(event(i, Kind.CRASH) for i in range(1, 4)))
        with trio.fail_after(10):
            while master.count("crash") < 3 or daemon.spool.total_count:
                await trio.sleep(0.02)
        got = samples((await scrape(port)).text)
        assert got["pfcollector_breaker_state", ()] == 0
        assert got["pfcollector_retries_total", ()] == 1
        assert got["pfcollector_batches_sent_total", ()] >= 1
        assert got["pfcollector_events_delivered_total", (("kind", "crash"),)] == 3
        assert got["pfcollector_request_duration_seconds_count", ()] == 2  # the 503, then 200
        assert got["pfcollector_request_duration_seconds_bucket", (("le", "+Inf"),)] == 2
        assert got["pfcollector_last_success_timestamp_seconds", ()] > 0

        master.down()  # the breaker opens; the gauge says so
        await send(daemon, event(9, Kind.CRASH))
        with trio.fail_after(10):
            while daemon.sender is None or daemon.sender.breaker.snapshot(0)["state"] != "open":
                await trio.sleep(0.02)
        got = samples((await scrape(port)).text)
        assert got["pfcollector_breaker_state", ()] == 2
        assert got["pfcollector_batches_failed_total", ()] >= 1
        assert got["pfcollector_spool_events", (("kind", "crash"),)] == 1
        daemon.stop()
        master.up()


async def test_a_failing_scrape_answers_500_and_the_server_lives_on() -> None:
    calls = 0

    async def snapshot() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return {"delivery": {"breaker": {"state": "half_open"}, "sender": {}}}

    metrics = Metrics(snapshot)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(metrics.serve, "127.0.0.1:0")
        assert (await scrape(port)).status_code == 500
        response = await scrape(port)
        assert response.status_code == 200
        assert samples(response.text)["pfcollector_breaker_state", ()] == 1
        async with httpx.AsyncClient() as client:
            assert (await client.post(f"http://{host}:{port}/metrics")).status_code == 405
        nursery.cancel_scope.cancel()


def test_metrics_address_is_validated(make_config: Callable[..., Config]) -> None:
    from pfcollector.config import ConfigError

    with pytest.raises(ConfigError, match="metrics_addr: must be HOST:PORT"):
        make_config(metrics_addr="9464")
