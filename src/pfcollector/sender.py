"""Delivery to the master over HTTP: httpx for the requests, tenacity for retries, a breaker.

:class:`Sender` takes a :class:`Batch` of one kind and hands back a :class:`DeliveryResult`
saying, per event id, delivered, poisoned (set aside with the master's error) or requeue (send
again later: nothing is ever dropped here). What goes into a request and what an answer means
is :mod:`pfcollector.master`'s business; this module does the I/O around it.

Every request goes through three steps:

1. the breaker gate: while the breaker is open the call waits (in trio time) for the probe
   moment; when half-open only the single probe goes, others wait for its answer;
2. the POST, with the headers the master wants;
3. tenacity: only :class:`TransientError` (no answer, 5xx, 408, 429) is retried, with full
   jitter exponential waits, never shorter than a ``Retry-After`` the master gave.

Logging is by state change, not by attempt: the first failure is a WARNING, later failures are
DEBUG until the master answers again (the Go bot wrote 111 MB of logs in 45 s of outage).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import tenacity
import trio

from .breaker import BreakerState, CircuitBreaker
from .events import BATCH_KINDS, STATUS_KINDS, Event, Kind
from .master import (
    BATCH_PATH,
    Delivered,
    EncodeError,
    Outcome,
    Partial,
    Poison,
    Transient,
    classify,
    encode_batches,
    item_request,
)
from .redact import redact
from .transport import (
    COMPRESSIONS,
    DEFAULT_RETRY,
    RetryPolicy,
    TransientError,
    compress_body,
    describe,
    request_headers,
    retry_controller,
    user_agent,
)

# RetryPolicy, TransientError, compress_body and user_agent are re-exported: the sender's
# callers configure it with them.
__all__ = [
    "COMPRESSIONS",
    "REQUEST_BUCKETS",
    "Batch",
    "DeliveryResult",
    "RetryPolicy",
    "Sender",
    "SenderStats",
    "TransientError",
    "compress_body",
    "user_agent",
]

log = logging.getLogger(__name__)

#: Upper bounds (seconds) of the request-latency buckets kept in :class:`SenderStats`.
REQUEST_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class Batch:
    """Events of one kind to deliver (normally of one job; mixed jobs are split by job)."""

    kind: Kind
    job_id: str
    events: Sequence[Event]


@dataclass
class DeliveryResult:
    """What became of each event of a :class:`Batch`.

    Attributes:
        delivered: Ids the master stored.
        poisoned: ``(id, status, error)`` for events the master will never take; ``status``
            is ``None`` when the event was refused here (it cannot be encoded).
        requeue: Ids to send again later (the master is down, or failed to store them for a
            passing reason).
        reason: Why there is something to requeue.
        retry_after: The master's ``Retry-After`` hint in seconds, if it gave one.
    """

    delivered: list[str] = field(default_factory=list)
    poisoned: list[tuple[str, int | None, str]] = field(default_factory=list)
    requeue: list[str] = field(default_factory=list)
    reason: str | None = None
    retry_after: float | None = None


@dataclass
class SenderStats:
    """Counters of a :class:`Sender`; per-kind counts are keyed by the kind's value."""

    requests: int = 0
    retries: int = 0
    batches: int = 0
    batches_failed: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(REQUEST_BUCKETS) + 1))
    latency_sum: float = 0.0
    delivered: Counter[str] = field(default_factory=Counter)
    poisoned: Counter[str] = field(default_factory=Counter)
    requeued: Counter[str] = field(default_factory=Counter)
    last_success_wall: float | None = None
    last_success_trio: float | None = None
    last_error: str | None = None
    last_error_wall: float | None = None
    last_error_trio: float | None = None

    def observe_request(self, seconds: float) -> None:
        """Count one request's duration in its latency bucket."""
        i = next((i for i, b in enumerate(REQUEST_BUCKETS) if seconds <= b), len(REQUEST_BUCKETS))
        self.latency_counts[i] += 1
        self.latency_sum += seconds

    def latency(self) -> dict[str, Any]:
        """Latency as Prometheus wants it: cumulative ``(le, count)`` pairs and the sum."""
        bounds = [*(f"{b:g}" for b in REQUEST_BUCKETS), "+Inf"]
        cumulative, total = [], 0
        for bound, n in zip(bounds, self.latency_counts, strict=True):
            total += n
            cumulative.append((bound, total))
        return {"buckets": cumulative, "sum": self.latency_sum, "count": total}

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "requests": self.requests,
            "retries": self.retries,
            "batches": self.batches,
            "batches_failed": self.batches_failed,
            "delivered": dict(self.delivered),
            "poisoned": dict(self.poisoned),
            "requeued": dict(self.requeued),
            "last_success": {"wall": self.last_success_wall, "trio": self.last_success_trio},
            "last_error": {
                "text": self.last_error,
                "wall": self.last_error_wall,
                "trio": self.last_error_trio,
            },
        }


