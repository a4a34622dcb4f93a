"""systemd socket activation: the listening socket the service manager passed us, if any.

systemd (``pfcollector.socket``) binds the Unix socket itself, with the owner and mode the unit
gives it, and starts the daemon on the first connection (or at boot) with the socket as file
descriptor 3 and ``LISTEN_FDS=1``, ``LISTEN_PID=<our pid>`` in the environment, as
``sd_listen_fds(3)`` describes. Connections made while the daemon restarts wait in the
socket's backlog instead of failing.

Resource handling:
    The returned socket is ours to close; the socket *file* is systemd's, and the server never
    unlinks it. ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` are removed from the
    environment once read, so no child process takes the socket for its own.

Error handling:
    :class:`ActivationError` when the environment says a socket was passed but it is not one
    listening ``AF_UNIX`` ``SOCK_STREAM`` socket: a unit misconfiguration to fix, not to guess
    around.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from typing import Final

__all__ = ["SD_LISTEN_FDS_START", "ActivationError", "listen_socket"]

#: The first file descriptor systemd passes.
SD_LISTEN_FDS_START: Final = 3
_VARIABLES: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """The service manager passed something pfcollector cannot listen on."""


def listen_socket(
    env: MutableMapping[str, str] | None = None,
    *,
    pid: int | None = None,
    fd: int = SD_LISTEN_FDS_START,
) -> socket.socket | None:
    """The inherited listening socket, or ``None`` when the daemon should bind its own.

    Args:
        env: The environment (``os.environ``); the activation variables are removed from it.
        pid: Our process id (``os.getpid()``); ``LISTEN_PID`` must name it, else the variables
            were meant for another process and are left alone.
        fd: Where the socket is (always 3 under systemd; tests pass another).

    Raises:
        ActivationError: ``LISTEN_FDS`` is not ``1``, or the descriptor is not a listening
            ``AF_UNIX`` ``SOCK_STREAM`` socket.
    """
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    if "LISTEN_FDS" not in env or env.get("LISTEN_PID", "").strip() != str(pid):
        return None
    count = env["LISTEN_FDS"].strip()
    for name in _VARIABLES:
        env.pop(name, None)
    if count != "1":
        raise ActivationError(
            f"LISTEN_FDS={count!r}: pfcollector listens on exactly one socket; "
            "give its .socket unit a single ListenStream="
        )
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"file descriptor {fd} is not a socket: {exc.strerror}") from None
    try:
        _check(sock, fd)
    except BaseException:
        sock.detach()  # leave the descriptor as we found it
        raise
    sock.set_inheritable(False)
    return sock


def _check(sock: socket.socket, fd: int) -> None:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ActivationError(
            f"file descriptor {fd} is {sock.family.name} {sock.type.name}, "
            "not a Unix stream socket: use ListenStream=/path in the .socket unit"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ActivationError(
            f"file descriptor {fd} is a Unix stream socket that is not listening "
            "(Accept=no and ListenStream= make systemd pass a listening one)"
        )
