"""The spool on a real SQLite file: append is durable and idempotent by id, the size limit
drops only stats/coverage/lifecycle (never crash or corpus), settling moves events out, dead
letters come back on request, and everything survives closing and reopening. No event loop:
the spool is blocking by design."""

from __future__ import annotations

from pathlib import Path

import pytest

from pfcollector.events import Kind
from pfcollector.spool import Spool, SpoolCorrupt

from .conftest import make_event


def test_append_read_and_reopen(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    events = [make_event(Kind.COVERAGE, edges=i) for i in range(5)]
    assert spool.append(events) == [None] * 5
    spool.close()
    spool = Spool(tmp_path / "s.db")
    rows = spool.read_after(0, 100)
    assert [r.event.id for r in rows] == [e.id for e in events]
    assert [r.event.fields["edges"] for r in rows] == list(range(5))
    assert rows[0].event == events[0]
    assert spool.total_count == 5
    assert spool.read_after(rows[2].seq, 100)[0].event.id == events[3].id
    spool.close()


def test_same_id_twice_is_stored_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    event = make_event(Kind.CRASH)
    assert spool.append([event]) == [None]
    assert spool.append([event]) == [None]  # a producer's resend: accepted, not duplicated
    assert spool.total_count == 1
    assert spool.status()["crash"]["accepted"] == 1
    spool.close()


def test_delivered_and_dead_letters(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    a, b, c = (make_event(Kind.CORPUS) for _ in range(3))
    spool.append([a, b, c])
    assert spool.delivered([a.id]) == 1
    assert spool.dead_letter([(b.id, 400, "unknown field 'x'")]) == 1
    status = spool.status()["corpus"]
    assert (status["spooled"], status["delivered"], status["dead_letters"]) == (1, 1, 1)
    letters = spool.dead_letters()
    assert letters[0]["id"] == b.id and letters[0]["status"] == 400
    assert "unknown field" in letters[0]["error"]
    last = spool.read_after(0, 10)[-1].seq
    assert spool.retry_dead_letters() == 1
    again = spool.read_after(last, 10)
    assert [r.event.id for r in again] == [b.id]  # back in line, after the cursor
    assert spool.dead_letters() == []
    spool.close()


def test_note_retry_counts_attempts(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    e = make_event(Kind.COVERAGE)
    spool.append([e])
    spool.note_retry([e.id])
    spool.note_retry([e.id])
    assert spool.read_after(0, 1)[0].attempts == 2
    assert spool.status()["coverage"]["retried"] == 2
    spool.close()


def test_full_spool_drops_oldest_stats_but_refuses_crashes(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=1024 * 1024)
    big = "x" * 60_000
    crashes = [make_event(Kind.CRASH, output=big) for _ in range(10)]
    assert spool.append(crashes) == [None] * 10
    stats = [make_event(Kind.STATS, executions=i) for i in range(100)]
    results = spool.append(stats, [5000] * 100)
    assert all(r is None for r in results)
    assert spool.total_bytes <= spool.max_bytes
    status = spool.status()
    assert status["stats"]["dropped"] > 0
    kept = [
        r.event.fields["executions"]
        for r in spool.read_after(0, 1000)
        if r.event.kind is Kind.STATS
    ]
    assert kept == sorted(kept) and kept[-1] == 99  # the newest survive
    more = [make_event(Kind.CRASH, output=big) for _ in range(10)]
    refused = spool.append(more)
    assert "spool_full" in refused  # crashes are refused with an error, never dropped
    assert status["crash"]["dropped"] == 0
    assert spool.status()["crash"]["refused"] == refused.count("spool_full")
    assert spool.status()["crash"]["spooled"] == 10 + refused.count(None)
    spool.close()


def test_corrupt_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SpoolCorrupt, match="cannot be read"):
        Spool(path)


def test_meta_survives(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    spool.set_meta("bot_id", "bot-7")
    spool.close()
    spool = Spool(tmp_path / "s.db")
    assert spool.get_meta("bot_id") == "bot-7"
    assert spool.check() == "ok"
    spool.close()


def test_retrying_a_dead_letter_already_back_in_the_spool_counts_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    ev = make_event(Kind.CRASH)
    spool.append([ev])
    spool.dead_letter([(ev.id, 400, "bad")])
    spool.append([ev])  # the producer sent it again: stored under its id
    before = (spool.total_count, spool.total_bytes)
    assert spool.retry_dead_letters() == 0  # not stored twice, so not requeued
    assert (spool.total_count, spool.total_bytes) == before
    spool.close()
    reopened = Spool(tmp_path / "s.db")  # the totals as counted from the rows
    assert (reopened.total_count, reopened.total_bytes) == before
    assert reopened.dead_letters() == []
    reopened.close()


def test_forgotten_rows_are_not_overwritten_with_zeros(tmp_path: Path) -> None:
    """Debian's SQLite zeroes every deleted byte (secure_delete=ON): each journalled input
    and delivered row was written twice (benchmarks/journal_churn.py: 190 MiB written for
    62.5 MiB of blobs, 96 MiB with FAST). The spool asks for FAST on every connection."""
    spool = Spool(tmp_path / "s.db")
    try:
        (mode,) = spool._db.execute("PRAGMA secure_delete").fetchone()
    finally:
        spool.close()
    assert mode == 2  # FAST


def test_forgetting_commits_without_its_own_fsync_and_puts_full_back(tmp_path: Path) -> None:
    """Dropping journalled inputs and delivered rows commits with synchronous=NORMAL (a lost
    forget costs a rewrite or a resend, never an event: journal.py); the group commit after
    it is FULL again, also when the forgetting transaction failed."""
    spool = Spool(tmp_path / "s.db")
    try:
        seen: list[int] = []
        with spool._lock, spool._forgetting() as db:
            seen.append(db.execute("PRAGMA synchronous").fetchone()[0])
        assert seen == [1]  # NORMAL
        assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        with pytest.raises(RuntimeError), spool._lock, spool._forgetting():
            raise RuntimeError("a failed forget")
        assert spool._db.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert not spool._db.in_transaction
    finally:
        spool.close()
