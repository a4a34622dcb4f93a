"""The outbox: crashes (and other events) that clients wrote to files while the daemon was away.

A client that cannot get the daemon's durable ack writes the event as one file
``<outbox>/<id>.pfev`` (format in ``docs/protocol.md``, "The outbox"): a ``hello`` frame and
one ``event`` frame, byte for byte what it would have sent on a fresh connection. The
:class:`Importer` reads them at start and every :data:`SCAN_INTERVAL` seconds, decodes them with
the daemon's own :class:`~pfcollector.protocol.ServerConnection` (same limits, same error codes
as the socket), hands them to the group commit like a connection would, and deletes each file
only once its event is committed. An event stored earlier under the same id is stored once.

What a fuzzer writes is hostile input: a file is opened with ``O_NOFOLLOW | O_NONBLOCK``
(a symlink or a FIFO is never followed or waited on), ``fstat``-ed, and read only if it is a
regular file within :func:`file_limit` bytes owned by a uid the socket would admit
(:meth:`Importer.admits`). Anything else moves to ``<outbox>/rejected/`` with one log line.

Resource handling:
    One pass reads at most :data:`PASS_MAX_BYTES` of files, and no more than a quarter of the
    daemon's memory budget, reserved from it before reading and held until the group commit
    has the events, so memory stays bounded whatever the outbox holds. Files settle on the
    ingest channel's flow control.

Error handling:
    A file the spool cannot take now (``spool_full``, ``disk_full``, ``spool_write_failed``)
    stays in the outbox for a later pass. A directory that cannot be read is one log line per
    episode; the daemon goes on serving its socket.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import stat
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .acks import AckTracker
from .events import Event, Kind
from .ingest import Pending
from .membudget import MemoryBudget, Reservation
from .protocol import HEADER_SIZE, EventMsg, Hello, ProtocolError, ServerConnection

__all__ = [
    "OUTBOX_SUFFIX",
    "PASS_MAX_BYTES",
    "PASS_MAX_FILES",
    "REJECTED_DIR",
    "RETRY_LATER",
    "SCAN_INTERVAL",
    "Importer",
    "OutboxFile",
    "decode_file",
    "file_limit",
    "prepare_outbox",
]

log = logging.getLogger(__name__)

#: Seconds between two passes over the outbox while the daemon runs.
SCAN_INTERVAL = 3.0
#: Bytes of outbox files read in one pass before they are handed to the group commit.
PASS_MAX_BYTES = 64 * 1024 * 1024
#: Files handled in one pass at most.
PASS_MAX_FILES = 1024
#: Name suffix of an outbox file; other names (and names starting with ``.``) are ignored.
OUTBOX_SUFFIX = ".pfev"
#: Where refused files go, under the outbox.
REJECTED_DIR = "rejected"
#: Spool refusals that mean "not now": the file stays for a later pass.
RETRY_LATER = frozenset({"spool_full", "disk_full", "spool_write_failed"})
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def file_limit(max_frame: int) -> int:
    """The largest valid outbox file: two frames, each at most ``max_frame`` bytes of body."""
    return 2 * (HEADER_SIZE + max_frame)


class Rejected(Exception):
    """An outbox file that must not be imported; ``code`` says why, as on the socket."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class OutboxFile:
    """One decoded outbox file: the stored form of its event and the bytes kept beside it."""

    name: str
    event: Event
    data: bytes | list[bytes] | None


def decode_file(name: str, raw: bytes, max_frame: int, uid: int, mtime_ns: int) -> OutboxFile:
    """Decode the bytes of outbox file ``name`` exactly as a fresh socket connection would.

    Raises:
        Rejected: not exactly a valid ``hello`` then one valid ``event`` whose ``id`` is the
            file's name; the code is the protocol's (``not_msgpack``, ``wrong_type``, ...) or
            ``bad_outbox_file`` for what only a file can get wrong.
    """
    conn = ServerConnection(max_frame=max_frame)
    conn.receive_data(raw)
    conn.receive_data(b"")
    messages: list[Any] = []
    try:
        while len(messages) < 3:
            msg = conn.next_message()
            if msg is None:
                break
            messages.append(msg)
    except ProtocolError as exc:
        raise Rejected(exc.code, exc.message) from None
    if conn.pending_bytes:
        raise Rejected("bad_outbox_file", f"{conn.pending_bytes} byte(s) after the last whole "
                       "frame (a truncated or padded file)")  # fmt: skip
    if len(messages) != 2 or not isinstance(messages[0], Hello):
        raise Rejected("bad_outbox_file", f"holds {len(messages)} message(s); expected a hello "
                       "then one event")  # fmt: skip
    hello, msg = messages
    if not isinstance(msg, EventMsg):
        raise Rejected("bad_outbox_file", "the second frame is not an event")
    expected = name.removesuffix(OUTBOX_SUFFIX)
    if msg.id is None:
        raise Rejected("missing_field", "the event has no id (an outbox event needs one)")
    if msg.id != expected:
        raise Rejected("bad_outbox_file", f"event id {msg.id!r} does not match the file name")
    fields = msg.fields
    data: bytes | list[bytes] | None = None
    if msg.kind is Kind.CRASH:
        data = fields.pop("input")
    elif msg.kind is Kind.CORPUS:
        data = fields.pop("contents")
    event = Event(
        msg.id,
        msg.kind,
        msg.job_id or hello.job_id,
        hello.fuzzer,
        msg.ts_ns if msg.ts_ns is not None else mtime_ns,
        fields,
        hello.pid,
        uid,
    )
    return OutboxFile(name, event, data)


