"""One daemon per data directory: an exclusive ``flock`` on ``<data dir>/daemon.lock``.

Two daemons on one spool would each read and deliver the other's events and count each
other's bytes. The lock is taken before the spool is opened and held for the life of the
process (the kernel drops it when the process dies, however it dies, so a stale lock file
never blocks a start). The holder writes its pid into the file, for the message a second
daemon prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

__all__ = ["LOCK_NAME", "DataDirLock", "DataDirLocked"]

#: The lock file's name inside the data directory.
LOCK_NAME = "daemon.lock"


class DataDirLocked(OSError):
    """Another live process holds the data directory. The message names it and the pid."""


class DataDirLock:
    """The held lock. :meth:`release` (or process exit) lets another daemon start."""

    def __init__(self, data_dir: Path) -> None:
        """Take the lock, creating the data directory and the lock file if needed.

        Error handling:
            :class:`DataDirLocked` when another process holds it; other ``OSError``
            (permissions) propagate.
        """
        self.path = Path(data_dir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise DataDirLocked(
                f"data directory {self.path.parent} is in use by another pfcollector daemon "
                f"({who}, lock {self.path})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Let go of the lock (idempotent)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