@dataclass
class _Run:
    """One :meth:`Sender.deliver` call: its result, and whether it has given up."""

    result: DeliveryResult
    gave_up: bool = False

    def give_up(self, outcome: Transient, ids: Sequence[str]) -> None:
        self.gave_up = True
        self.requeue(ids, outcome.reason, outcome.retry_after)

    def requeue(self, ids: Sequence[str], reason: str | None, retry_after: float | None) -> None:
        self.result.requeue.extend(ids)
        if self.result.reason is None:
            self.result.reason = reason
        if retry_after is not None:
            self.result.retry_after = max(self.result.retry_after or 0.0, retry_after)


class Sender:
    """Delivers batches to one master through one long-lived :class:`httpx.AsyncClient`.

    Resource handling:
        The client (with ``base_url`` and timeouts set) belongs to the caller, who closes it.
        The breaker is shared by every request of this sender; give several senders of the
        same master the same breaker.

    Error handling:
        :meth:`deliver` does not raise for anything the master or the network does: every
        event ends delivered, poisoned or requeued. Cancellation propagates (a probe that
        is cancelled hands the probe back to the breaker).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        bot_id: str,
        mode: Literal["batch", "item"] = "batch",
        breaker: CircuitBreaker,
        retry: RetryPolicy = DEFAULT_RETRY,
        token: str | None = None,
        item_concurrency: int = 8,
        compression: Literal["none", "gzip", "zstd"] = "none",
        compression_threshold: int = 1024,
    ) -> None:
        """Build a sender.

        Args:
            client: The HTTP client; its ``base_url`` is the master's.
            bot_id: The bot id put in every result.
            mode: ``"batch"`` uses the batch endpoint for crash, coverage and corpus;
                ``"item"`` posts every event on its own.
            breaker: The circuit breaker to gate requests with.
            retry: The retry policy of each request.
            token: A bearer token for a master behind an authenticating proxy.
            item_concurrency: Requests in flight at most when posting events one by one.
            compression: ``Content-Encoding`` of bodies of ``compression_threshold`` bytes or
                more (``none``, ``gzip``, ``zstd``). Size limits apply to the body before
                compression, as the master decodes it.
            compression_threshold: Bodies under this many bytes go uncompressed.

        Raises:
            ValueError: An argument is out of range.
        """
        if not bot_id:
            raise ValueError("bot_id must not be empty")
        if mode not in ("batch", "item"):
            raise ValueError(f"mode must be 'batch' or 'item', not {mode!r}")
        if item_concurrency < 1:
            raise ValueError("item_concurrency must be at least 1")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}")
        self.client = client
        self.bot_id = bot_id
        self.mode = mode
        self.breaker = breaker
        self.retry = retry
        self.item_concurrency = item_concurrency
        self.compression = compression
        self.compression_threshold = compression_threshold
        self.stats = SenderStats()
        self._headers = request_headers(bot_id, token)
        self._breaker_changed = trio.Event()
        self._failed_attempts = 0
        # The master's last Retry-After, as a trio time: no request of this sender goes
        # before it, whichever batch or caller asked for the wait.
        self._not_before = -math.inf
        if breaker.on_transition is None:
            breaker.on_transition = self._log_transition

    # -- public ----------------------------------------------------------------------------

    async def deliver(self, batch: Batch) -> DeliveryResult:
        """Send ``batch`` and say what became of each of its events.

        Crash, coverage and corpus go in batch bodies (batch mode) or one by one (item mode,
        oversize events); stats and lifecycle events always one by one to ``/results/status``.
        Once one request has used up its attempts the master is taken as down for this call:
        what is left is requeued without being tried.

        Returns:
            Every event id in exactly one of ``delivered``, ``poisoned`` and ``requeue``.

        Raises:
            ValueError: In batch mode, an event is not of ``batch.kind`` (a caller bug).
        """
        run = _Run(DeliveryResult())
        events = list(batch.events)
        if events:
            if self.mode == "item" or batch.kind in STATUS_KINDS or batch.kind not in BATCH_KINDS:
                await self._send_items(events, run)
            else:
                await self._send_batches(batch.kind, events, run)
        result = run.result
        # What the master said is kept with dead letters and shown: never a credential in it.
        result.poisoned = [(i, status, redact(text)) for i, status, text in result.poisoned]
        if result.reason is not None:
            result.reason = redact(result.reason)
        kind = batch.kind.value
        if result.poisoned:  # one line per delivery, however many items were refused
            _, status, text = result.poisoned[0]
            log.warning(
                "master refused %d of %d %s event(s) (first: HTTP %s: %s)",
                len(result.poisoned),
                len(events),
                kind,
                status if status is not None else "-, not sent",
                text,
            )
        self.stats.batches += 1
        if result.requeue or result.poisoned:
            self.stats.batches_failed += 1
        self.stats.delivered[kind] += len(result.delivered)
        self.stats.poisoned[kind] += len(result.poisoned)
        self.stats.requeued[kind] += len(result.requeue)
        return result

    # -- the two shapes of delivery --------------------------------------------------------

    async def _send_batches(self, kind: Kind, events: list[Event], run: _Run) -> None:
        one_by_one: list[Event] = []
        by_job = itertools.groupby(sorted(events, key=lambda e: e.job_id), key=lambda e: e.job_id)
        for job_id, job_events in by_job:
            for encoded in encode_batches(kind, job_id, self.bot_id, job_events):
                if encoded.per_item:
                    one_by_one.extend(encoded.events)
                    continue
                ids = [e.id for e in encoded.events]
                if run.gave_up:
                    run.requeue(ids, None, None)
                    continue
                outcome = await self._send(kind, BATCH_PATH, encoded.body, encoded.events, run)
                if isinstance(outcome, Poison) and len(ids) > 1:
                    # The strict batch endpoint refuses a whole batch for one bad item; the
                    # per-item endpoints are lenient, and pin the refusal on the right item.
                    log.warning(
                        "master refused a batch of %d %s (HTTP %d: %s); sending them one by one",
                        len(ids),
                        kind.value,
                        outcome.status,
                        outcome.error_text,
                    )
                    one_by_one.extend(encoded.events)
                    continue
                self._apply(outcome, ids, run)
        if one_by_one:
            await self._send_items(one_by_one, run)

    async def _send_items(self, events: list[Event], run: _Run) -> None:
        pending = iter(events)

        async def worker() -> None:
            for event in pending:  # a shared iterator: each event goes to one worker
                await self._send_item(event, run)

        async with trio.open_nursery() as nursery:
            for _ in range(min(self.item_concurrency, len(events))):
                nursery.start_soon(worker)

    async def _send_item(self, event: Event, run: _Run) -> None:
        if run.gave_up:
            run.requeue([event.id], None, None)
            return
        try:
            path, body = item_request(event, self.bot_id)
        except EncodeError as exc:
            log.debug("event %s (%s) cannot be sent: %s", event.id, event.kind.value, exc)
            run.result.poisoned.append((event.id, None, str(exc)))
            return
        outcome = await self._send(event.kind, path, body, [event], run)
        self._apply(outcome, [event.id], run)

    def _apply(self, outcome: Outcome, ids: list[str], run: _Run) -> None:
        result = run.result
        if isinstance(outcome, Delivered):
            result.delivered.extend(ids)
        elif isinstance(outcome, Partial):
            result.delivered.extend(outcome.delivered)
            result.poisoned.extend((i, 200, text) for i, text in outcome.failed.items())
            if outcome.retryable:
                first = next(iter(outcome.retryable.values()))
                run.requeue(list(outcome.retryable), f"master failed to store: {first}", None)
        elif isinstance(outcome, Poison):
            result.poisoned.extend((i, outcome.status, outcome.error_text) for i in ids)
        else:
            run.give_up(outcome, ids)

    # -- one request -----------------------------------------------------------------------

    async def _send(
        self, kind: Kind, path: str, body: bytes, events: Sequence[Event], run: _Run
    ) -> Outcome:
        """POST ``body`` with retries; a :class:`Transient` only once attempts are used up."""
        retrying = retry_controller(
            self.retry, give_up=lambda: run.gave_up, on_retry=self._on_retry
        )
        content, encoding = compress_body(body, self.compression, self.compression_threshold)
        headers = dict(self._headers)
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        outcome: Outcome | None = None
        try:
            async for attempt in retrying:
                with attempt:
                    outcome = await self._attempt(kind, path, content, headers, events, run)
        except TransientError as exc:
            return Transient(exc.reason, exc.retry_after)
        assert outcome is not None  # tenacity ends the loop only after a successful attempt
        return outcome

    async def _attempt(
        self,
        kind: Kind,
        path: str,
        body: bytes,
        headers: dict[str, str],
        events: Sequence[Event],
        run: _Run,
    ) -> Outcome:
        await self._gate(run)
        probe = self.breaker.state(trio.current_time()) is BreakerState.HALF_OPEN
        settled = False
        self.stats.requests += 1
        try:
            started = time.perf_counter()
            try:
                response = await self.client.post(path, content=body, headers=headers)
            except httpx.RequestError as exc:  # transport errors, and redirects/decoding
                settled = True
                reason = describe(exc)
                self._record_failure(reason)
                raise TransientError(reason) from exc
            finally:
                self.stats.observe_request(time.perf_counter() - started)
            outcome = classify(
                response.status_code,
                response.headers,
                response.content,
                kind,
                events,
                wall_now=time.time(),
            )
            settled = True
            if isinstance(outcome, Transient):
                self._record_failure(outcome.reason, outcome.retry_after)
                raise TransientError(outcome.reason, outcome.retry_after)
            if isinstance(outcome, Partial) and outcome.retryable:
                # The master answered but could not store everything (a locked database):
                # that is a failure for the breaker, or a loop of such answers is never slowed.
                first = next(iter(outcome.retryable.values()))
                self._record_failure(f"master failed to store {len(outcome.retryable)} "
                                     f"item(s): {first}")  # fmt: skip
            else:
                self._record_success()
            return outcome
        finally:
            if probe and not settled:
                self.breaker.abandon_probe(trio.current_time())
                self._notify()

    async def _gate(self, run: _Run) -> None:
        """Wait until the breaker and the master's ``Retry-After`` let this request through.

        A ``Retry-After`` wait longer than the retry cap is not slept through here: the
        request fails at once with the time left as its hint, so its events are requeued to
        wait in the pipeline instead of holding a delivery worker.
        """
        while True:
            if run.gave_up:
                raise TransientError(run.result.reason or "delivery given up")
            wait = self._not_before - trio.current_time()
            if wait > self.retry.cap:
                raise TransientError(f"the master asked to wait {wait:.0f}s (Retry-After)", wait)
            if wait > 0:
                await trio.sleep(wait)
                continue
            if self.breaker.allow(trio.current_time()):
                return
            retry_at = self.breaker.retry_at()
            changed = self._breaker_changed
            with trio.move_on_at(math.inf if retry_at is None else retry_at):
                await changed.wait()

    # -- bookkeeping -----------------------------------------------------------------------

    def _notify(self) -> None:
        """Wake everyone waiting at the gate to look at the breaker again."""
        self._breaker_changed.set()
        self._breaker_changed = trio.Event()

    def _record_failure(self, reason: str, retry_after: float | None = None) -> None:
        reason = redact(reason)  # shown by status, logged: never a credential the master echoed
        now = trio.current_time()
        if retry_after is not None:
            self._not_before = max(self._not_before, now + retry_after)
        self.stats.last_error = reason
        self.stats.last_error_wall = time.time()
        self.stats.last_error_trio = now
        self._failed_attempts += 1
        if self._failed_attempts == 1:
            log.warning("master request failed: %s (retrying; repeats logged at DEBUG)", reason)
        else:
            log.debug("master request failed (%d in a row): %s", self._failed_attempts, reason)
        self.breaker.record_failure(now)
        self._notify()

    def _record_success(self) -> None:
        now = trio.current_time()
        self.stats.last_success_wall = time.time()
        self.stats.last_success_trio = now
        if self._failed_attempts:
            log.info("master answering again after %d failed attempts", self._failed_attempts)
            self._failed_attempts = 0
        self.breaker.record_success(now)
        self._notify()

    def _on_retry(self, retry_state: tenacity.RetryCallState) -> None:
        self.stats.retries += 1

    def _log_transition(self, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.OPEN:
            timeout = self.breaker.snapshot(trio.current_time())["current_timeout"]
            level = logging.WARNING if old is BreakerState.CLOSED else logging.INFO
            log.log(level, "circuit breaker open: next probe in %.1f s", timeout)
        elif new is BreakerState.CLOSED:
            log.info("circuit breaker closed: the master answers")
        else:
            log.debug("circuit breaker half-open: probing the master")
