"""Prometheus metrics: figures the daemon already keeps, read at scrape time, served over HTTP.

Nothing in the hot paths counts for Prometheus. The daemon already counts everything an
operator needs (``Daemon.status()``: the server's counters, the spool's per-kind figures, the
sender's counters and latency buckets, the breaker, the pipeline), so a scrape takes one
status snapshot and a custom collector turns it into metric families. The one histogram,
request latency, is kept by the sender as plain bucket counts (``SenderStats``).

Serving: a small HTTP/1.0 handler on trio, a long-lived task in the daemon's nursery, rather
than ``prometheus_client.start_http_server`` in a thread. The figures then are read on the
thread that changes them (no locks, no torn counters, no ``dict changed size during
iteration``), the blocking spool query goes through ``trio.to_thread`` like every other
one, the listener closes with the daemon, and a port already taken fails the start loudly.
A scrape that goes wrong answers 500 and is logged; it never takes the daemon down.

Resource handling:
    Each metrics connection gets :data:`REQUEST_TIMEOUT` seconds to send its request and read
    the answer, and requests are limited to :data:`MAX_REQUEST_HEAD` bytes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from . import __version__
from .config import parse_host_port

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["BREAKER_STATES", "MAX_REQUEST_HEAD", "REQUEST_TIMEOUT", "Metrics", "serve_metrics"]

log = logging.getLogger(__name__)

#: ``pfcollector_breaker_state`` values.
BREAKER_STATES: Final = {"closed": 0, "half_open": 1, "open": 2}
#: Seconds a scraper has to send its request and read the answer.
REQUEST_TIMEOUT: Final = 10.0
#: Bytes of request line and headers read at most.
MAX_REQUEST_HEAD: Final = 8192

Snapshot = dict[str, Any]


class Metrics:
    """The daemon's metrics: a private registry holding one collector over a status snapshot.

    Args:
        snapshot: Returns everything the collector reads (see :func:`daemon_snapshot`).
    """

    def __init__(self, snapshot: Callable[[], Awaitable[Snapshot]]) -> None:
        self._snapshot_fn = snapshot
        self._collector = _StatusCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self._collector)
        self._lock = trio.Lock()  # one scrape at a time: they share the collector's snapshot
        self.address: tuple[str, int] | None = None

    async def render(self) -> bytes:
        """The text exposition of every metric, from a fresh snapshot."""
        async with self._lock:
            self._collector.snapshot = await self._snapshot_fn()
            try:
                return generate_latest(self.registry)
            finally:
                self._collector.snapshot = None

    async def serve(
        self, addr: str, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Answer ``GET /metrics`` on ``addr`` (``HOST:PORT``; port 0 picks one) until cancelled.

        ``task_status.started`` gets the bound ``(host, port)``.

        Error handling:
            ``OSError`` when the address cannot be bound.
        """
        host, port = parse_host_port(addr)
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()
        self.address = (str(bound[0]), int(bound[1]))
        log.info("metrics on http://%s:%d/metrics", host, self.address[1])
        task_status.started(self.address)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            async with stream:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    head = await _read_head(stream)
                    if head is None:
                        return
                    await stream.send_all(await self._answer(head))

    async def _answer(self, head: bytes) -> bytes:
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"only GET\n", extra=b"Allow: GET, HEAD\r\n")
        if path == b"/metrics":
            try:
                body = await self.render()
            except Exception:
                log.exception("metrics scrape failed")
                return _response(500, b"metrics scrape failed; see the daemon's log\n")
            return _response(200, body, CONTENT_TYPE_LATEST, head_only=method == b"HEAD")
        if path == b"/":
            return _response(200, b"pfcollector metrics: /metrics\n")
        return _response(404, b"not found; metrics are at /metrics\n")


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_REQUEST_HEAD:
            await stream.send_all(_response(431, b"request head too large\n"))
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return data or None
        data += chunk
    return data


def _response(
    status: int,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    extra: bytes = b"",
    head_only: bool = False,
) -> bytes:
    reasons = {
        200: "OK",
        404: "Not Found",
        405: "Method Not Allowed",
        431: "Too Large",
        500: "Error",
    }
    head = (
        (
            f"HTTP/1.0 {status} {reasons.get(status, '')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n"
        ).encode()
        + extra
        + b"\r\n"
    )
    return head if head_only else head + body


