"""Crash inputs: acknowledged once their bytes are in the spool (one fsync for the group),
written to their content-addressed file off the ack path, then dropped from the spool. Rules:
at every moment an acknowledged input is durable in the spool or in its file; a daemon that
died before writing leaves the bytes for the next start; a failing disk keeps them in the
spool until it works again; identical inputs make one file."""

from __future__ import annotations

import errno
import gc
import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from pfcollector.acks import AckTracker
from pfcollector.events import Event, Kind
from pfcollector.ingest import INLINE_MAX_BYTES, GroupCommitter, Pending
from pfcollector.inputs import InputStore
from pfcollector.inputwriter import InputWriter
from pfcollector.membudget import MemoryBudget, Reservation
from pfcollector.spool import Spool

from .conftest import make_event


def crash_pending(data: bytes, tracker: AckTracker, seq: int) -> Pending:
    event: Event = make_event(Kind.CRASH)
    fields = {k: v for k, v in event.fields.items() if k not in ("hash", "size", "file_path")}
    tracker.submitted(seq)
    return Pending(Event(event.id, Kind.CRASH, "job-1", "afl", 1, fields), data, tracker, seq)


async def until(pred: Any, limit: float = 10.0) -> None:
    with trio.fail_after(limit):
        while not pred():
            await trio.sleep(0.01)


async def test_ack_then_file_then_spool_forgets(tmp_path: Path, nursery: trio.Nursery) -> None:
    spool, inputs = Spool(tmp_path / "s.db"), InputStore(tmp_path / "inputs")
    committer = GroupCommitter(spool, inputs, crash_dedupe=False)
    writer = InputWriter(spool, inputs)
    tracker = AckTracker()
    group = [crash_pending(f"input {i}".encode(), tracker, i) for i in range(1, 51)]
    group.append(crash_pending(b"input 1", tracker, 51))  # same bytes: one file
    await committer.commit(group)
    assert tracker.ack_ready == 51  # acknowledged: the bytes are committed in the spool
    assert spool.pending_input_count() == 50
    committer.on_commit(writer.notify)
    nursery.start_soon(writer.run)
    await until(lambda: writer.written == 50)
    assert spool.pending_input_count() == 0
    for i in range(1, 51):
        data = f"input {i}".encode()
        assert inputs.path_for(hashlib.sha256(data).hexdigest()).read_bytes() == data
    stored = spool.read_after(0, 100)[0].event
    assert Path(stored.fields["file_path"]).exists()


async def test_bytes_left_by_a_dead_daemon_are_written_at_start(tmp_path: Path) -> None:
    spool, inputs = Spool(tmp_path / "s.db"), InputStore(tmp_path / "inputs")
    tracker = AckTracker()
    await GroupCommitter(spool, inputs).commit([crash_pending(b"orphan", tracker, 1)])
    spool.close()  # the daemon dies before its input writer ran
    spool = Spool(tmp_path / "s.db")
    assert spool.pending_input_count() == 1
    async with trio.open_nursery() as nursery:
        nursery.start_soon(InputWriter(spool, inputs).run)
        await until(lambda: spool.pending_input_count() == 0)
        nursery.cancel_scope.cancel()
    assert inputs.path_for(hashlib.sha256(b"orphan").hexdigest()).read_bytes() == b"orphan"


@pytest.mark.parametrize("handed", [False, True], ids=["from-journal", "handed-over"])
async def test_a_failing_disk_keeps_the_bytes_until_it_works(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
    handed: bool,
) -> None:
    spool, inputs = Spool(tmp_path / "s.db"), InputStore(tmp_path / "inputs")
    budget = MemoryBudget(64 * 1024 * 1024)
    writer = InputWriter(spool, inputs, budget)
    committer = GroupCommitter(spool, inputs)
    if handed:  # the bytes in memory go when the write fails; the journal still has them
        committer.hand_inputs_to(writer)
    item = crash_pending(b"precious", AckTracker(), 1)
    item.hold = Reservation(budget)
    item.hold.grow(512 + 8)
    await committer.commit([item])
    assert writer.handed == int(handed)
    real_write = InputStore.write
    failures = {"left": 3}

    def flaky(self: InputStore, items: Any) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, items)

    monkeypatch.setattr(InputStore, "write", flaky)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await trio.sleep(1.0)
        assert spool.pending_input_count() == 1  # still journaled while the disk fails
        await until(lambda: spool.pending_input_count() == 0, 60)
        nursery.cancel_scope.cancel()
    assert inputs.path_for(hashlib.sha256(b"precious").hexdigest()).read_bytes() == b"precious"
    assert not list((tmp_path / "inputs").glob("*/*.tmp"))
    assert budget.used == 0  # nothing held after the failures


