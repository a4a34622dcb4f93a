"""Reading what a fuzzer wrote, which the fuzzed (untrusted) target can also write.

A target can plant a symlink named like a crash (to ``/etc/shadow``), a FIFO (an ``open``
that never returns), a directory, a huge file, or replace a subdirectory with a symlink to
somewhere else. So under the watched directory every directory is opened with
``O_NOFOLLOW | O_DIRECTORY`` relative to its parent's descriptor (no ``..``, no symlinked
subdirectory, no race between a check and the open), and every file with
``O_NOFOLLOW | O_NONBLOCK``, ``fstat``-ed, and read only if it is a regular file within its
size limit. A refused file is logged once with its path and the reason.

Resource handling:
    Every descriptor is closed before the call returns (:meth:`SafeTree.directory` is a
    context manager).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["WAIT_WARN_INTERVAL", "DirWaiter", "SafeTree"]

log = logging.getLogger("pfcollector.watch")

#: Seconds between two "still waiting for the directory" warnings.
WAIT_WARN_INTERVAL = 60.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class SafeTree:
    """Reads files under ``root`` without ever following a link out of it.

    ``root`` itself is what the user named (it may be a symlink); below it nothing is followed.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._refused: set[str] = set()

    def refuse(self, where: str, reason: str) -> None:
        """Log ``where`` as refused, once."""
        if where not in self._refused:
            self._refused.add(where)
            log.warning("refusing %s: %s (never read)", where, reason)

    @contextlib.contextmanager
    def directory(self, *parts: str) -> Iterator[int | None]:
        """A descriptor of ``root/parts...``, or None if it is missing or not a real directory
        (a symlinked subdirectory is refused and logged once)."""
        fds: list[int] = []
        try:
            try:
                fds.append(os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            except (FileNotFoundError, NotADirectoryError):
                yield None
                return
            for depth, part in enumerate(parts):
                where = str(self.root.joinpath(*parts[: depth + 1]))
                if part in ("", ".", "..") or "/" in part:
                    self.refuse(where, "leaves the watched directory")
                    yield None
                    return
                try:
                    fds.append(os.open(part, _DIR_FLAGS, dir_fd=fds[-1]))
                except FileNotFoundError:
                    yield None
                    return
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        self.refuse(where, "a symlink or not a directory")
                        yield None
                        return
                    raise
            yield fds[-1]
        finally:
            for fd in fds:
                os.close(fd)

    def is_dir(self, dir_fd: int, name: str) -> bool:
        """Whether ``name`` is a real directory (not a symlink to one)."""
        try:
            return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def is_file(self, dir_fd: int, name: str) -> bool:
        """Whether ``name`` is a real regular file (not a symlink to one)."""
        try:
            return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def read(self, dir_fd: int, name: str, limit: int, where: str) -> bytes | None:
        """The bytes of regular file ``name`` if it is at most ``limit`` bytes; else None
        (refused and logged once, or gone)."""
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self.refuse(where, "a symbolic link")
                return None
            if exc.errno in (errno.EISDIR, errno.ENXIO, errno.EACCES):
                self.refuse(where, exc.strerror or str(exc))
                return None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.refuse(where, "not a regular file")
                return None
            if st.st_size > limit:
                self.refuse(where, f"{st.st_size} bytes, over the limit of {limit}")
                return None
            chunks, got = [], 0
            while got <= limit:
                chunk = os.read(fd, min(1 << 20, limit + 1 - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            if got > limit:
                self.refuse(where, f"grew over the limit of {limit} bytes")
                return None
            return b"".join(chunks)
        finally:
            os.close(fd)


class DirWaiter:
    """Tells the user, now and then, that the directory to watch does not exist yet."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._warned_at: float | None = None

    def ready(self) -> bool:
        """Whether the directory exists; if not, warn (at most every WAIT_WARN_INTERVAL s)."""
        if self.path.is_dir():
            if self._warned_at is not None:
                log.info("%s %s appeared; watching it", self.what, self.path)
                self._warned_at = None
            return True
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= WAIT_WARN_INTERVAL:
            self._warned_at = now
            log.warning("%s %s does not exist yet; waiting for it to appear", self.what,
                        self.path)  # fmt: skip
        return False