async def daemon_snapshot(daemon: Daemon) -> Snapshot:
    """What the collector reads: ``Daemon.status()`` plus the sender's latency buckets and the
    in-memory coalescing counts (neither of which is in ``status``)."""
    snap = await daemon.status()
    sender = daemon.sender
    snap["latency"] = sender.stats.latency() if sender is not None else None
    coalescer = getattr(daemon.server, "coalescer", None)
    absorbed = getattr(coalescer, "absorbed", None)
    snap["coalesced"] = dict(absorbed) if absorbed is not None else {}
    return snap


async def serve_metrics(
    daemon: Daemon,
    addr: str,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``daemon``'s metrics on ``addr`` until cancelled (for ``nursery.start``)."""
    metrics = Metrics(lambda: daemon_snapshot(daemon))
    await metrics.serve(addr, task_status=task_status)


class _StatusCollector(Collector):
    """Metric families from one status snapshot (set by :meth:`Metrics.render`)."""

    snapshot: Snapshot | None = None

    def describe(self) -> list[Metric]:
        """Nothing to check for name clashes: the registry is private."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Build every family from the snapshot (nothing when there is none)."""
        s = self.snapshot
        if s is None:
            return
        yield from _ingest_families(s)
        yield from _spool_families(s)
        yield from _delivery_families(s)
        yield _bug_family(s)
        info = GaugeMetricFamily(
            "pfcollector_build_info",
            "Always 1; the labels say what runs.",
            labels=["version", "mode"],
        )
        info.add_metric([__version__, str(s.get("mode", ""))], 1)
        yield info
        yield GaugeMetricFamily(
            "pfcollector_uptime_seconds",
            "Seconds since the daemon started.",
            value=float(s.get("uptime_s", 0.0)),
        )


def _per_kind(
    family: CounterMetricFamily | GaugeMetricFamily,
    rows: dict[str, Any],
    field: str,
) -> CounterMetricFamily | GaugeMetricFamily:
    for kind, row in sorted(rows.items()):
        value = row.get(field) if isinstance(row, dict) else row
        family.add_metric([kind], float(value or 0))
    return family


def _ingest_families(s: Snapshot) -> Iterator[Metric]:
    events = s.get("events", {})
    for field, doc in (
        ("received", "Events that reached the daemon (accepted or refused), by kind."),
        ("accepted", "Events stored in the spool or merged by coalescing, by kind."),
        ("rejected", "Events refused by validation (part of events_refused), by kind."),
    ):
        yield _per_kind(
            CounterMetricFamily(f"pfcollector_events_{field}", doc, labels=["kind"]), events, field
        )
    refused = CounterMetricFamily(
        "pfcollector_events_refused",
        "Events refused, by kind and code (validation codes, rate_limited, spool_full, "
        "disk_full, spool_write_failed, id_conflict, draining). A crash or corpus refused "
        "is a result the master will not get unless it is sent again.",
        labels=["kind", "code"],
    )
    for kind, row in sorted(events.items()):
        for code, n in sorted((row.get("refused") or {}).items()):
            refused.add_metric([kind, code], n)
    yield refused
    conns = s.get("connections", {})
    yield GaugeMetricFamily(
        "pfcollector_connections", "Client connections open now.", value=conns.get("current", 0)
    )
    yield CounterMetricFamily(
        "pfcollector_connections_accepted",
        "Client connections since start.",
        value=conns.get("total", 0),
    )
    errors = CounterMetricFamily(
        "pfcollector_protocol_errors", "Protocol errors sent to clients, by code.", labels=["code"]
    )
    for code, n in sorted(s.get("errors", {}).items()):
        errors.add_metric([code], n)
    yield errors
    outbox = s.get("outbox") or {}
    yield CounterMetricFamily(
        "pfcollector_outbox_imported",
        "Outbox files stored in the spool (events clients wrote while the daemon was away).",
        value=outbox.get("imported", 0),
    )
    yield CounterMetricFamily(
        "pfcollector_outbox_rejected",
        "Outbox files refused and moved to outbox/rejected/.",
        value=outbox.get("rejected", 0),
    )
    queue = s.get("queue", {})
    yield GaugeMetricFamily(
        "pfcollector_ingest_queue_depth",
        "Events accepted and waiting for the spool's group commit.",
        value=queue.get("depth", 0),
    )
    memory = GaugeMetricFamily(
        "pfcollector_memory_bytes",
        "Bytes held in memory (used) against the memory_budget setting (budget).",
        labels=["state"],
    )
    for state in ("used", "budget"):
        memory.add_metric([state], float(s.get("memory", {}).get(f"{state}_bytes", 0)))
    yield memory
    yield _per_kind(
        CounterMetricFamily(
            "pfcollector_events_coalesced",
            "Stats and coverage events merged into a later one in memory, by kind.",
            labels=["kind"],
        ),
        {k: {"n": v} for k, v in s.get("coalesced", {}).items()},
        "n",
    )


def _spool_families(s: Snapshot) -> Iterator[Metric]:
    spool = s.get("spool", {})
    kinds: dict[str, dict[str, Any]] = spool.get("kinds", {})
    yield _per_kind(
        GaugeMetricFamily(
            "pfcollector_spool_events", "Undelivered events in the spool, by kind.", labels=["kind"]
        ),
        kinds,
        "spooled",
    )
    yield _per_kind(
        GaugeMetricFamily(
            "pfcollector_spool_bytes",
            "Bytes of undelivered events in the spool, by kind.",
            labels=["kind"],
        ),
        kinds,
        "spooled_bytes",
    )
    yield GaugeMetricFamily(
        "pfcollector_spool_max_bytes",
        "The spool's size limit (spool_max_bytes).",
        value=spool.get("max_bytes", 0),
    )
    oldest = GaugeMetricFamily(
        "pfcollector_spool_oldest_event_age_seconds",
        "Age of the oldest undelivered event, by kind (absent when none is waiting).",
        labels=["kind"],
    )
    for kind, row in sorted(kinds.items()):
        if row.get("oldest_age_s") is not None:
            oldest.add_metric([kind], float(row["oldest_age_s"]))
    yield oldest
    yield _per_kind(
        GaugeMetricFamily(
            "pfcollector_dead_letters",
            "Events the master refused as poison, kept for inspection, by kind.",
            labels=["kind"],
        ),
        kinds,
        "dead_letters",
    )
    for field, name, doc in (
        ("dropped", "spool_dropped", "Old stats/coverage dropped to make room in a full spool."),
        ("refused", "spool_refused", "Crash/corpus events refused (spool_full) by a full spool."),
        ("deduped", "dedupe_hits", "Repeats of a crash or corpus entry counted, not resent."),
        ("delivered", "events_delivered", "Events the master has stored, by kind."),
    ):
        yield _per_kind(
            CounterMetricFamily(f"pfcollector_{name}", doc, labels=["kind"]), kinds, field
        )


def _bug_family(s: Snapshot) -> Metric:
    bugs = CounterMetricFamily(
        "pfcollector_bug_crashes",
        "Crashes of each of the most hit bugs per job (crash_dedupe = bug; pfcollector bugs).",
        labels=["job", "bug", "type"],
    )
    for row in s.get("policies", {}).get("crash", {}).get("top_bugs", []):
        bugs.add_metric([row["job_id"], row["bug"], row["type"]], row["hits"])
    return bugs


def _delivery_families(s: Snapshot) -> Iterator[Metric]:
    delivery = s.get("delivery") or {}
    sender = delivery.get("sender", {})
    breaker = delivery.get("breaker", {})
    pipeline = delivery.get("pipeline", {})
    counters: Sequence[tuple[str, str, Any]] = (
        ("batches_sent", "Batches handed to the sender.", sender.get("batches", 0)),
        (
            "batches_failed",
            "Batches not wholly delivered (some events requeued or refused).",
            sender.get("batches_failed", 0),
        ),
        ("requests", "HTTP requests made to the master.", sender.get("requests", 0)),
        ("retries", "HTTP requests retried after a transient failure.", sender.get("retries", 0)),
        ("breaker_opens", "Times the circuit breaker opened.", breaker.get("opens_total", 0)),
    )
    for name, doc, value in counters:
        yield CounterMetricFamily(f"pfcollector_{name}", doc, value=value or 0)
    state = GaugeMetricFamily(
        "pfcollector_breaker_state",
        "Circuit breaker to the master: 0 closed, 1 half-open, 2 open (absent in local mode).",
    )
    if breaker:
        state.add_metric([], BREAKER_STATES.get(str(breaker.get("state")), 0))
    yield state
    last = GaugeMetricFamily(
        "pfcollector_last_success_timestamp_seconds",
        "Unix time the master last accepted a request (absent before the first).",
    )
    wall = (sender.get("last_success") or {}).get("wall")
    if wall is not None:
        last.add_metric([], float(wall))
    yield last
    yield GaugeMetricFamily(
        "pfcollector_pipeline_held_events",
        "Events read from the spool and not yet settled.",
        value=pipeline.get("held", 0),
    )
    latency = s.get("latency")
    hist = HistogramMetricFamily(
        "pfcollector_request_duration_seconds",
        "Time from sending a request to the master to its answer (or failure).",
    )
    if latency is not None:
        hist.add_metric([], buckets=latency["buckets"], sum_value=latency["sum"])
    yield hist