async def test_a_file_renamed_but_not_synced_is_synced_before_the_bytes_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    import pfcollector.inputs as inputs_module

    spool, inputs = Spool(tmp_path / "s.db"), InputStore(tmp_path / "inputs")
    await GroupCommitter(spool, inputs).commit([crash_pending(b"renamed", AckTracker(), 1)])
    real_syncfs = inputs_module._syncfs
    calls: list[str] = []

    def syncfs(root: Path) -> bool:
        calls.append("sync")
        if len(calls) == 2:  # after the rename, before its sync: the disk fails
            raise OSError(errno.EIO, "Input/output error")
        return real_syncfs(root)

    dropped: list[int] = []  # syncs seen when the journal rows were dropped
    real_drop = spool.drop_inputs

    def drop(shas: Any) -> None:
        dropped.append(len(calls))
        real_drop(shas)

    monkeypatch.setattr(inputs_module, "_syncfs", syncfs)
    monkeypatch.setattr(spool, "drop_inputs", drop)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(InputWriter(spool, inputs).run)
        await until(lambda: spool.pending_input_count() == 0, 60)
        nursery.cancel_scope.cancel()
    path = inputs.path_for(hashlib.sha256(b"renamed").hexdigest())
    assert path.read_bytes() == b"renamed"
    # The file existed at the retry (renamed by the failed try), yet it was synced again
    # before its bytes left the spool.
    assert dropped == [len(calls)] and len(calls) >= 3


