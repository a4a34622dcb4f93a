"""The pfcollector wire format as the client needs it: frames out, daemon messages in.

This duplicates a little of ``pfcollector.protocol`` on purpose: a fuzz harness must never import
the daemon (or trio). See ``docs/protocol.md`` for the format.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import msgpack

__all__ = [
    "HEADER_SIZE",
    "PROTOCOL_VERSION",
    "FrameBuffer",
    "WireError",
    "default_socket_path",
    "encode_frame",
]

PROTOCOL_VERSION = 1
HEADER_SIZE = 4
#: The largest daemon->client frame this client accepts (daemon messages are small).
MAX_INCOMING_FRAME = 1024 * 1024
_HEADER = struct.Struct(">I")


class WireError(Exception):
    """The daemon sent bytes that are not a valid frame holding a message map."""


def default_socket_path() -> str:
    """Where the daemon listens unless told otherwise (the daemon uses the same rule).

    ``$PFCOLLECTOR_SOCKET`` if set, else ``$XDG_RUNTIME_DIR/pfcollector.sock`` if
    ``XDG_RUNTIME_DIR`` is set, else ``/tmp/pfcollector-<uid>/pfcollector.sock`` (a directory
    only that uid may write, made by the daemon).
    """
    explicit = os.environ.get("PFCOLLECTOR_SOCKET")
    if explicit:
        return explicit
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "pfcollector.sock")
    return f"/tmp/pfcollector-{os.getuid()}/pfcollector.sock"


def encode_frame(message: dict[str, Any]) -> bytes:
    """``message`` as one frame: 4-byte big-endian length, then the msgpack map."""
    # A small first buffer: packb's default 256 KiB is an mmap and munmap per call wherever
    # the mmap threshold is lower, and munmap stalls every core running the harness's threads.
    body: bytes = msgpack.packb(message, use_bin_type=True, buf_size=4096)
    return _HEADER.pack(len(body)) + body


class FrameBuffer:
    """Accumulates bytes from the daemon and yields the message maps they hold."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def partial(self) -> bool:
        """Whether part of a frame is buffered (an EOF now would cut a message)."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add ``data``; return every complete message now available.

        Raises:
            WireError: a frame is oversized, empty, not msgpack, not a map, or has no ``t``.
        """
        buf = self._buf
        buf += data
        out: list[dict[str, Any]] = []
        while len(buf) >= HEADER_SIZE:
            (size,) = _HEADER.unpack_from(buf)
            if not 0 < size <= MAX_INCOMING_FRAME:
                raise WireError(f"daemon sent a frame of {size} bytes")
            if len(buf) < HEADER_SIZE + size:
                break
            body = bytes(buf[HEADER_SIZE : HEADER_SIZE + size])
            del buf[: HEADER_SIZE + size]
            try:
                obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
            except Exception as exc:
                raise WireError(f"daemon sent a frame that is not msgpack: {exc}") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("t"), str):
                raise WireError("daemon sent a frame that is not a message map")
            out.append(obj)
        return out
