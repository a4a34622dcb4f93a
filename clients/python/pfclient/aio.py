"""pfclient for asyncio: :class:`AsyncClient`, the same calls as :class:`pfclient.Client`, awaited.

::

    async with AsyncClient(job_id="job-42", fuzzer="my-harness") as pf:
        await pf.stats(executions=1_000_000)
        await pf.crash("SIGSEGV", data, signal=11)  # returns once stored durably

The protocol bookkeeping (seqs, the unacknowledged queue, acks, rejections, replies) is the
sans-I/O :class:`Session` of :mod:`pfclient._session`, shared with :mod:`pfclient.trio_client`
and the blocking client; the I/O-independent
call logic is :class:`BaseAsyncClient`; this module adds asyncio streams. Frames are encoded
and decoded by :mod:`pfclient._wire`, as in the blocking client.

Resource handling:
    One Unix stream connection and one reader task (created on connect, cancelled and awaited
    on close or reconnect). Events not yet acknowledged are kept (at most ``max_unacked``;
    beyond that a call waits: flow control) and resent with the same ids and fresh seqs after
    a reconnect. Every call may reconnect once.

Error handling:
    As the blocking client: :class:`DaemonUnavailable` when the daemon cannot be reached (the
    events stay queued for the next call), :class:`FlushTimeout` when a wait runs out,
    :class:`EventRejected` for a refused event.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Self

from ._aio_open import FailOpenMixin
from ._errors import DaemonUnavailable, EventRejected, FlushTimeout, PfClientError
from ._fallback import DEFAULT_BUDGET, DEFAULT_QUEUE_BYTES, Fallback, FallbackCounters
from ._session import Session, check_lifecycle
from ._status import check_peer, trusted_uids
from ._wire import WireError, default_socket_path

__all__ = ["AsyncClient", "BaseAsyncClient", "Session"]

_READ_SIZE = 64 * 1024


class _Call:
    """One public call: it may reconnect once."""

    __slots__ = ("deadline", "reconnected")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.reconnected = False


class BaseAsyncClient(FailOpenMixin, FallbackCounters):
    """The event-loop-independent part of :class:`AsyncClient` and ``TrioClient``.

    Subclasses provide the I/O: ``_open`` (connect, check the peer, start the reader),
    ``_write``, ``_close_connection``, ``_changed_event``/``_wait_changed``, ``_lock``,
    ``_spawn``, ``_sleep`` and ``_bounded``. Fail-open (the default) is
    :class:`pfclient._aio_open.FailOpenMixin`; the arguments are :class:`pfclient.Client`'s.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *, job_id: str,
                 fuzzer: str, timeout: float = 10.0, max_unacked: int = 4096,
                 fail_open: bool = True, budget: float = DEFAULT_BUDGET,
                 queue_bytes: int = DEFAULT_QUEUE_BYTES,
                 outbox: str | os.PathLike[str] | None = None,
                 trust_uids: Iterable[int] | None = None) -> None:  # fmt: skip
        if max_unacked < 1:
            raise ValueError(f"max_unacked must be at least 1, got {max_unacked}")
        self.socket_path = default_socket_path() if socket_path is None else os.fspath(socket_path)
        self.job_id = job_id
        self.fuzzer = fuzzer
        self.timeout = timeout
        self.max_unacked = max_unacked
        self.fail_open = fail_open
        self.budget = budget
        self._trusted = trusted_uids(trust_uids)
        self._session = Session(job_id, fuzzer)
        self._fallback = Fallback(
            self._session, self.socket_path, queue_bytes=queue_bytes, max_unacked=max_unacked,
            outbox=os.fspath(outbox) if outbox is not None else None,
        )
        self._connected = False  # a connection whose reader has not seen EOF or an error
        self._closed = False
        self._init_open()

    @property
    def rejected(self) -> list[EventRejected]:
        """Every rejection seen (newest last, at most :data:`pfclient.REJECTED_KEEP`)."""
        return self._session.rejected

    @property
    def connected(self) -> bool:
        """Whether the daemon answered this connection's hello (and it is still open)."""
        return self._welcomed

    # -- public API (as pfclient.Client, plus ``id=`` for a caller-made stable id) -----------

    async def connect(self) -> Self:
        """Connect and say hello (entering ``async with`` does this).

        Fail-open: starts the background connector and waits for it at most ``budget``.
        """
        call = self._begin()
        if not self.fail_open:
            await self._reconnect(call)
            return self
        self._start_connector()
        deadline = time.monotonic() + self.budget
        while not self._welcomed and self._connector is not None:
            changed = self._changed_event()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._welcomed:
                break
            await self._wait_changed(changed, remaining)
        return self

    async def crash(self, type: str, input: bytes, *, signal: int = 0, exit_code: int = 0,
                    output: str = "", stack_trace: str = "", job_id: str | None = None,
                    ts: float | None = None, id: str | None = None) -> str:  # fmt: skip
        """Report a crash and wait until the daemon has stored it durably; its event id."""
        fields = {"type": type, "input": input, "signal": signal, "exit_code": exit_code,
                  "output": output, "stack_trace": stack_trace}  # fmt: skip
        return await self._submit("crash", fields, job_id, ts, id, wait=True)

    async def coverage(self, edges: int, *, new_edges: int = 0, exec_count: int = 0,
                       job_id: str | None = None, ts: float | None = None,
                       id: str | None = None) -> str:  # fmt: skip
        """Report coverage; returns the event id without waiting for the ack."""
        fields = {"edges": edges, "new_edges": new_edges, "exec_count": exec_count}
        return await self._submit("coverage", fields, job_id, ts, id)

    async def corpus(self, files: list[str], *, total_size: int = 0,
                     contents: list[bytes] | None = None, job_id: str | None = None,
                     ts: float | None = None, id: str | None = None) -> str:  # fmt: skip
        """Report corpus files (optionally with their bytes, ``contents``, for the daemon's
        dedupe by content); returns the event id without waiting for the ack."""
        fields: dict[str, Any] = {"files": list(files), "total_size": total_size}
        if contents is not None:
            fields["contents"] = list(contents)
        return await self._submit("corpus", fields, job_id, ts, id)

    async def stats(self, *, job_id: str | None = None, ts: float | None = None,
                    id: str | None = None, **fields: float) -> str:  # fmt: skip
        """Report fuzzer statistics (``executions=``, ...); no wait."""
        return await self._submit("stats", dict(fields), job_id, ts, id)

    async def lifecycle(self, kind: str, message: str = "", *, job_id: str | None = None,
                        ts: float | None = None, id: str | None = None) -> str:  # fmt: skip
        """Report ``started``, ``stopped``, ``error`` or ``timeout``; no wait."""
        check_lifecycle(kind)
        return await self._submit(kind, {"message": message}, job_id, ts, id)

    async def flush(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 (as Client)
        """Wait until every event sent so far is acknowledged (as :meth:`pfclient.Client.flush`)."""
        call = self._begin(timeout)
        s = self._session
        if self.fail_open:
            await self._flush_open(self.timeout if timeout is None else timeout)
        elif not await self._wait_until(lambda: not s.unacked, call):
            raise FlushTimeout(f"{len(s.unacked)} events not acknowledged by the daemon at "
                               f"{self.socket_path} in time")  # fmt: skip
        first = s.take_unreported()
        if first is not None:
            raise first

    async def status(self, timeout: float | None = None) -> dict[str, Any]:  # noqa: ASYNC109
        """The daemon's status (control op ``status``)."""
        result = await self.control("status", timeout=timeout)
        return result if isinstance(result, dict) else {"result": result}

    async def control(self, op: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:  # noqa: ASYNC109  # fmt: skip
        """Send control request ``op`` and return the reply's ``result``."""
        call = self._begin(timeout)
        req, frame = self._session.control(op, args)
        replies = self._session.replies
        while req not in replies:
            if not self._connected:
                await self._reconnect(call)
            await self._write_or_drop(frame)
            if not await self._wait_until(lambda: req in replies or not self._connected, call):
                raise FlushTimeout(f"no reply to control op {op!r} from {self.socket_path}")
        reply = replies.pop(req)
        if reply.get("ok") is not True:
            raise PfClientError(f"control op {op!r} failed: {reply.get('error')}")
        return reply.get("result")

    async def aclose(self) -> None:
        """Flush (best effort, up to :attr:`timeout`), then close the connection. Idempotent."""
        if self._closed:
            return
        try:
            if self.fail_open:
                await self._close_open()
            else:
                await self.flush()
        except PfClientError:
            pass
        finally:
            self._closed = True
            if self._connector is not None:
                self._connector()  # cancel it
            await self._background_done()
            await self._drop()

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the logic ----------------------------------------------------------------------------

    def _begin(self, timeout: float | None = None) -> _Call:
        if self._closed:
            raise PfClientError("the client is closed")
        return _Call(time.monotonic() + (self.timeout if timeout is None else timeout))

    async def _submit(self, kind: str, fields: dict[str, Any], job_id: str | None,
                      ts: float | None, event_id: str | None,
                      wait: bool = False) -> str:  # fmt: skip
        call = self._begin()
        s = self._session
        pending = s.event(kind, fields, job_id, ts, event_id, waited=wait)
        if self.fail_open:
            return await self._submit_open(pending, wait)
        if not await self._wait_until(lambda: len(s.unacked) < self.max_unacked, call):
            raise FlushTimeout(f"{len(s.unacked)} events unacknowledged by the daemon at "
                               f"{self.socket_path}; it is not keeping up")  # fmt: skip
        s.queue(pending)
        if self._connected:
            await self._write_or_drop(s.frame(pending))
        if not self._connected:
            await self._reconnect(call)  # resends everything queued, this event included
        if wait:
            if not await self._wait_until(lambda: pending.done, call):
                pending.waited = False  # so a late rejection reaches flush()
                raise FlushTimeout(f"{kind} event {pending.id} not acknowledged in time")
            if pending.error is not None:
                raise pending.error
        return pending.id

    async def _wait_until(self, done: Callable[[], bool], call: _Call) -> bool:
        """Wait for the reader to make ``done()`` true; False if the call's time ran out."""
        while True:
            changed = self._changed_event()  # taken before the check: no lost wake-up
            if done():
                return True
            if not self._connected:
                await self._reconnect(call)
                continue
            remaining = call.deadline - time.monotonic()
            if remaining <= 0:
                return False
            await self._wait_changed(changed, remaining)

    async def _reconnect(self, call: _Call) -> None:
        async with self._lock:
            if self._connected:
                return  # another task did it
            if call.reconnected:
                raise DaemonUnavailable(f"lost the connection to the pfcollector daemon at "
                                        f"{self.socket_path} again after reconnecting")  # fmt: skip
            call.reconnected = True
            await self._drop()
            s = self._session
            try:
                await self._open(self.socket_path, call.deadline)
            except OSError as exc:
                reason = exc.strerror or str(exc) or type(exc).__name__
                raise DaemonUnavailable(f"cannot reach the pfcollector daemon at "
                                        f"{self.socket_path}: {reason}") from None  # fmt: skip
            self._connected = True
            await self._write_or_drop(s.hello(os.getpid()))
            while True:
                changed = self._changed_event()
                if self._handshake_over():
                    break
                remaining = call.deadline - time.monotonic()
                if remaining <= 0:
                    break
                await self._wait_changed(changed, remaining)
            refused = self._refusal()
            if refused is not None:
                await self._drop()
                raise refused
            if s.welcome is None:
                await self._drop()
                raise DaemonUnavailable(f"pfcollector daemon at {self.socket_path}: "
                                        "no welcome in time")  # fmt: skip
            self._fallback.welcome(s.welcome)
            self._stalled = False
            while self._connected:  # also what calls queued meanwhile (seq 0: not sent here)
                unsent = [p for p in s.unacked.values() if p.seq == 0]
                if not unsent:
                    break
                for pending in unsent:
                    if pending.seq == 0 and s.unacked.get(pending.id) is pending:
                        await self._write_or_drop(s.frame(pending))

    def _handshake_over(self) -> bool:
        s = self._session
        return s.welcome is not None or s.hello_error is not None or not self._connected

    def _refusal(self) -> EventRejected | None:
        # a method, so mypy does not keep the pre-loop narrowing to None
        return self._session.hello_error

    async def _write_or_drop(self, frame: bytes) -> None:
        try:
            await self._write(frame)
        except (OSError, WireError):
            self._connected = False

    def _received(self, data: bytes) -> bool:
        """The reader's hook: handle ``data``; False (and disconnected) on EOF or garbage."""
        if not data:
            self._lost()
            return False
        self._stalled = False
        try:
            self._session.feed(data)
        except WireError:
            self._lost()
            return False
        return True

    def _lost(self) -> None:
        self._connected = False
        if self.fail_open and not self._closed:
            self._lost_open()

    def _new_call(self, seconds: float) -> _Call:
        return _Call(time.monotonic() + seconds)

    async def _drop(self) -> None:
        self._connected = False
        await self._close_connection()

    # -- the I/O, provided by subclasses -------------------------------------------------------

    @property
    def _lock(self) -> Any:  # an async context manager: asyncio.Lock or trio.Lock
        raise NotImplementedError

    async def _open(self, path: str, deadline: float) -> None:
        raise NotImplementedError

    async def _write(self, frame: bytes) -> None:
        raise NotImplementedError

    async def _close_connection(self) -> None:
        raise NotImplementedError

    def _changed_event(self) -> Any:
        raise NotImplementedError

    async def _wait_changed(self, event: Any, seconds: float) -> None:
        raise NotImplementedError

    def _spawn(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Run ``fn()`` in the background; return a function that cancels it."""
        raise NotImplementedError

    async def _sleep(self, seconds: float) -> None:
        raise NotImplementedError

    async def _background_done(self) -> None:
        """Wait until cancelled background tasks have ended (so none holds a socket)."""

    async def _bounded(self, awaitable: Awaitable[None], seconds: float) -> bool:
        """Await ``awaitable`` for at most ``seconds``; False if it had to be cancelled."""
        raise NotImplementedError


class AsyncClient(BaseAsyncClient):
    """A connection to the pfcollector daemon for one fuzzing job, for asyncio.

    Args: as :class:`pfclient.Client`. Nothing happens until :meth:`connect` (or
    ``async with``); every call connects on demand anyway.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *, job_id: str,
                 fuzzer: str, **options: Any) -> None:  # fmt: skip
        super().__init__(socket_path, job_id=job_id, fuzzer=fuzzer, **options)
        self._conn_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()  # strong references to background tasks

    @property
    def _lock(self) -> asyncio.Lock:
        return self._conn_lock

    async def _open(self, path: str, deadline: float) -> None:
        timeout = max(0.0, deadline - time.monotonic())
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
        except TimeoutError:
            raise OSError(f"connecting timed out after {timeout:.1f}s") from None
        try:
            check_peer(writer.get_extra_info("socket"), path, self._trusted)
        except PfClientError:
            writer.close()
            raise
        self._writer = writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while self._received(await reader.read(_READ_SIZE)):
                self._notify()
        except OSError:
            self._connected = False
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _write(self, frame: bytes) -> None:
        writer = self._writer
        if writer is None:
            raise OSError("not connected")
        async with self._write_lock:
            writer.write(frame)
            await writer.drain()

    async def _close_connection(self) -> None:
        task, self._reader_task = self._reader_task, None
        writer, self._writer = self._writer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if writer is not None:
            # abort, not close: close() waits until the buffer is written, which a hung
            # daemon never allows; what was not acknowledged stays queued anyway.
            writer.transport.abort()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _changed_event(self) -> asyncio.Event:
        return self._changed

    async def _wait_changed(self, event: Any, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)

    def _spawn(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        task = asyncio.get_running_loop().create_task(fn())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task.cancel

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def _background_done(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, PfClientError, OSError):
                await task

    async def _bounded(self, awaitable: Awaitable[None], seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):  # in this task: writes keep their seq order
                await awaitable
        except TimeoutError:
            return False
        return True
