"""The client side of the daemon's control requests: one request, one reply, blocking.

What ``pfcollector status``, ``tune``, ``flush`` and ``dead-letters`` use; benchmarks and
tests use it too. It speaks :mod:`pfcollector.protocol` over a plain socket (no trio), so a
command returns as soon as its answer is in.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import msgpack

from pfclient import PfClientError
from pfclient._status import check_peer, trusted_uids

from .config import default_socket_path
from .protocol import HEADER_SIZE, Control, ErrorMsg, Reply, encode, parse_server_message

__all__ = ["DaemonUnreachable", "request"]


class DaemonUnreachable(Exception):
    """No daemon answers on the socket. The message names the path and the reason."""


def request(
    socket_path: Path | None, op: str, args: dict[str, Any] | None = None, timeout: float = 5.0
) -> Any:
    """Send one control request to the daemon and return its result.

    Error handling:
        :class:`DaemonUnreachable` when nothing answers; ``RuntimeError`` with the daemon's
        message when it answers with an error.
    """
    path = socket_path or default_socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise DaemonUnreachable(
                f"no pfcollector daemon at {path}: {exc.strerror or exc}"
            ) from None
        try:  # an impostor on the path gets nothing, not even the request (security.md)
            check_peer(sock, str(path), trusted_uids())
        except (PfClientError, ValueError) as exc:
            raise DaemonUnreachable(str(exc)) from None
        sock.sendall(encode(Control(1, op, args or {})))
        while True:
            (length,) = struct.unpack(">I", _recv_exact(sock, HEADER_SIZE, path))
            msg = parse_server_message(msgpack.unpackb(_recv_exact(sock, length, path), raw=False))
            if isinstance(msg, Reply) and msg.req == 1:
                if not msg.ok:
                    raise RuntimeError(msg.error or "the daemon refused the request")
                return msg.result
            if isinstance(msg, ErrorMsg):
                raise RuntimeError(f"{msg.code}: {msg.message}")
    except TimeoutError:
        raise DaemonUnreachable(f"the daemon at {path} did not answer within {timeout}s") from None
    finally:
        sock.close()


def _recv_exact(sock: socket.socket, n: int, path: Path) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise DaemonUnreachable(f"the daemon at {path} closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
