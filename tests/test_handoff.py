"""The rows a group commit stores reach the delivery pipeline from memory, not read back.

Rules: what the commit hands over is exactly what the spool would read back; the pipeline takes
it only when it is the very next part of the spool (no row of another writer in between, no
read under way) and it has room; otherwise it reads the spool as before. Either way every
event is delivered once. Real SQLite spool, virtual time (``autojump_clock``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import trio

from pfcollector.acks import AckTracker
from pfcollector.events import Event, Kind
from pfcollector.ingest import GroupCommitter, Pending
from pfcollector.inputs import InputStore
from pfcollector.pipeline import BatchPolicy, Pipeline
from pfcollector.sender import Batch, DeliveryResult
from pfcollector.spool import Spool, Spooled
from pfcollector.typed import decode_event

from .conftest import make_event

#: Events as the daemon's decoder makes them, one of each shape the spool stores.
FRAMES: list[dict[str, Any]] = [
    {"kind": "crash", "type": "SEGV", "signal": 11, "input": b"\x00crash one",
     "output": "==1==ERROR: AddressSanitizer: heap-buffer-overflow\n", "stack_trace": "#0 f"},
    {"kind": "crash", "type": "ABRT", "input": b"", "output": "\u00e9\u4e2d\U0001f600"},
    {"kind": "coverage", "edges": 2**40, "new_edges": 0, "exec_count": 7},
    {"kind": "corpus", "files": ["id:000001", "id:000002"], "total_size": 9},
    {"kind": "corpus", "files": ["a", "b"], "contents": [b"aa", b"bbb"]},
    {"kind": "stats", "executions": 5, "exec_per_second": 1.5, "coverage_percent": 12.25},
    {"kind": "error", "message": "target exited"},
]  # fmt: skip


def _decoded(seq: int, frame: dict[str, Any], job: str = "job-1") -> Pending:
    decoded = decode_event(msgpack.packb({"t": "event", "seq": seq, **frame}, use_bin_type=True))
    assert decoded is not None, frame
    _, kind, fields, _, _, _ = decoded
    data = fields.pop("input") if kind is Kind.CRASH else None
    if kind is Kind.CORPUS:
        data = fields.pop("contents")
    event = Event(f"ev-{job}-{seq}", kind, job, "afl", 1_700_000_000_000_000_000 + seq, fields,
                  4242, 1000)  # fmt: skip
    return Pending(event, data, AckTracker(), seq)


def _committer(tmp_path: Path, spool: Spool) -> GroupCommitter:
    return GroupCommitter(spool, InputStore(tmp_path / "inputs"))


async def test_the_rows_handed_over_are_what_the_spool_reads_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    committer = _committer(tmp_path, spool)
    handed: list[Spooled] = []
    committer.hand_rows_to(handed.extend)
    await committer.commit([_decoded(i, frame) for i, frame in enumerate(FRAMES, start=1)])
    # A second group: a resend of an id already stored and a repeat of a known crash input
    # (deduped) are not rows; the new one is.
    again = [_decoded(1, FRAMES[0]), _decoded(50, FRAMES[0]), _decoded(51, FRAMES[2])]
    await committer.commit(again)
    read_back = spool.read_after(0, 100)
    assert len(read_back) == len(FRAMES) + 1
    assert handed == read_back  # seq, fields (their types too), sizes and attempts


def test_a_row_that_made_room_within_its_own_group_is_not_handed_over(tmp_path: Path) -> None:
    # Room for about two stats rows: the group's later rows drop its earlier ones.
    spool = Spool(tmp_path / "s.db", max_bytes=2 * len(msgpack.packb({"executions": 5})) + 1)
    stored: list[Spooled] = []
    events = [make_event(Kind.STATS) for _ in range(5)]
    assert spool.append(events, stored=stored) == [None] * 5
    assert stored == spool.read_after(0, 100)
    assert 0 < len(stored) < 5


class Master:
    """Delivers every batch and counts each event it was sent."""

    def __init__(self) -> None:
        self.ids: Counter[str] = Counter()

    async def send(self, batch: Batch) -> DeliveryResult:
        self.ids.update(event.id for event in batch.events)
        await trio.sleep(0.01)
        return DeliveryResult(delivered=[event.id for event in batch.events])


class Setup:
    """A spool, its group commit handing rows to a pipeline, and a counting master."""

    def __init__(self, tmp_path: Path, nursery: trio.Nursery, **kw: Any) -> None:
        self.spool = Spool(tmp_path / "s.db")
        self.reads = 0
        self.before_read: Callable[[], Any] | None = None
        self.pipeline = Pipeline(self.spool, BatchPolicy(100, 512 * 1024, 0.5),
                                 offload=self._offload, **kw)  # fmt: skip
        self.committer = _committer(tmp_path, self.spool)
        self.committer.hand_rows_to(self.pipeline.offer)
        self.master = Master()
        send, recv = trio.open_memory_channel[Batch](4)
        nursery.start_soon(self.pipeline.run, send)
        nursery.start_soon(self.pipeline.deliver, recv, self.master.send)
        self._seq = 0

    async def _offload(self, fn: Callable[..., Any], *args: Any) -> Any:
        if fn == self.spool.read_after:
            self.reads += 1
            if self.before_read is not None:
                await self.before_read()
        return fn(*args)

    async def commit(self, n: int) -> list[str]:
        group = []
        for _ in range(n):
            self._seq += 1
            group.append(_decoded(self._seq, {"kind": "crash", "type": "SEGV",
                                              "input": b"in%d" % self._seq}))  # fmt: skip
        await self.committer.commit(group)
        return [item.event.id for item in group]

    async def delivered(self, ids: list[str]) -> None:
        with trio.fail_after(120):
            while not set(ids) <= set(self.master.ids) or self.spool.total_count:
                await trio.sleep(0.05)
        assert set(self.master.ids) == set(ids)
        assert max(self.master.ids.values()) == 1, "an event was delivered twice"


async def test_rows_just_committed_are_taken_from_memory(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    s = Setup(tmp_path, nursery)
    await trio.sleep(1)  # the pipeline's first read: an empty spool
    assert s.reads == 1
    ids: list[str] = []
    for n in (1, 8, 30, 3):
        ids += await s.commit(n)
        await trio.sleep(0.2)
    await s.delivered(ids)
    assert s.reads == 1  # not one read-back


async def test_rows_of_another_writer_in_between_are_read_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Dead letters put back in line take sequence numbers between two commits. The next
    commit's rows are not the next rows then: the pipeline reads the spool, and gets both."""
    s = Setup(tmp_path, nursery)
    poisoned = await s.commit(2)
    s.spool.dead_letter([(id_, 400, "bad") for id_ in poisoned])
    ids = await s.commit(3)
    await s.delivered(ids)
    reads = s.reads
    assert s.spool.retry_dead_letters() == 2  # new seqs; the pipeline is not told here
    later = await s.commit(4)
    await s.delivered(poisoned + ids + later)
    assert s.reads > reads


async def test_rows_committed_while_a_read_is_under_way_are_read_back(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    s = Setup(tmp_path, nursery)
    first = await s.commit(5)
    await trio.sleep(1)
    late: list[str] = []

    async def commit_meanwhile() -> None:  # the read took its snapshot; a commit lands
        s.before_read = None
        late.extend(await s.commit(6))

    s.before_read = commit_meanwhile
    s.pipeline.notify()  # something else woke the pipeline to read (a requeue, say)
    with trio.fail_after(10):
        while not late:
            await trio.sleep(0.01)
    await s.delivered(first + late)


async def test_a_group_bigger_than_the_room_left_is_read_back_later(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    s = Setup(tmp_path, nursery, max_held=10)
    await trio.sleep(1)  # the pipeline's first read: an empty spool
    ids = await s.commit(25)  # more than the pipeline may hold: it reads in turns
    ids += await s.commit(4)
    await s.delivered(ids)
    assert s.reads > 1
