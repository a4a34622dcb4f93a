"""Writing an event to the daemon's outbox: the durable fallback when no daemon can ack it.

One event per file ``<outbox>/<id>.pfev`` holding two frames, byte for byte what a client sends
on a fresh connection: ``hello``, then the ``event`` with ``seq`` 1 and its ``id``. Written to a
temporary file ``.<id>.<pid>.<random>.tmp`` (mode 0640, ``O_CREAT|O_EXCL|O_NOFOLLOW``), fsynced,
renamed, and the directory fsynced: once :func:`write_event` returns, the event survives a
power cut. The daemon imports the file (at start and every few seconds) and deletes it once
the event is in its spool. Format: ``docs/protocol.md``, "The outbox".

Error handling:
    :func:`write_event` raises ``OSError`` when the file cannot be written (the caller's
    last resort failed); a half-written temporary file is removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Any

from ._wire import PROTOCOL_VERSION, encode_frame

__all__ = ["OUTBOX_SUFFIX", "default_outbox_dir", "outbox_bytes", "write_event"]

#: The name suffix of an outbox file.
OUTBOX_SUFFIX = ".pfev"
_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def default_outbox_dir() -> str:
    """The outbox a client uses when no daemon told it one (and none was given).

    ``$PFCOLLECTOR_OUTBOX`` if set, else ``<data dir>/outbox`` with the daemon's data
    directory rule: ``$PFCOLLECTOR_DATA_DIR``, else ``$XDG_DATA_HOME/pfcollector``, else
    ``~/.local/share/pfcollector``.
    """
    explicit = os.environ.get("PFCOLLECTOR_OUTBOX")
    if explicit:
        return explicit
    data = os.environ.get("PFCOLLECTOR_DATA_DIR")
    if not data:
        xdg = os.environ.get("XDG_DATA_HOME")
        data = os.path.join(xdg, "pfcollector") if xdg else os.path.join(
            os.path.expanduser("~"), ".local", "share", "pfcollector")  # fmt: skip
    return os.path.join(os.path.abspath(data), "outbox")


def _make_private_dirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each mode 0750 (``mkdir(parents=True)``
    would make the parents 0755: a data directory the daemon then refuses as open to all)."""
    missing: list[Path] = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o750)


def outbox_bytes(hello: dict[str, Any], event: dict[str, Any]) -> bytes:
    """The content of an outbox file: ``hello`` then ``event`` (given ``seq`` 1) as frames."""
    body = {"t": "event", "seq": 1}
    body.update((k, v) for k, v in event.items() if k not in ("t", "seq"))
    head = {"t": "hello", "v": PROTOCOL_VERSION, "job_id": hello["job_id"],
            "fuzzer": hello["fuzzer"], "pid": hello["pid"]}  # fmt: skip
    return encode_frame(head) + encode_frame(body)


def write_event(directory: str | os.PathLike[str], hello: dict[str, Any],
                event: dict[str, Any]) -> Path:  # fmt: skip
    """Write ``event`` (which must carry its ``id``) durably into the outbox ``directory``.

    The directory is created (mode 0750, and so are its missing parents) if missing. An
    existing file of the same id is replaced: same id, same event.

    Returns:
        The file's path.

    Raises:
        ValueError: the event has no valid id.
        OSError: the file could not be written.
    """
    event_id = event.get("id")
    if not isinstance(event_id, str) or not _ID_RE.fullmatch(event_id):
        raise ValueError(f"an outbox event needs an id of 1..64 [A-Za-z0-9._:-], got {event_id!r}")
    data = outbox_bytes(hello, event)
    folder = Path(directory)
    _make_private_dirs(folder)
    tmp = folder / f".{event_id}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    final = folder / f"{event_id}{OUTBOX_SUFFIX}"
    fd = os.open(tmp, _FLAGS, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final
