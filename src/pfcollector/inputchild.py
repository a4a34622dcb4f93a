"""The input writer's child process: ``python -m pfcollector.inputchild INPUTS_DIR``.

Started by :class:`pfcollector.inputproc.InputProcess` (the exchange is described there). It
imports no more than it needs (no trio): its own memory is its interpreter, one batch and
one item read past it.

Every frame it reads is checked before it is used: an item's name must be a SHA-256 in hex
(never a path) and its size at most MAX_ITEM; a frame that fails is answered with ``EPROTO``
and ends the process (the bytes that follow it cannot be told apart from the next frame).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import msgpack

from .inputs import InputStore
from .packing import pack

__all__ = ["MAX_FRAME", "MAX_ITEM", "frame", "main", "serve"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
#: The largest item the child takes: far above the master's 10 MiB crash input.
MAX_ITEM = 1 << 30
#: The largest batch frame (names and sizes, about 80 bytes an item).
MAX_FRAME = 64 << 20


def frame(obj: Any) -> bytes:
    """A 4-byte big-endian length and ``obj`` in MessagePack."""
    body = pack(obj)
    return len(body).to_bytes(4, "big") + body


def _read_exact_fd(fd: int, n: int) -> bytearray | None:
    """``n`` bytes from ``fd``, read in place; None at end of file before the first byte."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        read = os.readv(fd, [view[got:]])
        if not read:
            if got:
                raise EOFError(f"the daemon closed the pipe {got} bytes into {n}")
            return None
        got += read
    view.release()
    return buf


def _items_of(obj: Any) -> list[tuple[str, int]]:
    """The batch frame's ``(sha256, size)`` pairs; ValueError when it is not one."""
    if not isinstance(obj, list):
        raise ValueError("a batch is a list")
    items: list[tuple[str, int]] = []
    for item in obj:
        if not (isinstance(item, list) and len(item) == 2):
            raise ValueError("an item is [sha256, size]")
        sha, size = item
        if not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            raise ValueError(f"bad item name {sha!r:.80}")  # never a path of someone's choosing
        if not (isinstance(size, int) and 0 <= size <= MAX_ITEM):
            raise ValueError(f"bad item size {size!r:.40}")
        items.append((sha, size))
    return items


def _read_items(fd: int, items: list[tuple[str, int]]) -> list[tuple[str, bytes]]:
    """The batch's bytes (a function of its own: no local keeps an item past the batch)."""
    batch: list[tuple[str, bytes]] = []
    for sha, size in items:
        data = _read_exact_fd(fd, size) if size else bytearray()
        if data is None:
            raise EOFError("the daemon closed the pipe inside a batch")
        batch.append((sha, data))  # type: ignore[arg-type]  # written through a memoryview
    return batch


def _reply(fd_out: int, reply: Any) -> None:
    out = memoryview(frame(reply))
    while out:
        out = out[os.write(fd_out, out) :]


def serve(store: InputStore, fd_in: int = 0, fd_out: int = 1) -> int:
    """Write batches read from ``fd_in``, a reply each on ``fd_out``, until end of file.

    A batch frame that cannot be read is answered with ``EPROTO`` and ends the child (its
    items' bytes cannot be told apart from the next frame): exit status 1.
    """
    while True:
        head = _read_exact_fd(fd_in, 4)
        if head is None:
            return 0
        length = int.from_bytes(head, "big")
        if length > MAX_FRAME:  # not a list of names and sizes: the stream is not ours
            _reply(fd_out, [errno.EPROTO, f"bad batch: a frame of {length} bytes"])
            return 1
        body = _read_exact_fd(fd_in, length)
        if body is None:
            raise EOFError("the daemon closed the pipe after a frame's length")
        try:
            items = _items_of(msgpack.unpackb(body, raw=False))
        except ValueError as exc:  # msgpack's errors are ValueErrors too
            _reply(fd_out, [errno.EPROTO, f"bad batch: {exc}"])
            return 1
        batch = _read_items(fd_in, items)
        try:
            store.write(batch)
            reply: Any = None
        except OSError as exc:
            reply = [exc.errno or errno.EIO, str(exc)]
        del batch
        _reply(fd_out, reply)


def main(argv: list[str] | None = None) -> int:
    """``python -m pfcollector.inputchild ROOT``: started by ``InputProcess`` only."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pfcollector.inputchild INPUTS_DIR (started by the daemon)",
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
