"""The watchers' memory of what the daemon has already acknowledged: one small JSON file.

Resource handling:
    The file is rewritten whole, atomically: written to a temporary file in the same directory,
    fsynced, renamed over the old one, and the directory fsynced. A crash leaves the old file
    or the new one, never half of one.

Error handling:
    A missing file is an empty state. A file that is not a JSON object of the expected version
    raises :class:`StateError` (the watcher refuses to start rather than resend everything or
    forget what it sent).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..private import make_private_dir

__all__ = ["STATE_VERSION", "StateError", "StateFile", "default_state_path"]

STATE_VERSION = 1


class StateError(Exception):
    """The state file exists but cannot be used; the message names the file and why."""


def default_state_path(
    watcher: str, watched: Path, job_id: str, data_dir: Path | None = None
) -> Path:
    """``<data dir>/watch/<watcher>-<digest>.json``, one file per (watched directory, job).

    ``data_dir`` is the daemon's data directory (default: the default data directory).
    """
    from ..config import default_data_dir

    key = f"{watcher}\0{watched.resolve()}\0{job_id}".encode()
    name = f"{watcher}-{hashlib.sha256(key).hexdigest()[:16]}.json"
    return (data_dir or default_data_dir()) / "watch" / name


class StateFile:
    """A JSON object persisted at ``path``: ``data`` is the in-memory copy, ``save()`` commits it.

    The object always has ``"version"`` and ``"watched"``; each watcher keeps its own keys
    under ``"instances"`` (AFL++) or ``"artifacts"``/``"log"`` (libFuzzer).
    """

    def __init__(self, path: Path, watched: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"version": STATE_VERSION, "watched": str(watched.resolve())}
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateError(f"cannot read state file {path}: {exc.strerror or exc}") from None
        try:
            loaded = json.loads(raw)
        except ValueError as exc:
            raise StateError(f"state file {path} is not JSON: {exc}") from None
        if not isinstance(loaded, dict) or loaded.get("version") != STATE_VERSION:
            raise StateError(f"state file {path} is not a version {STATE_VERSION} state object")
        self.data = loaded

    def save(self) -> None:
        """Write ``data`` atomically (temporary file, fsync, rename, fsync of the directory)."""
        make_private_dir(self.path.parent)  # 0750; mkstemp makes the file 0600
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(self.data, out, indent=1, sort_keys=True)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
