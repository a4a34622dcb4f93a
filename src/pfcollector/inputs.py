"""Crash inputs stored once, content-addressed by SHA-256, under the data directory.

A crash found ten thousand times has one file. The path of an input is
``<root>/<sha256[:2]>/<sha256>``; the master is sent that path as the crash's ``file_path``
(its HTTP API has no way to upload the bytes).

Resource handling:
    Files are written to a temporary name, fsynced, then renamed into place, so a reader never
    sees half an input and a crash of the daemon leaves at worst a ``.tmp`` file, removed by
    :meth:`InputStore.clean`. The directory entry is made durable by :meth:`InputStore.sync_dirs`,
    which the spool's group commit calls once per group before it acknowledges anything.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["InputStore", "StoredInput"]


class StoredInput(tuple[str, int, str]):
    """``(sha256, size, path)`` of a stored input."""

    __slots__ = ()

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the bytes."""
        return self[0]

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self[1]

    @property
    def path(self) -> str:
        """Absolute path of the file."""
        return self[2]


class InputStore:
    """A content-addressed directory of crash inputs (and later corpus bytes)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self._dirty_dirs: set[Path] = set()

    def path_for(self, sha256: str) -> Path:
        """Where the input with this hash lives (whether or not it exists)."""
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> StoredInput:
        """Store ``data`` unless an identical input is already there. Blocking: call in a thread.

        Error handling:
            ``OSError`` (disk full, permissions) propagates; the caller refuses the events of
            the group and acknowledges none of them.
        """
        digest = hashlib.sha256(data).hexdigest()
        final = self.path_for(digest)
        if not final.exists():
            final.parent.mkdir(exist_ok=True)
            tmp = final.with_name(f"{digest}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                try:
                    view = memoryview(data)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)  # a full disk must not keep half an input
                raise
            self._dirty_dirs.add(final.parent)
        return StoredInput((digest, len(data), str(final)))

    def sync_dirs(self) -> None:
        """Make the renames of every input stored since the last call durable."""
        dirs, self._dirty_dirs = self._dirty_dirs, set()
        for directory in dirs:
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def clean(self) -> int:
        """Remove temporary files left by a daemon that died mid-write; return how many."""
        removed = 0
        for tmp in self.root.glob("*/*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed
