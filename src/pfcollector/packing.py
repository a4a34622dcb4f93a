"""MessagePack encoding without a quarter-megabyte buffer per call.

``msgpack.packb`` builds a new ``Packer`` per call, and a ``Packer`` starts with a 256 KiB
buffer. The daemon fixes glibc's mmap threshold at 256 KiB (:mod:`pfcollector.membudget`, so
that big freed buffers go back to the system), which makes that buffer (with malloc's header,
just over it) an ``mmap`` and a ``munmap`` per call; and ``munmap`` in a process with threads
running on other cores costs a TLB shootdown on each. Measured here with a second thread
busy: 5.7 us per ``packb`` of a small crash event against 0.6 us with a 4 KiB start (the
buffer grows as needed).
"""

from __future__ import annotations

from typing import Any

import msgpack

__all__ = ["PACK_BUF", "pack"]

#: The Packer's first buffer: room for any small event, far below the mmap threshold.
PACK_BUF = 4096


def pack(obj: Any) -> bytes:
    """``msgpack.packb(obj, use_bin_type=True)``, starting from a small buffer."""
    body: bytes = msgpack.packb(obj, use_bin_type=True, buf_size=PACK_BUF)
    return body
