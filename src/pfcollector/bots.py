"""The master's bot endpoints: registration (for a master-made bot id) and heartbeats."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import NoReturn

import httpx
import trio

from .botapi import REGISTER_PATH, heartbeat_body, heartbeat_path, parse_register, register_body
from .master import parse_retry_after, transient_status
from .transport import (
    DEFAULT_RETRY,
    RetryPolicy,
    TransientError,
    describe,
    request_headers,
    retry_controller,
)

__all__ = ["StatusFn", "heartbeat_loop", "register"]

log = logging.getLogger(__name__)

#: ``status_fn`` of :func:`heartbeat_loop`: ``(status, current_job, last_activity_ns)``, or
#: just the status (then no current job, and the last activity is now).
StatusFn = Callable[[], str | tuple[str, str | None, int]]


async def register(
    client: httpx.AsyncClient,
    *,
    hostname: str,
    name: str,
    capabilities: Sequence[str],
    api_endpoint: str,
    token: str | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> str:
    """Register with the master and return the ``bot_id`` it made.

    Error handling:
        No answer, 5xx, 408 and 429 are retried per ``retry``; then :class:`TransientError`.
        A refusal, or an answer without a ``bot_id``, raises
        :class:`pfcollector.botapi.RegisterError` at once. A bad argument is ``ValueError``.
    """
    body = register_body(hostname, name, capabilities, api_endpoint)
    headers = request_headers(None, token)
    async for attempt in retry_controller(retry):
        with attempt:
            try:
                response = await client.post(REGISTER_PATH, content=body, headers=headers)
            except httpx.RequestError as exc:
                raise TransientError(describe(exc)) from exc
            status = response.status_code
            if transient_status(status):
                hint = parse_retry_after(
                    response.headers.get("Retry-After"),
                    response.headers.get("Date"),
                    wall_now=time.time(),
                )
                raise TransientError(f"HTTP {status}", hint)
            return parse_register(status, response.content)  # the caller logs it, once
    raise AssertionError("unreachable: tenacity either returns or raises")


async def heartbeat_loop(
    client: httpx.AsyncClient,
    bot_id: str,
    *,
    interval: float,
    status_fn: StatusFn,
    token: str | None = None,
) -> NoReturn:
    """Post a heartbeat every ``interval`` seconds (trio time), forever.

    Args:
        client: The HTTP client of the master.
        bot_id: The bot whose heartbeat this is.
        interval: Seconds between heartbeats.
        status_fn: Called before each heartbeat for ``(status, current_job,
            last_activity_ns)``, or only the status (see :data:`StatusFn`).
        token: A bearer token for a master behind an authenticating proxy.

    Error handling:
        Nothing stops the loop but cancellation. A failed heartbeat is not retried (the next
        one is the retry); the first failure is a WARNING, repeats are DEBUG, recovery INFO.
    """
    if interval <= 0:
        raise ValueError("interval must be positive")
    path = heartbeat_path(bot_id)
    headers = request_headers(bot_id, token)
    failures = 0
    next_at = trio.current_time()
    while True:
        problem: str | None = None
        try:
            state = status_fn()
            if isinstance(state, str):
                state = (state, None, time.time_ns())
            body = heartbeat_body(*state)
            response = await client.post(path, content=body, headers=headers)
            if not 200 <= response.status_code < 300:
                problem = f"HTTP {response.status_code}"
                if response.status_code == 404:
                    problem += " (the master does not know this bot: was it reset?)"
        except httpx.RequestError as exc:
            problem = describe(exc)
        except Exception as exc:  # a bug in status_fn must not end the heartbeats
            problem = f"cannot build the heartbeat: {describe(exc)}"
        if problem is not None:
            failures += 1
            level = logging.WARNING if failures == 1 else logging.DEBUG
            log.log(level, "heartbeat failed (%d in a row): %s", failures, problem)
        elif failures:
            log.info("heartbeat accepted again after %d failures", failures)
            failures = 0
        next_at = max(next_at + interval, trio.current_time())  # no burst to catch up
        await trio.sleep_until(next_at)
