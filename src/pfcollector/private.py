"""Files pfcollector keeps are private to its user: crash inputs and stack traces are exploit
material for bugs nobody has fixed yet.

Use these helpers for everything written under the data directory (spool, inputs, outbox,
watcher state) rather than ``open``/``mkdir`` with the process's umask:

* :func:`make_private_dir` creates a directory (and missing parents) with mode ``0750``;
* :func:`open_private_file` creates a *new* file with mode ``0640`` (``O_EXCL``, never through
  a symlink) and returns its descriptor;
* :func:`create_private_file` makes an empty file ``0640`` if it is missing (SQLite then gives
  its ``-wal`` and ``-shm`` files the database file's mode);
* :func:`serve_umask` is the umask ``pfcollector serve`` sets for itself (``0027``, ``0007``
  when ``socket_group`` gives a group to share with): a safety net for whatever a library
  creates;
* :func:`check_private` is the start-up check: a data directory that other users can read is
  refused in one line (:class:`NotPrivate`), or fixed (``pfcollector serve --fix-permissions``).

Modes are the most a file gets: the umask can only narrow them (an outbox that a socket group
writes to asks for ``0770``/``0660`` explicitly and runs under ``0007``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "NotPrivate",
    "check_private",
    "create_private_file",
    "make_private_dir",
    "open_private_file",
    "serve_umask",
]

#: Mode of the directories pfcollector creates: owner all, group enter and list, others none.
DIR_MODE = 0o750
#: Mode of the files pfcollector creates: owner read-write, group read, others none.
FILE_MODE = 0o640
#: Permission bits of "other users": none of them may be set anywhere under the data directory.
OTHERS = 0o007


class NotPrivate(Exception):
    """A directory holding pfcollector's files is open to other users; the message says where
    and what to do (one line)."""


def serve_umask(shared_group: bool = False) -> int:
    """The umask of the daemon: ``0027``, or ``0007`` when files are shared with a group."""
    return 0o007 if shared_group else 0o027


def make_private_dir(path: Path, mode: int = DIR_MODE) -> Path:
    """Create ``path`` and its missing parents with ``mode``; an existing directory is left
    as it is (:func:`check_private` judges it). Returns ``path``."""
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # created meanwhile by another process
            os.mkdir(directory, mode)
    if not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
    return path


def open_private_file(path: Path, flags: int = os.O_WRONLY, mode: int = FILE_MODE) -> int:
    """A descriptor of a new file at ``path`` with ``mode``; ``flags`` are added to
    ``O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC``.

    Raises:
        FileExistsError: ``path`` exists (even as a dangling symlink): nothing is overwritten.
    """
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def create_private_file(path: Path, mode: int = FILE_MODE) -> bool:
    """Create an empty file at ``path`` with ``mode`` unless something is there; True if made."""
    try:
        fd = open_private_file(path, os.O_WRONLY, mode)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def check_private(root: Path, *, fix: bool = False) -> int:
    """Check that other users can do nothing with ``root`` and what is in it.

    Looks at ``root`` and at every entry one level down (the spool files, ``inputs``,
    ``outbox``, ``watch``...): enough, since nothing below a directory closed to others can be
    reached by them. A missing ``root`` is fine (it will be created private).

    Args:
        fix: Take the permissions of others away from everything under ``root`` (the whole
            tree, symlinks not followed) instead of refusing.

    Returns:
        How many entries were fixed (0 when everything was private).

    Raises:
        NotPrivate: Something is open to others and ``fix`` is False.
    """
    root = Path(root)
    try:
        mode = os.stat(root).st_mode
    except FileNotFoundError:
        return 0
    exposed = [(root, mode)] if mode & OTHERS else []
    with contextlib.suppress(NotADirectoryError, PermissionError):
        for entry in os.scandir(root):
            entry_mode = entry.stat(follow_symlinks=False).st_mode
            if entry_mode & OTHERS and not stat.S_ISLNK(entry_mode):
                exposed.append((Path(entry.path), entry_mode))
    if not exposed:
        return 0
    if not fix:
        where, bad = exposed[0]
        more = f" (and {len(exposed) - 1} more)" if len(exposed) > 1 else ""
        raise NotPrivate(
            f"{where} is open to other users (mode {stat.S_IMODE(bad):04o}){more}: crash inputs "
            f"must be private; run `chmod -R o-rwx {root}` or start with --fix-permissions"
        )
    return _take_from_others(root)


def _take_from_others(root: Path) -> int:
    fixed = 0
    root = root.resolve()  # a data directory may itself be a symlink; nothing below it is
    for path in [root, *_walk(root)]:
        try:  # through a descriptor: a name swapped for a symlink meanwhile is not followed
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOENT, errno.ENXIO):
                continue  # a symlink (never followed), gone, or a socket
            raise
        try:
            mode = os.fstat(fd).st_mode
            if mode & OTHERS:
                os.fchmod(fd, stat.S_IMODE(mode) & ~OTHERS)
                fixed += 1
        finally:
            os.close(fd)
    return fixed


def _walk(root: Path) -> list[Path]:
    out: list[Path] = []
    for directory, dirs, files in os.walk(root):  # does not follow symlinks to directories
        out.extend(Path(directory, name) for name in dirs + files)
    return out
