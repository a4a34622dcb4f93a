"""Where a group commit runs (:meth:`pfcollector.ingest.GroupCommitter._store`).

Small groups are written on the event loop's thread, fsync included; big ones, groups meeting
a held spool lock (the pipeline, the input writer, another process) and every group for a
while after a slow COMMIT go to a worker thread. Rules: every group is stored and settled
either way; the loop keeps running while a group waits for a lock; a slow disk holds the loop
once, not at every group. Real SQLite files, real threads.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from pfcollector import ingest
from pfcollector.acks import AckTracker
from pfcollector.ingest import INLINE_MAX_BYTES, SLOW_COMMIT_S, GroupCommitter
from pfcollector.inputs import InputStore
from pfcollector.spool import Spool

from .test_inputs import crash_pending


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The thread of each COMMIT, in order."""
    threads: list[int] = []
    real = Spool._commit

    def commit(self: Spool) -> None:
        threads.append(threading.get_ident())
        real(self)

    monkeypatch.setattr(Spool, "_commit", commit)
    return threads


def _group(size: int, tracker: AckTracker, first: int, n: int = 4) -> list[Any]:
    return [crash_pending(bytes([seq % 256]) * size, tracker, seq)
            for seq in range(first, first + n)]  # fmt: skip


@pytest.fixture
def committer(tmp_path: Path) -> Iterator[GroupCommitter]:
    spool = Spool(tmp_path / "s.db")
    yield GroupCommitter(spool, InputStore(tmp_path / "inputs"), crash_dedupe=False)
    spool.close()


async def test_small_groups_commit_on_the_loop_and_big_ones_in_a_worker(
    committer: GroupCommitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = committer.spool
    threads = _recording(monkeypatch)
    tracker = AckTracker()
    await committer.commit(_group(1024, tracker, 1))
    await committer.commit(_group(INLINE_MAX_BYTES, tracker, 5))  # 4 MiB: past the limit
    assert threads[0] == threading.get_ident()
    assert threads[1] != threading.get_ident()
    assert committer.inline == 1
    assert tracker.ack_ready == 8 and not tracker.errors
    assert spool.total_count == 8


async def test_a_held_spool_lock_sends_the_group_to_a_worker_and_the_loop_goes_on(
    committer: GroupCommitter, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = committer.spool
    threads = _recording(monkeypatch)
    tracker = AckTracker()
    ticks = 0
    spool._lock.acquire()  # as the pipeline's delete would, in its worker
    release = threading.Timer(0.3, spool._lock.release)
    release.start()
    try:
        async with trio.open_nursery() as nursery:

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await trio.sleep(0.01)

            nursery.start_soon(tick)
            await committer.commit(_group(1024, tracker, 1))
            nursery.cancel_scope.cancel()
    finally:
        release.join()
    assert threads == [threads[0]] and threads[0] != threading.get_ident()
    assert ticks >= 5  # the loop ran while the group waited 0.3 s (about 30 ticks; held: 1)
    assert tracker.ack_ready == 4 and spool.total_count == 4


async def test_another_process_holding_the_write_lock_does_not_hold_the_loop(
    committer: GroupCommitter, tmp_path: Path
) -> None:
    spool = committer.spool
    other = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # SQLite's write lock, held by another connection
    tracker = AckTracker()
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(committer.commit, _group(1024, tracker, 1))
        await trio.sleep(0.2)
        # This task ran on time: the loop was not held for SQLite's 5 s busy timeout (a loaded
        # machine may be late by a second, never by five).
        assert trio.current_time() - started < 3.0
        assert tracker.ack_ready == 0
        other.execute("ROLLBACK")
    assert tracker.ack_ready == 4 and spool.total_count == 4
    assert committer.inline == 0
    other.close()


async def test_a_slow_commit_sends_commits_to_a_worker_for_a_while(
    committer: GroupCommitter, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "pfcollector.ingest")
    spool = committer.spool
    threads: list[int] = []
    real = Spool._commit

    def slow_once(self: Spool) -> None:
        threads.append(threading.get_ident())
        real(self)
        if len(threads) == 1:
            time.sleep(SLOW_COMMIT_S * 1.5)  # a disk that stalled
            self.last_commit_s = SLOW_COMMIT_S * 1.5

    monkeypatch.setattr(Spool, "_commit", slow_once)
    tracker = AckTracker()
    for first in (1, 5, 9):
        await committer.commit(_group(1024, tracker, first))
    assert threads[0] == threading.get_ident()  # the first, on the loop: slow
    assert all(t != threading.get_ident() for t in threads[1:])  # then in the worker
    assert committer.threaded_until > time.monotonic() + ingest.SLOW_DISK_HOLD_S - 5
    slow = [r for r in caplog.records if "committing in a worker thread" in r.getMessage()]
    assert len(slow) == 1  # one line per episode
    assert tracker.ack_ready == 12 and spool.total_count == 12
    monkeypatch.setattr(committer, "threaded_until", 0.0)  # the hold is over
    await committer.commit(_group(1024, tracker, 13))
    assert threads[-1] == threading.get_ident()
