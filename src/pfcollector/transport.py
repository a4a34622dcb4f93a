"""The HTTP plumbing shared by delivery (:mod:`~pfcollector.sender`) and the bot endpoints
(:mod:`~pfcollector.bots`): headers, the one retryable error, the retry policy (tenacity, full
jitter, ``Retry-After`` honoured, trio's clock), and optional body compression.
"""

from __future__ import annotations

import gzip
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass

import tenacity
import trio
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from .credentials import check_token
from .redact import redact

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_RETRY",
    "RetryPolicy",
    "TransientError",
    "compress_body",
    "describe",
    "request_headers",
    "retry_controller",
    "user_agent",
]


def _version() -> str:
    try:
        return importlib.metadata.version("pfcollector")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


_VERSION = _version()

#: ``Content-Encoding`` choices; ``none`` sends bodies as they are (the PandaFuzz master
#: answers 400 to any other encoding, so compression is for masters behind a decoding proxy).
COMPRESSIONS = ("none", "gzip", "zstd")


def compress_body(body: bytes, method: str, threshold: int) -> tuple[bytes, str | None]:
    """``(content, Content-Encoding or None)``: ``body`` compressed when it is worth it.

    Bodies under ``threshold`` bytes go as they are (small bodies do not gain), and so does a
    body that compression would not shrink. ``zstd`` needs the ``zstandard`` package (the
    configuration checks that at start).
    """
    if method == "none" or len(body) < threshold:
        return body, None
    if method == "gzip":
        packed = gzip.compress(body, compresslevel=6, mtime=0)
    elif method == "zstd":
        import zstandard  # type: ignore[import-not-found,unused-ignore]  # optional

        packed = zstandard.ZstdCompressor(level=3).compress(body)
    else:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, not {method!r}")
    return (packed, method) if len(packed) < len(body) else (body, None)


def user_agent(bot_id: str | None) -> str:
    """The ``User-Agent`` pfcollector sends: ``pfcollector/<version> (bot <bot_id>)``."""
    return f"pfcollector/{_VERSION}" + (f" (bot {bot_id})" if bot_id else "")


def request_headers(bot_id: str | None, token: str | None) -> dict[str, str]:
    """The headers of every request to the master.

    Raises:
        ValueError: ``token`` cannot be a header (not an RFC 6750 token; the message does not
            show it). Checked here, once, so that no request fails on it later.
    """
    headers = {"Content-Type": "application/json", "User-Agent": user_agent(bot_id)}
    if token:
        try:
            headers["Authorization"] = f"Bearer {check_token(token)}"
        except ValueError as exc:
            raise ValueError(f"token: {exc}") from None
    return headers


class TransientError(Exception):
    """A request failed in a way worth retrying: no answer, 5xx, 408 or 429.

    The only exception tenacity retries. Raised out of :func:`register` once attempts are
    exhausted; inside :class:`Sender` it becomes ``requeue``.

    Attributes:
        reason: Short text for logs and status.
        retry_after: Seconds the master asked to wait, if it did.
    """

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """How one request is retried.

    Attributes:
        attempts: Attempts in all (the first included).
        base: The first full-jitter window in seconds; it doubles each retry.
        cap: Largest window. A ``Retry-After`` beyond it is not slept through: the request
            gives up at once and its ids are requeued with that hint.
    """

    attempts: int = 4
    base: float = 0.5
    cap: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base < 0 or self.cap < self.base:
            raise ValueError("need attempts >= 1 and 0 <= base <= cap")


#: The policy when none is given.
DEFAULT_RETRY = RetryPolicy()


class _WaitJitterOrRetryAfter(wait_base):
    """Full-jitter exponential wait, but never less than the master's ``Retry-After``."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._jitter = tenacity.wait_random_exponential(multiplier=policy.base, max=policy.cap)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        wait = self._jitter(retry_state)
        hint = _retry_after_of(retry_state)
        return wait if hint is None else max(wait, hint)


class _StopWhen(stop_base):
    """Stop retrying when ``predicate`` says so (a hint beyond the cap, a delivery given up)."""

    def __init__(self, predicate: Callable[[tenacity.RetryCallState], bool]) -> None:
        self._predicate = predicate

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self._predicate(retry_state)


def _retry_after_of(retry_state: tenacity.RetryCallState) -> float | None:
    outcome = retry_state.outcome
    exc = outcome.exception() if outcome is not None and outcome.failed else None
    return exc.retry_after if isinstance(exc, TransientError) else None


def retry_controller(
    policy: RetryPolicy,
    *,
    give_up: Callable[[], bool] | None = None,
    on_retry: Callable[[tenacity.RetryCallState], None] | None = None,
) -> tenacity.AsyncRetrying:
    """A fresh retry controller (they hold per-call state: one per request)."""
    stop: stop_base = tenacity.stop_after_attempt(policy.attempts) | _StopWhen(
        lambda rs: (_retry_after_of(rs) or 0.0) > policy.cap
    )
    if give_up is not None:
        stop = stop | _StopWhen(lambda rs: give_up())
    return tenacity.AsyncRetrying(
        stop=stop,
        wait=_WaitJitterOrRetryAfter(policy),
        # Only our own, positively named error: never anything that could be trio.Cancelled.
        retry=tenacity.retry_if_exception_type(TransientError),
        sleep=trio.sleep,
        before_sleep=on_retry,
        reraise=True,
    )


def describe(exc: BaseException) -> str:
    """``Type: message`` of an HTTP library's error, with any credential in it masked."""
    text = redact(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
