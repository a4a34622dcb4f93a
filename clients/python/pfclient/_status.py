"""Reaching the daemon's socket, and :func:`status`: one control request without a client.

Resource handling:
    :func:`open_socket` hands its socket to the caller; :func:`status` closes its own.

Error handling:
    An unreachable daemon is :class:`DaemonUnavailable` naming the path and the OS error.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterable
from typing import Any

from ._errors import DaemonUnavailable, FlushTimeout, PfClientError, UntrustedDaemon
from ._session import rejection
from ._wire import FrameBuffer, WireError, default_socket_path, encode_frame

__all__ = ["check_peer", "open_socket", "path_of", "peer_uid", "status", "trusted_uids"]

_READ_SIZE = 64 * 1024
_PEERCRED = struct.Struct("3i")


def trusted_uids(extra: Iterable[int] | None = None) -> frozenset[int]:
    """The uids a daemon may run as: ours, root, ``extra`` and ``$PFCOLLECTOR_DAEMON_UID``.

    Raises:
        ValueError: ``$PFCOLLECTOR_DAEMON_UID`` is not a comma-separated list of uids.
    """
    uids = {0, os.getuid(), os.geteuid(), *(extra or ())}
    for part in os.environ.get("PFCOLLECTOR_DAEMON_UID", "").split(","):
        if part.strip():
            if not part.strip().isdigit():
                raise ValueError(f"PFCOLLECTOR_DAEMON_UID must be uids separated by commas, "
                                 f"got {part.strip()!r}")  # fmt: skip
            uids.add(int(part))
    return frozenset(uids)


def peer_uid(sock: Any) -> int | None:
    """The uid of the process at the other end of a connected Unix socket (``SO_PEERCRED``)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except (OSError, AttributeError):
        return None
    return int(_PEERCRED.unpack(raw)[1])


def check_peer(sock: Any, path: str, trusted: frozenset[int]) -> None:
    """Raise :class:`UntrustedDaemon` unless the listener runs as a ``trusted`` uid."""
    uid = peer_uid(sock)
    if uid is not None and uid not in trusted:
        raise UntrustedDaemon(path, uid)


def path_of(socket_path: str | os.PathLike[str] | None) -> str:
    """``socket_path`` as a str; :func:`default_socket_path` when ``None``."""
    return default_socket_path() if socket_path is None else os.fspath(socket_path)


def open_socket(path: str, timeout: float, trusted: frozenset[int] | None = None) -> socket.socket:
    """A blocking Unix stream socket connected to ``path`` whose listener runs as a trusted uid
    (:func:`trusted_uids` by default).

    Raises:
        DaemonUnavailable: it cannot connect; :class:`UntrustedDaemon` for a foreign listener.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.settimeout(None)  # blocking; waits go through poll() with deadlines
        check_peer(sock, path, trusted_uids() if trusted is None else trusted)
    except UntrustedDaemon:
        sock.close()
        raise
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
