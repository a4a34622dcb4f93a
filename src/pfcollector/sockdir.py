"""The socket's directory: private to the daemon's user, so no one else can take the path first.

The fallback socket path (no ``$PFCOLLECTOR_SOCKET``, no ``$XDG_RUNTIME_DIR``) is
``/tmp/pfcollector-<uid>/pfcollector.sock``. ``/tmp`` is writable by everyone: a socket
directly in it could be bound first by another local user, and clients would talk to that
impostor. So the daemon creates the directory itself, mode ``0700`` (``0750`` with
``socket_group``, whose members must reach the socket), and refuses to start when the
directory, or a file already at the socket path, belongs to another uid or can be written by
others (see docs/security.md).

Error handling:
    :class:`SocketPathRefused` (an :class:`~pfcollector.server.AddressInUse`, so ``serve``
    prints it as one line) names the path, its owner and its mode.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .server import AddressInUse

__all__ = ["SocketPathRefused", "fallback_socket_dir", "prepare_socket_dir"]


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
