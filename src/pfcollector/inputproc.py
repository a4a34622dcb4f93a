"""Crash input files written by a child process: the daemon's event loop keeps its GIL.

:meth:`pfcollector.inputs.InputStore.write` makes about five system calls per input (a
``stat``, the open, the write, the close, the rename) and one ``syncfs`` per batch. Run in a
worker thread of the daemon, each call lets go of the GIL and takes it back from the event
loop, which is busy reading frames and committing groups: end to end at 3,000 crashes/s that
hand-off was 10 ``futex`` calls per crash and about a fifth of the daemon's CPU (with the
writes skipped outright the daemon spent 0.21 instead of 0.27 ms of CPU per delivered crash,
``benchmarks/e2e.py``). A child process has a GIL of its own: the loop only writes each batch
into a pipe and reads one short reply.

The exchange, both ways a 4-byte big-endian length and a MessagePack body:

* daemon -> child: ``[[sha256_hex, bytes], ...]``, one batch; the next only after its reply;
* child -> daemon: ``nil`` once every file of the batch and its name are on disk, or
  ``[errno, message]`` when the batch failed with that ``OSError`` (a full disk).

Durability is unchanged: the inputs stay in the spool's journal until the reply says their
files are on disk (:class:`pfcollector.inputwriter.InputWriter` drops them only then). A
child that dies, is killed, or answers nonsense is stopped and the batch fails as an
``OSError``: the writer backs off, reads the bytes back from the journal, and the next batch
starts a new child. The child exits when its stdin closes, so a daemon killed with ``kill -9``
leaves no writer behind for long (at most the batch in hand, whose files a new daemon writes
again: the names are content hashes, an existing one is synced, not rewritten).

Memory: the child holds one batch at most (the writer's batches are an eighth of the memory
budget), on top of an interpreter that imports only this module and :mod:`~pfcollector.inputs`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import trio

from . import threads
from .inputs import InputStore
from .packing import pack

__all__ = ["InputProcess", "main"]

log = logging.getLogger("pfcollector.ingest")

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: Children in a row that died before their first answer, after which the thread writes.
START_FAILURES = 3
#: How long a child may take to finish its batch once its stdin closed, before it is killed.
EXIT_WAIT_S = 2.0


def _frame(obj: Any) -> bytes:
    body = pack(obj)
    return len(body).to_bytes(4, "big") + body


class InputProcess:
    """The daemon's side: one child at a time, started on first use and after a failure."""

    def __init__(self, store: InputStore) -> None:
        self.store = store
        #: The child's command line: this interpreter, this module, the inputs directory.
        self.command = [sys.executable, "-m", "pfcollector.inputproc", str(store.root)]
        self._proc: trio.Process | None = None
        self._answered = 0  # batches the current child answered
        #: Children started since the daemon started (1 while nothing went wrong).
        self.started = 0
        #: Children in a row that failed before answering once; at START_FAILURES the files
        #: are written in a worker thread instead (an interpreter that cannot run ``-m
        #: pfcollector.inputproc``, a sandbox that forbids a fork: slower, never stuck).
        self._failed_starts = 0
        self.in_thread = False

    def status(self) -> dict[str, Any]:
        """``status --json``'s ``spool.input_writer``."""
        proc = self._proc
        alive = proc is not None and proc.returncode is None
        return {
            "pid": proc.pid if alive and proc is not None else None,
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
            await threads.run_sync(self.store.write, items)
            return
        try:
            await self._exchange(items)
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
            await proc.stdin.send_all(_frame([[sha, data] for sha, data in items]))
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
                self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
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


# The child's side.


def _read_exact_fd(fd: int, n: int) -> bytes | None:
    """``n`` bytes from ``fd``; None at end of file before the first byte."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            if got:
                raise EOFError(f"the daemon closed the pipe {got} bytes into a {n}-byte frame")
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _batch_of(obj: Any) -> list[tuple[str, bytes]]:
    if not isinstance(obj, list):
        raise ValueError("a batch is a list")
    batch: list[tuple[str, bytes]] = []
    for item in obj:
        if not (isinstance(item, list) and len(item) == 2):
            raise ValueError("an item is [sha256, bytes]")
        sha, data = item
        if not (isinstance(sha, str) and _SHA256.fullmatch(sha) and isinstance(data, bytes)):
            raise ValueError(f"bad item name {sha!r:.80}")  # never a path of someone's choosing
        batch.append((sha, data))
    return batch


def serve(store: InputStore, fd_in: int = 0, fd_out: int = 1) -> int:
    """Write batches read from ``fd_in``, a reply each on ``fd_out``, until end of file."""
    while True:
        head = _read_exact_fd(fd_in, 4)
        if head is None:
            return 0
        body = _read_exact_fd(fd_in, int.from_bytes(head, "big"))
        if body is None:
            raise EOFError("the daemon closed the pipe after a frame's length")
        try:
            store.write(_batch_of(msgpack.unpackb(body, raw=False)))
            reply: Any = None
        except OSError as exc:
            reply = [exc.errno or errno.EIO, str(exc)]
        except ValueError as exc:  # msgpack's errors are ValueErrors too
            reply = [errno.EPROTO, f"bad batch: {exc}"]
        del body
        out = memoryview(_frame(reply))
        while out:
            out = out[os.write(fd_out, out) :]


def main(argv: list[str] | None = None) -> int:
    """``python -m pfcollector.inputproc ROOT``: started by :class:`InputProcess` only."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pfcollector.inputproc INPUTS_DIR (started by the daemon)",
              file=sys.stderr)  # fmt: skip
        return 2
    # The daemon decides when this process ends (it closes our stdin): a ^C at its terminal
    # or a service manager's SIGTERM to the whole group must not cut a batch short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        return serve(InputStore(Path(args[0])))
    except (EOFError, BrokenPipeError) as exc:
        print(f"pfcollector input writer: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
