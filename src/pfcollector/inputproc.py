"""Crash input files written by a child process: the daemon's event loop keeps its GIL.

:meth:`pfcollector.inputs.InputStore.write` makes about five system calls per input (a
``stat``, the open, the write, the close, the rename) and one ``syncfs`` per batch. Run in a
worker thread of the daemon, each call lets go of the GIL and takes it back from the event
loop, which is busy reading frames and committing groups: end to end at 3,000 crashes/s that
hand-off was 10 ``futex`` calls per crash and about a fifth of the daemon's CPU (with the
writes skipped outright the daemon spent 0.21 instead of 0.27 ms of CPU per delivered crash,
``benchmarks/e2e.py``). A child process has a GIL of its own: the loop only writes each batch
into a pipe and reads one short reply.

The exchange (a frame: a 4-byte big-endian length and a MessagePack body):

* daemon -> child: a frame ``[[sha256_hex, size], ...]``, then the items' bytes back to back,
  one batch; the next only after its reply. The bytes are not packed into the frame: a batch
  is up to an eighth of the memory budget, and packing it would copy it two or three times in
  the daemon (``benchmarks/memory_pressure.py`` measured the peak RSS 325 MiB past its bound
  that way). Small items are joined into writes of up to 64 KiB, big ones written as they are;
* child -> daemon: a frame, ``nil`` once every file of the batch and its name are on disk, or
  ``[errno, message]`` when the batch failed with that ``OSError`` (a full disk).

Durability is unchanged: the inputs stay in the spool's journal until the reply says their
files are on disk (:class:`pfcollector.inputwriter.InputWriter` drops them only then). A
child that dies, is killed, or answers nonsense is stopped and the batch fails as an
``OSError``: the writer backs off, reads the bytes back from the journal, and the next batch
starts a new child. The child exits when its stdin closes, so a daemon killed with ``kill -9``
leaves no writer behind for long (at most the batch in hand, whose files a new daemon writes
again: the names are content hashes, an existing one is synced, not rewritten).

Memory: the child (:mod:`pfcollector.inputchild`, which imports no trio) is sent at most
``max_batch_bytes`` at once (the daemon gives an eighth of its memory budget; a commit group's
inputs can be more, and go in several exchanges), one item past it, on top of its interpreter
(``benchmarks/memory_pressure.py`` reports and bounds its peak).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import trio

from .inputchild import frame
from .inputs import InputStore
from .inputwriter import ThreadWrites

__all__ = ["EXIT_WAIT_S", "START_FAILURES", "WRITE_CHUNK", "InputProcess"]

log = logging.getLogger("pfcollector.ingest")

#: Bytes per pipe write for small items joined together (big ones go as they are).
WRITE_CHUNK = 64 * 1024
#: Children in a row that died before their first answer, after which the thread writes.
START_FAILURES = 3
#: How long a child may take to finish its batch once its stdin closed, before it is killed.
EXIT_WAIT_S = 2.0


#: glibc's settings for the child, which imports no trio, like ``membudget.tune_allocator``'s:
#: a freed batch goes back to the system instead of keeping the child's RSS at every peak. Its
#: threshold stays at 128 KiB: the child builds none of the 128-256 KiB objects the daemon
#: keeps on its heap, and its bound (memory_pressure.py) was measured with it.
CHILD_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_ARENA_MAX": "2"}


class InputProcess:
    """The daemon's side: one child at a time, started on first use and after a failure."""

    def __init__(self, store: InputStore, max_batch_bytes: int = 32 * 1024 * 1024) -> None:
        self.store = store
        #: The most the child is sent at once (one item past it): its memory, beside its
        #: interpreter. A bigger batch (a commit group's inputs) goes in several exchanges.
        self.max_batch_bytes = max(1, max_batch_bytes)
        #: The child's command line: this interpreter, this module, the inputs directory.
        self.command = [sys.executable, "-m", "pfcollector.inputchild", str(store.root)]
        self._proc: trio.Process | None = None
        self._answered = 0  # batches the current child answered
        #: Children started since the daemon started (1 while nothing went wrong).
        self.started = 0
        #: Children in a row that failed before answering once; at START_FAILURES the files
        #: are written in a worker thread instead (an interpreter that cannot run ``-m
        #: pfcollector.inputchild``, a sandbox that forbids a fork: slower, never stuck).
        self._failed_starts = 0
        self.in_thread = False
        self._thread = ThreadWrites(store)

    def status(self) -> dict[str, Any]:
        """``status --json``'s ``spool.input_writer``."""
        proc = self._proc
        return {
            "pid": proc.pid if proc is not None and proc.returncode is None else None,
            "starts": self.started,
            "in_thread": self.in_thread,
        }

    async def start(self) -> None:
        """Start the child now rather than at the first batch (an interpreter takes about a
        tenth of a second to start); a failure is left to the first batch to report."""
        with contextlib.suppress(OSError):
            await self._start()

    async def write(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Have ``items``' files written and made durable; ``OSError`` when they were not."""
        if self.in_thread:
            await self._thread.write(items)
            return
        try:
            for part in _parts(items, self.max_batch_bytes):
                await self._exchange(part)
        except OSError:
            if self._failed_starts >= START_FAILURES:
                self.in_thread = True
                log.warning("the input writer process failed %d times in a row before its "
                            "first batch; crash input files are written in a thread instead",
                            self._failed_starts)  # fmt: skip
            raise

    async def _exchange(self, items: Sequence[tuple[str, bytes]]) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            proc = await self._start()
        assert proc.stdin is not None
        assert proc.stdout is not None
        done = False
        try:
            await _send_batch(proc.stdin, items)
            reply = await _read_reply(proc.stdout)
            done = True
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError) as exc:
            self._failed_starts += self._answered == 0
            raise OSError(errno.EPIPE, f"the input writer process stopped ({exc})") from None
        except ValueError as exc:  # not MessagePack (msgpack's errors are ValueErrors)
            raise OSError(errno.EPROTO, f"the input writer answered garbage ({exc})") from None
        finally:
            if not done:  # cancelled or broken mid-exchange: its state is unknown
                await self._discard()
        self._answered += 1
        self._failed_starts = 0
        if reply is not None:
            code, message = _error_of(reply)
            raise OSError(code, message)

    async def aclose(self) -> None:
        """Close the child's stdin and let it finish its batch, killing it past EXIT_WAIT_S."""
        proc = self._proc
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            if proc.stdin is not None:
                await proc.stdin.aclose()
            with trio.move_on_after(EXIT_WAIT_S):
                await proc.wait()
        await self._discard()

    async def _start(self) -> trio.Process:
        await self._discard()
        try:
            proc = await trio.lowlevel.open_process(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
                env={**os.environ, **CHILD_MALLOC},
            )
        except OSError as exc:
            self._failed_starts += 1
            raise OSError(exc.errno, f"cannot start the input writer process: {exc}") from None
        self._proc = proc
        self._answered = 0
        self.started += 1
        if self.started > 1:
            log.warning("input writer process started again (%d starts)", self.started)
        return proc

    async def _discard(self) -> None:
        """Kill the child (its exchange is broken or was cut short), reap it, close its pipes."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()  # after SIGKILL: at once (a kernel that cannot end it holds
            # the daemon's files too)
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    await pipe.aclose()


def _parts(
    items: Sequence[tuple[str, bytes]], limit: int
) -> Iterator[Sequence[tuple[str, bytes]]]:
    """``items`` in runs of at most ``limit`` bytes (one item past it)."""
    start, size = 0, 0
    for i, (_, data) in enumerate(items):
        size += len(data)
        if size >= limit:
            yield items[start : i + 1]
            start, size = i + 1, 0
    if start < len(items):
        yield items[start:]


async def _send_batch(stream: trio.abc.SendStream, items: Sequence[tuple[str, bytes]]) -> None:
    """The batch's frame, then its bytes without a copy of the batch (see the module doc)."""
    await stream.send_all(frame([[sha, len(data)] for sha, data in items]))
    chunk: list[bytes] = []
    size = 0
    for _, data in items:
        if len(data) >= WRITE_CHUNK:
            if chunk:
                await stream.send_all(b"".join(chunk))
                chunk, size = [], 0
            await stream.send_all(data)
            continue
        chunk.append(data)
        size += len(data)
        if size >= WRITE_CHUNK:
            await stream.send_all(b"".join(chunk))
            chunk, size = [], 0
    if chunk:
        await stream.send_all(b"".join(chunk))


async def _read_reply(stream: trio.abc.ReceiveStream) -> Any:
    head = await _read_exact(stream, 4)
    body = await _read_exact(stream, int.from_bytes(head, "big"))
    return msgpack.unpackb(body, raw=False)


async def _read_exact(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError("it closed its output")
        buf += chunk
    return bytes(buf)


def _error_of(reply: Any) -> tuple[int, str]:
    if (
        isinstance(reply, list)
        and len(reply) == 2
        and isinstance(reply[0], int)
        and isinstance(reply[1], str)
    ):
        return reply[0], reply[1]
    return errno.EPROTO, f"the input writer process answered {reply!r:.80}"
