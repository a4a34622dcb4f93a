"""Reaching the daemon's socket, and :func:`status`: one control request without a client.

Resource handling:
    :func:`open_socket` hands its socket to the caller; :func:`status` closes its own.

Error handling:
    An unreachable daemon is :class:`DaemonUnavailable` naming the path and the OS error.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from ._errors import DaemonUnavailable, FlushTimeout, PfClientError
from ._session import rejection
from ._wire import FrameBuffer, WireError, default_socket_path, encode_frame

__all__ = ["open_socket", "path_of", "status"]

_READ_SIZE = 64 * 1024


def path_of(socket_path: str | os.PathLike[str] | None) -> str:
    """``socket_path`` as a str; :func:`default_socket_path` when ``None``."""
    return default_socket_path() if socket_path is None else os.fspath(socket_path)


def open_socket(path: str, timeout: float) -> socket.socket:
    """A blocking Unix stream socket connected to ``path`` (DaemonUnavailable if it cannot)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.settimeout(None)  # blocking; waits go through poll() with deadlines
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise DaemonUnavailable(f"cannot reach the pfcollector daemon at {path}: {reason}") from exc
    return sock


def status(
    socket_path: str | os.PathLike[str] | None = None, timeout: float = 5.0
) -> dict[str, Any]:
    """Ask the daemon for its status over a fresh connection, without a hello.

    Raises:
        DaemonUnavailable: no daemon at the path, or it closed the connection.
        FlushTimeout: no reply within ``timeout``.
        PfClientError: the daemon answered an error.
    """
    path = path_of(socket_path)
    deadline = time.monotonic() + timeout
    frames = FrameBuffer()
    with open_socket(path, timeout) as sock:
        try:
            sock.settimeout(timeout)
            sock.sendall(encode_frame({"t": "control", "req": 1, "op": "status", "args": {}}))
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = sock.recv(_READ_SIZE)
                if not data:
                    raise DaemonUnavailable(f"pfcollector daemon at {path}: closed the connection")
                for msg in frames.feed(data):
                    if msg["t"] == "error":
                        raise rejection(msg)
                    if msg["t"] == "reply" and msg.get("req") == 1:
                        if msg.get("ok") is not True:
                            raise PfClientError(f"status failed: {msg.get('error')}")
                        result = msg.get("result")
                        return result if isinstance(result, dict) else {"result": result}
        except TimeoutError:
            raise FlushTimeout(f"no status reply from the daemon at {path} in time") from None
        except WireError as exc:
            raise PfClientError(f"the daemon at {path} sent garbage: {exc}") from exc
        except OSError as exc:
            raise DaemonUnavailable(f"pfcollector daemon at {path}: {exc}") from exc
