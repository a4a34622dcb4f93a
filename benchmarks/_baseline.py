"""The ingest ceiling: a trivial trio server that only reads and decodes msgpack frames.

Run by ``benchmarks/run.py`` as its own process. It speaks just enough of the protocol for the
load generator (``welcome`` to a ``hello``; one cumulative ``ack`` per read), and does nothing
else with an event: no validation, no spool, no fsync. Whatever pfcollector does per event is
measured against this.
"""

from __future__ import annotations

import argparse
import os
import socket as stdlib_socket
import struct

import msgpack
import trio

__all__ = ["main"]

_HEADER = struct.Struct(">I")
_READ_SIZE = 256 * 1024  # the daemon's READ_SIZE


def _frame(obj: dict[str, object]) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


async def _handle(stream: trio.SocketStream) -> None:
    buf = bytearray()
    unpackb = msgpack.unpackb
    async with stream:
        while True:
            data = await stream.receive_some(_READ_SIZE)
            if not data:
                return
            buf += data
            last_seq = 0
            while len(buf) >= 4:
                (size,) = _HEADER.unpack_from(buf)
                end = 4 + size
                if len(buf) < end:
                    break
                with memoryview(buf) as view:
                    obj = unpackb(view[4:end], raw=False)
                del buf[:end]
                if obj["t"] == "event":
                    last_seq = obj["seq"]
                elif obj["t"] == "hello":
                    await stream.send_all(_frame({"t": "welcome", "v": 1, "daemon": "baseline",
                                                  "max_frame": 16 << 20}))  # fmt: skip
            if last_seq:
                await stream.send_all(_frame({"t": "ack", "seq": last_seq}))


async def _serve(path: str) -> None:
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(128)
    listener = trio.SocketListener(sock)
    print("ready", flush=True)
    await trio.serve_listeners(_handle, [listener])


def main() -> int:
    """``python benchmarks/_baseline.py --socket PATH``: serve until killed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True)
    args = p.parse_args()
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    trio.run(_serve, args.socket)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
