"""Blocking calls in trio's worker threads whose failures do not keep their arguments alive.

An exception raised in ``trio.to_thread.run_sync`` comes back with a traceback through the
worker's frames, whose locals are the call's arguments (a commit group's events and inputs),
and trio keeps the exception's outcome in a local of its own frame, which that traceback also
holds: a reference cycle. The arguments then live until the garbage collector next runs,
after their memory was already given back to the budget, so producers fill it a second time:
a refused group of 200 MiB of crash inputs, stalled on a locked spool, raised the daemon's RSS
by up to 80 MiB past ``memory_budget`` (``benchmarks/memory_pressure.py``, full).
:func:`run_sync` catches the exception in the worker, drops its traceback there, and raises it
again in the trio thread, where the caller handles it as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

__all__ = ["run_sync"]

T = TypeVar("T")


def _capture(fn: Callable[..., T], args: tuple[Any, ...]) -> T | BaseException:
    try:
        return fn(*args)
    except Exception as exc:  # returned, not raised: nothing crosses the thread with frames
        exc.__context__ = None
        return exc.with_traceback(None)


async def run_sync(fn: Callable[..., T], *args: Any) -> T:
    """``trio.to_thread.run_sync(fn, *args)``; an ``Exception`` is raised without the
    worker's traceback (``BaseException`` such as ``KeyboardInterrupt`` is not caught)."""
    result = await trio.to_thread.run_sync(_capture, fn, args)
    del args
    if isinstance(result, Exception):
        try:
            raise result
        finally:
            del result
    return result  # type: ignore[return-value]
