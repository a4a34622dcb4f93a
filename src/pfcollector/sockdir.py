"""The daemon's socket: its private directory, binding it, and who is on the other end.

The socket's directory is private to the daemon's user, so no one else can take the path first.

The fallback socket path (no ``$PFCOLLECTOR_SOCKET``, no ``$XDG_RUNTIME_DIR``) is
``/tmp/pfcollector-<uid>/pfcollector.sock``. ``/tmp`` is writable by everyone: a socket
directly in it could be bound first by another local user, and clients would talk to that
impostor. So the daemon creates the directory itself, mode ``0700`` (``0750`` with
``socket_group``, whose members must reach the socket), and refuses to start when the
directory, or a file already at the socket path, belongs to another uid or can be written by
others (see docs/security.md).

:func:`bind_unix` binds the socket with its mode set before anyone can connect, and refuses to
take over a path where a daemon answers; :func:`peer_credentials` is the kernel's word on a
peer (``SO_PEERCRED``), never the client's.

Error handling:
    :class:`SocketPathRefused` (an :class:`AddressInUse`, so ``serve`` prints it as one line)
    names the path, its owner and its mode.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket as stdlib_socket
import stat
import struct
from pathlib import Path

import trio

__all__ = [
    "AddressInUse",
    "SocketPathRefused",
    "bind_unix",
    "fallback_socket_dir",
    "peer_credentials",
    "prepare_socket_dir",
]

log = logging.getLogger(__name__)

_LISTEN_BACKLOG = 512
_PEERCRED = struct.Struct("3i")


class AddressInUse(OSError):
    """Another daemon is listening on the socket path, or the path is not a socket."""


class SocketPathRefused(AddressInUse):
    """The socket's directory or path is not safe to listen on; the message says why."""


def fallback_socket_dir(uid: int | None = None) -> Path:
    """``/tmp/pfcollector-<uid>``: the private directory of the fallback socket path."""
    return Path(f"/tmp/pfcollector-{os.getuid() if uid is None else uid}")


def _refuse(message: str) -> SocketPathRefused:
    return SocketPathRefused(errno.EPERM, f"{message}; refusing to listen there")


def prepare_socket_dir(socket_path: Path, group: int | None = None) -> None:
    """Make (for the fallback) and check the directory of ``socket_path`` before ``bind``.

    Raises:
        SocketPathRefused: the directory is a symlink or not a directory, is owned by another
            uid, or is writable by others (without the sticky bit, for a directory we did not
            make); or a file owned by another uid already sits at ``socket_path``.
    """
    me = os.geteuid()
    directory = socket_path.parent
    private = directory == fallback_socket_dir() or directory == fallback_socket_dir(me)
    if private:
        mode = 0o750 if group is not None else 0o700
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            pass
        else:
            os.chmod(directory, mode)  # the umask may have narrowed it
            if group is not None:
                os.chown(directory, -1, group)
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return  # bind_unix makes a missing non-private directory, as before
    perms = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(f"socket directory {directory} is not a directory (a symlink?)")
    if private and st.st_uid != me:
        raise _refuse(f"socket directory {directory} is owned by uid {st.st_uid}, not this "
                      f"daemon's uid {me}: another user made it")  # fmt: skip
    if private and perms & 0o022:
        raise _refuse(f"socket directory {directory} has mode {perms:o}: writable by others")
    if not private and perms & 0o002 and not perms & stat.S_ISVTX:
        raise _refuse(f"socket directory {directory} has mode {perms:o}: anyone may replace "
                      "the socket")  # fmt: skip
    try:
        sock_st = os.lstat(socket_path)
    except FileNotFoundError:
        return
    if sock_st.st_uid not in (me, 0):
        raise _refuse(f"{socket_path} is owned by uid {sock_st.st_uid}, not this daemon's uid "
                      f"{me}: another user's process holds the socket path")  # fmt: skip


def bind_unix(path: Path, mode: int) -> trio.socket.SocketType:
    """A listening Unix socket at ``path``, its file given ``mode`` before ``listen``.

    Error handling:
        :class:`AddressInUse` when a daemon answers on ``path`` or ``path`` is not a socket;
        other ``OSError`` (permissions, a missing directory we cannot create) propagate.
    """
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise AddressInUse(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
        probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale socket file %s", path)
            path.unlink(missing_ok=True)
        else:
            raise AddressInUse(
                errno.EADDRINUSE, f"another pfcollector daemon is already listening on {path}"
            )
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = trio.socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)  # the file is born with `mode`, never wider
    try:
        sock._sock.bind(str(path))  # type: ignore[attr-defined]  # a path bind never blocks
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(_LISTEN_BACKLOG)
    return sock


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int]:
    """The peer's ``(pid, uid, gid)`` as the kernel says (SO_PEERCRED); (0, -1, -1) if unknown."""
    try:
        raw = sock.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return 0, -1, -1
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid
