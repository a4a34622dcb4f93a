"""pfclient for trio: :func:`open_trio_client` yields a :class:`TrioClient`.

::

    async with open_trio_client(job_id="job-42", fuzzer="my-harness") as pf:
        await pf.stats(executions=1_000_000)
        await pf.crash("SIGSEGV", data, signal=11)  # returns once stored durably

The calls, the protocol bookkeeping and the error handling are those of
:class:`pfclient.aio.AsyncClient` (:class:`~pfclient.aio.BaseAsyncClient`); only the I/O is
trio's. Importing this module imports trio; ``import pfclient`` never does.

Resource handling:
    The reader task of each connection runs in the nursery of :func:`open_trio_client`;
    leaving the ``async with`` flushes (best effort), closes the connection and its reader.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

from ._errors import PfClientError
from ._status import check_peer
from .aio import BaseAsyncClient

__all__ = ["TrioClient", "open_trio_client"]

_READ_SIZE = 64 * 1024


class TrioClient(BaseAsyncClient):
    """A connection to the pfcollector daemon for one fuzzing job, for trio.

    Make it with :func:`open_trio_client` (it needs a nursery for its reader task).
    """

    def __init__(self, nursery: trio.Nursery, socket_path: str | os.PathLike[str] | None = None,
                 *, job_id: str, fuzzer: str, **options: Any) -> None:  # fmt: skip
        super().__init__(socket_path, job_id=job_id, fuzzer=fuzzer, **options)
        self._nursery = nursery
        self._conn_lock = trio.Lock()
        self._write_lock = trio.Lock()
        self._stream: trio.SocketStream | None = None
        self._reader_scope: trio.CancelScope | None = None
        self._changed = trio.Event()

    @property
    def _lock(self) -> trio.Lock:
        return self._conn_lock

    async def _open(self, path: str, deadline: float) -> None:
        with trio.move_on_after(max(0.0, deadline - time.monotonic())) as scope:
            stream = await trio.open_unix_socket(path)
        if scope.cancelled_caught:
            raise OSError("connecting timed out")
        try:
            check_peer(stream.socket, path, self._trusted)
        except PfClientError:
            await stream.aclose()
            raise
        self._stream = stream
        self._reader_scope = await self._nursery.start(self._read, stream)

    async def _read(
        self, stream: trio.SocketStream, task_status: trio.TaskStatus[trio.CancelScope]
    ) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
                while self._received(await stream.receive_some(_READ_SIZE)):
                    self._notify()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self._connected = False
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _write(self, frame: bytes) -> None:
        stream = self._stream
        if stream is None:
            raise OSError("not connected")
        try:
            async with self._write_lock:
                await stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise OSError(str(exc)) from exc

    async def _close_connection(self) -> None:
        scope, self._reader_scope = self._reader_scope, None
        stream, self._stream = self._stream, None
        if scope is not None:
            scope.cancel()
        if stream is not None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.aclose()

    def _changed_event(self) -> trio.Event:
        return self._changed

    async def _wait_changed(self, event: Any, seconds: float) -> None:
        with trio.move_on_after(seconds):
            await event.wait()

    def _spawn(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await fn()

        self._nursery.start_soon(run)
        return scope.cancel

    async def _sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    async def _bounded(self, awaitable: Awaitable[None], seconds: float) -> bool:
        # A send_all cut short leaves the stream unusable: the caller drops it.
        with trio.move_on_after(seconds) as scope:
            await awaitable
        return not scope.cancelled_caught


@contextlib.asynccontextmanager
async def open_trio_client(
    socket_path: str | os.PathLike[str] | None = None,
    *,
    job_id: str,
    fuzzer: str,
    timeout: float = 10.0,  # noqa: ASYNC109 (the connection's default wait, as Client)
    max_unacked: int = 4096,
    **options: Any,
) -> AsyncIterator[TrioClient]:
    """Connect (hello, welcome) and yield a :class:`TrioClient`; flush and close on exit.

    ``options``: as :class:`pfclient.Client` (``fail_open``, ``budget``, ``queue_bytes``,
    ``outbox``, ``trust_uids``).

    Raises:
        DaemonUnavailable, EventRejected: (``fail_open=False``) connecting failed (raised
            bare, not in a group).
    """
    failed: PfClientError | None = None
    async with trio.open_nursery() as nursery:
        client = TrioClient(nursery, socket_path, job_id=job_id, fuzzer=fuzzer,
                            timeout=timeout, max_unacked=max_unacked, **options)  # fmt: skip
        try:
            await client.connect()
        except PfClientError as exc:
            failed = exc
            await client.aclose()
        else:
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
    if failed is not None:
        raise failed