def prepare_outbox(path: Path, group: int | None) -> None:
    """Create the outbox (and ``rejected/``) private to the daemon's user.

    Mode ``0750`` (``rejected/`` too); with a socket group the outbox itself is ``01770`` and
    given that group, so the group's clients may write files there but not remove others'.

    Raises:
        OSError: it cannot be created, or it exists owned by another uid or writable by all.
    """
    path.mkdir(mode=0o750, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise PermissionError(
            errno.EPERM,
            f"outbox {path} is not a directory owned by uid {os.geteuid()} (owner "
            f"{st.st_uid}); not importing from it",
        )
    if group is not None:
        os.chown(path, -1, group)
        os.chmod(path, 0o1770)
    else:
        os.chmod(path, 0o750)
    rejected = path / REJECTED_DIR
    rejected.mkdir(mode=0o750, exist_ok=True)
    os.chmod(rejected, 0o750)


@dataclass
class _Socketrules:
    allows: Callable[[int, int], bool]
    socket_mode: int
    socket_group: int | None


class Importer:
    """Imports outbox files into the spool through the ingest channel.

    Args:
        directory: The outbox.
        max_frame: The socket's frame limit (files are decoded with it).
        allows: The socket's allowlist check, ``allows(uid, gid)``.
        socket_mode: The socket file's mode: who besides the daemon's user may connect.
        socket_group: The socket file's group (``socket_group``), or ``None``.
    """

    def __init__(self, directory: Path, *, max_frame: int,
                 allows: Callable[[int, int], bool] = lambda uid, gid: True,
                 socket_mode: int = 0o660, socket_group: int | None = None,
                 budget: MemoryBudget | None = None) -> None:  # fmt: skip
        self.directory = Path(directory)
        #: The daemon's memory budget: a pass reads no more than it has reserved from it.
        self.budget = budget
        self.max_frame = max_frame
        self.limit = file_limit(max_frame)
        self._rules = _Socketrules(allows, socket_mode, socket_group)
        #: Files stored in the spool and removed from the outbox.
        self.imported = 0
        #: Files moved to ``rejected/`` (or left in place when even that failed).
        self.rejected = 0
        #: Imported files by event kind.
        self.kinds: Counter[str] = Counter()
        self.passes = 0
        self._stop = trio.CancelScope()
        self._wake = trio.Event()
        self._refused: set[str] = set()  # logged once, could not be moved
        self._deferred_logged = False
        self._dir_failed = False

    def status(self) -> dict[str, Any]:
        """For ``status``: where, what was imported and rejected."""
        return {"path": str(self.directory), "imported": self.imported,
                "rejected": self.rejected, "imported_by_kind": dict(self.kinds),
                "passes": self.passes}  # fmt: skip

    def stop(self) -> None:
        """End :meth:`run` (the daemon is stopping)."""
        self._stop.cancel()

    def wake(self) -> None:
        """Run a pass now rather than at the next interval."""
        self._wake.set()

    def admits(self, uid: int, gid: int) -> bool:
        """Would the socket admit a peer with this uid (and primary group)?

        The daemon's own uid and root always; others only through the socket file's mode
        (its group, or everyone) and the ``allow_uids``/``allow_gids`` lists.
        """
        rules = self._rules
        if uid in (0, os.geteuid()):
            return rules.allows(uid, gid)
        if not rules.allows(uid, gid):
            return False
        if rules.socket_mode & 0o002:
            return True
        group = rules.socket_group if rules.socket_group is not None else os.getegid()
        if not rules.socket_mode & 0o020:
            return False
        if gid == group:
            return True
        try:
            name = pwd.getpwuid(uid).pw_name
            return group in os.getgrouplist(name, gid) or name in grp.getgrgid(group).gr_mem
        except (KeyError, OSError):
            return False

    async def run(
        self,
        ingest: trio.MemorySendChannel[Pending],
        *,
        interval: float = SCAN_INTERVAL,
        task_status: trio.TaskStatus[Importer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Import at once, then every ``interval`` seconds, until :meth:`stop`.

        Resource handling:
            Closes ``ingest`` (a clone of the daemon's channel) on return.
        """
        async with ingest:
            task_status.started(self)
            with self._stop:
                while True:
                    await self.import_once(ingest)
                    with trio.move_on_after(interval):
                        await self._wake.wait()
                    self._wake = trio.Event()

    async def import_once(self, ingest: trio.MemorySendChannel[Pending]) -> int:
        """One pass: import what the outbox holds now; returns how many files were imported."""
        self.passes += 1
        total = 0
        while True:
            # A pass holds what it reads until the group commit has it: reserved first, so the
            # outbox cannot hold memory past the budget that bounds the sockets' readers too.
            limit = PASS_MAX_BYTES
            held = None
            if self.budget is not None:
                limit = min(limit, self.budget.capacity // 4)
                held = Reservation(self.budget)
                await held.ensure(limit)
            try:
                batch = await trio.to_thread.run_sync(self._read_batch, limit)
                if not batch:
                    return total
                total += await self._store(batch, ingest)
            finally:
                if held is not None:
                    held.release()
            if len(batch) < PASS_MAX_FILES:
                return total

    def _names(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except OSError as exc:
            if not self._dir_failed:
                log.error("cannot read outbox %s: %s", self.directory, exc.strerror or exc)
            self._dir_failed = True
            return []
        self._dir_failed = False
        return sorted(n for n in names if n.endswith(OUTBOX_SUFFIX) and not n.startswith("."))

    def _read_batch(self, limit: int = PASS_MAX_BYTES) -> list[OutboxFile]:
        """Read and decode up to ``limit`` bytes of files (at least one); refuse the bad ones
        (thread)."""
        out: list[OutboxFile] = []
        size = 0
        for name in self._names():
            if name in self._refused:
                continue
            try:
                item = self._read(name)
            except Rejected as exc:
                self._reject(name, exc.code, str(exc))
                continue
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._reject(name, "unreadable", exc.strerror or str(exc))
                continue
            out.append(item)
            size += _size(item)
            if size >= limit or len(out) >= PASS_MAX_FILES:
                break
        return out

    def _read(self, name: str) -> OutboxFile:
        try:
            fd = os.open(self.directory / name, _OPEN_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Rejected("not_regular", "a symbolic link (never followed)") from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Rejected("not_regular", f"not a regular file (mode {st.st_mode:o})")
            if not self.admits(st.st_uid, st.st_gid):
                raise Rejected("peer_not_allowed", f"owned by uid {st.st_uid} gid {st.st_gid}, "
                               "which the socket would not admit")  # fmt: skip
            if st.st_size > self.limit:
                raise Rejected("frame_too_large", f"{st.st_size} bytes, larger than two frames "
                               f"of max_frame {self.max_frame}")  # fmt: skip
            raw = _read_all(fd, self.limit + 1)
            if len(raw) > self.limit:
                raise Rejected("frame_too_large", "grew past the size limit while read")
        finally:
            os.close(fd)
        return decode_file(name, raw, self.max_frame, st.st_uid, st.st_mtime_ns)

    def _reject(self, name: str, code: str, reason: str) -> None:
        self.rejected += 1
        target = self.directory / REJECTED_DIR / f"{name}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.directory / name, target)  # never follows a symlink: moves the link
        except FileNotFoundError:
            return
        except OSError as exc:
            self._refused.add(name)
            log.warning("outbox file %s refused (%s: %s) and left in place: %s",
                        self.directory / name, code, reason, exc.strerror or exc)  # fmt: skip
            return
        log.warning("outbox file %s refused (%s: %s); moved to %s",
                    self.directory / name, code, reason, target)  # fmt: skip

    async def _store(self, batch: list[OutboxFile], ingest: trio.MemorySendChannel[Pending]) -> int:
        """Hand ``batch`` to the group commit; delete each file once its event is committed."""
        tracker = AckTracker()
        for seq, item in enumerate(batch, 1):
            tracker.submitted(seq)
            await ingest.send(Pending(item.event, item.data, tracker, seq))
        while tracker.unsettled:
            await tracker.wait_changed()
        failed = {seq: code for seq, code, _, _ in tracker.errors}
        done: list[str] = []
        for seq, item in enumerate(batch, 1):
            code = failed.get(seq)
            if code is None:
                done.append(item.name)
                self.kinds[item.event.kind.value] += 1
            elif code in RETRY_LATER:
                if not self._deferred_logged:
                    log.warning("outbox file %s not imported now (%s); kept for a later pass",
                                item.name, code)  # fmt: skip
                self._deferred_logged = True
            else:
                await trio.to_thread.run_sync(self._reject, item.name, code, "refused by the spool")
        if len(done) == len(batch):
            self._deferred_logged = False
        await trio.to_thread.run_sync(self._unlink, done)
        self.imported += len(done)
        if done:
            log.info("imported %d event(s) from the outbox %s", len(done), self.directory)
        return len(done)

    def _unlink(self, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / name)
        if names:
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def _read_all(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < limit:
        chunk = os.read(fd, min(1024 * 1024, limit - got))  # a regular file: never blocks
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _size(item: OutboxFile) -> int:
    data = item.data
    if data is None:
        return 1024
    if isinstance(data, bytes):
        return len(data) + 1024
    return sum(map(len, data)) + 1024