async def test_fresh_inputs_are_written_from_memory_not_read_back(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit hands the writer the bytes it just journalled (with their memory budget):
    reading them back from SQLite cost a blob read and two copies per input."""
    spool, inputs = Spool(tmp_path / "s.db"), InputStore(tmp_path / "inputs")
    budget = MemoryBudget(64 * 1024 * 1024)
    committer = GroupCommitter(spool, inputs, crash_dedupe=False)
    writer = InputWriter(spool, inputs, budget)
    committer.on_commit(writer.notify)
    committer.hand_inputs_to(writer)
    read_back: list[str] = []  # the writer starts after the commit: its first look at the
    # journal (for a previous run's inputs) finds only what was handed over, and reads none
    real_read = Spool.read_inputs

    def recording(self: Spool, shas: list[str]) -> list[tuple[str, bytes]]:
        read_back.extend(shas)
        return real_read(self, shas)

    monkeypatch.setattr(Spool, "read_inputs", recording)
    tracker = AckTracker()
    group = [crash_pending(f"fresh {i}".encode(), tracker, i) for i in range(1, 21)]
    for item in group:
        item.hold = Reservation(budget)
        item.hold.grow(len(item.input) + 512)  # type: ignore[arg-type]
    await committer.commit(group)
    nursery.start_soon(writer.run)
    await until(lambda: writer.written == 20)
    assert read_back == []
    assert spool.pending_input_count() == 0
    assert budget.used == 0  # the handed-over share came back once the files were durable
    for i in range(1, 21):
        data = f"fresh {i}".encode()
        assert inputs.path_for(hashlib.sha256(data).hexdigest()).read_bytes() == data


@pytest.mark.parametrize("size", [128 * 1024, 1024], ids=["in-the-worker", "on-the-loop"])
async def test_a_refused_group_is_freed_when_its_memory_is_given_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """A commit that failed in its worker thread came back with a traceback holding the
    group, in a reference cycle through trio's own frame: the events and their inputs lived
    on until the garbage collector ran, after the budget had released their bytes, and the
    daemon's RSS went up to 80 MiB past memory_budget (a stalled spool, full pressure run).
    Small groups are written on the event loop's thread (ingest.INLINE_MAX_BYTES): the same
    holds there."""
    spool, inputs = Spool(tmp_path / "s.db"), InputStore(tmp_path / "inputs")
    assert (10 * size > INLINE_MAX_BYTES) == (size > 1024)

    def locked(*args: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(spool, "_commit", locked)
    committer = GroupCommitter(spool, inputs, crash_dedupe=False)
    tracker = AckTracker()
    gc.collect()
    gc.disable()
    try:
        group = [crash_pending(bytes(size), tracker, i) for i in range(1, 11)]
        await committer.commit(group)
        assert committer.failing == "spool_write_failed"
        del group
        # Without the collector, only references going away can free the group. trio's
        # worker thread lets go of its call's arguments just after handing back the result,
        # which may be a moment after this task resumed: allow it that moment, not a cycle
        # (the old traceback cycle kept the group until the collector ran, forever here).
        alive = _count_alive(Pending)
        with trio.move_on_after(2):
            while alive:
                await trio.sleep(0.01)
                alive = _count_alive(Pending)
    finally:
        gc.enable()
    assert alive == 0


def _count_alive(cls: type) -> int:
    """Objects of ``cls`` alive now (a count: a list of them would keep them alive)."""
    return sum(type(o) is cls for o in gc.get_objects())


async def test_inputs_past_the_writers_share_wait_in_the_journal(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The writer keeps handed-over bytes up to an eighth of the budget; commits past that
    give their bytes back at once (the journal has them) and the writer reads those back
    later: every input reaches its file, and the budget ends where it started."""
    spool, inputs = Spool(tmp_path / "s.db"), InputStore(tmp_path / "inputs")
    budget = MemoryBudget(16 * 1024 * 1024)  # the writer keeps 2 MiB at most
    committer = GroupCommitter(spool, inputs, crash_dedupe=False)
    writer = InputWriter(spool, inputs, budget)
    committer.on_commit(writer.notify)
    committer.hand_inputs_to(writer)
    tracker = AckTracker()
    datas = [bytes([i]) * (900 * 1024) for i in range(1, 6)]
    for seq, data in enumerate(datas, start=1):  # five commits before the writer runs
        item = crash_pending(data, tracker, seq)
        item.hold = Reservation(budget)
        item.hold.grow(len(data) + 512)
        await committer.commit([item])
    assert writer.handed == 2  # 1.8 MiB kept; the other three wait in the journal
    assert budget.used == 2 * 900 * 1024  # what the writer keeps, and nothing else
    assert spool.pending_input_count() == 5
    nursery.start_soon(writer.run)
    await until(lambda: writer.written == 5)
    assert spool.pending_input_count() == 0
    assert budget.used == 0
    for data in datas:
        assert inputs.path_for(hashlib.sha256(data).hexdigest()).read_bytes() == data


async def test_the_writer_never_waits_for_memory_while_it_holds_its_queue(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Inputs in the journal, a queue handed over, and the rest of the budget held by readers
    that wait for more: the writer writes its queue (giving its memory back) instead of
    waiting for room to read the journal. A writer that waited there while holding its queue
    deadlocked the quick pressure run in CI."""
    spool, inputs = Spool(tmp_path / "s.db"), InputStore(tmp_path / "inputs")
    budget = MemoryBudget(16 * 1024 * 1024)
    left = [bytes([i]) * (1024 * 1024) for i in range(1, 4)]  # a previous run's, in the journal
    await GroupCommitter(spool, inputs).commit(
        [crash_pending(data, AckTracker(), i) for i, data in enumerate(left, start=1)]
    )
    writer = InputWriter(spool, inputs, budget)
    committer = GroupCommitter(spool, inputs)
    committer.hand_inputs_to(writer)
    fresh = crash_pending(b"\xff" * (1024 * 1024), AckTracker(), 9)
    fresh.hold = Reservation(budget)
    fresh.hold.grow(1024 * 1024 + 512)
    await committer.commit([fresh])
    assert writer.handed == 1
    readers = Reservation(budget)
    readers.grow(budget.capacity - budget.used)  # everything else is held...
    reader_got_room = trio.Event()

    async def reader() -> None:  # ...by readers waiting for one more frame
        await readers.ensure(readers.held + 1024 * 1024)
        reader_got_room.set()

    nursery.start_soon(reader)
    nursery.start_soon(writer.run)
    with trio.fail_after(30):
        await reader_got_room.wait()  # the writer wrote its queue and gave its memory back
        await until(lambda: writer.written >= 1)
    path = inputs.path_for(hashlib.sha256(fresh.input).hexdigest())  # type: ignore[arg-type]
    assert path.exists()
    readers.release()  # now the journal's inputs find room too
    with trio.fail_after(30):
        await until(lambda: spool.pending_input_count() == 0)
        # The batch's memory goes back once its journal rows are dropped: the writer
        # releases it when it resumes after the drop (a worker thread), not before.
        await until(lambda: budget.used == 0)


def test_file_name_is_path_for_as_a_string(tmp_path: Path) -> None:
    inputs = InputStore(tmp_path / "inputs")
    sha = hashlib.sha256(b"x").hexdigest()
    assert inputs.file_name(sha) == str(inputs.path_for(sha))
