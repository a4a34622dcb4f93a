"""The cumulative ack's one rule, tested without sockets: an ack covering a seq is sent only
after every error for seqs up to it. (A group that failed while earlier errors were being
sent once made the ack overtake its own error, so a client took a refused event as stored.)"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from pfcollector import acks
from pfcollector.acks import AckTracker, run_acker
from pfcollector.config import Config
from pfcollector.events import Kind
from pfcollector.ingest import Pending
from pfcollector.protocol import Ack, ErrorMsg, ServerMessage, encode
from pfcollector.server import Server

from .conftest import start_daemon
from .wire import RawClient, event, exchange


async def _no_control(op: str, args: object, peer: object) -> None:
    return None


def check_order(sent: list[ServerMessage]) -> None:
    errors_sent: set[int] = set()
    for msg in sent:
        if isinstance(msg, ErrorMsg) and msg.seq is not None:
            errors_sent.add(msg.seq)
        if isinstance(msg, Ack):
            assert all(s in errors_sent for s in REFUSED if s <= msg.seq), (msg, sent)


REFUSED = (2, 3, 5)


async def test_ack_never_overtakes_an_error(autojump_clock: trio.testing.MockClock) -> None:
    tracker = AckTracker()
    for seq in range(1, 7):
        tracker.submitted(seq)
    sent: list[ServerMessage] = []

    async def send(msg: ServerMessage | None) -> None:  # None: only what is left over
        if msg is not None:
            sent.append(msg)
        if isinstance(msg, ErrorMsg) and msg.seq == 2:
            # While the first error is on its way, the later groups settle (one fails).
            tracker.settle(4, None)
            tracker.settle(5, ("disk_full", "full"))
            tracker.settle(6, None)
        await trio.sleep(0.01)

    channel, _ = trio.open_memory_channel[Pending](1)
    server = Server(Path("/nonexistent"), channel, _no_control)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_acker, tracker, send, server.stats)
        tracker.settle(1, None)
        tracker.settle(2, ("disk_full", "full"))
        tracker.settle(3, ("disk_full", "full"))
        with trio.fail_after(5):
            while not any(isinstance(m, Ack) and m.seq == 6 for m in sent):
                await trio.sleep(0.01)
        tracker.close()
    check_order(sent)
    assert [m.seq for m in sent if isinstance(m, ErrorMsg)] == [2, 3, 5]


async def test_acker_sends_the_last_ack_before_it_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tracker = AckTracker()
    tracker.submitted(1)
    sent: list[ServerMessage] = []

    async def send(msg: ServerMessage | None) -> None:  # None: only what is left over
        if msg is not None:
            sent.append(msg)
        await trio.sleep(0.01)

    channel, _ = trio.open_memory_channel[Pending](1)
    server = Server(Path("/nonexistent"), channel, _no_control)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_acker, tracker, send, server.stats)
        tracker.settle(1, None)
        tracker.close()
    assert sent == [Ack(1)]


def test_a_commit_acks_at_once_but_leaves_errors_and_a_busy_sender_to_the_acker() -> None:
    """The group commit sends a ready ack itself (ack_or_wake); the acker is woken only when
    an error must go first, the connection is closing, or send_now cannot write."""
    tracker = AckTracker()
    written: list[int] = []
    accept = True

    def send_now(seq: int) -> bool:
        if accept:
            written.append(seq)
        return accept

    tracker.send_now = send_now
    for seq in (1, 2, 3):
        tracker.submitted(seq)
    tracker.settle(1, None, wake=False)
    tracker.settle(2, None, wake=False)
    tracker.ack_or_wake()
    assert written == [2] and tracker.acked == 2 and not tracker.changed.is_set()
    tracker.settle(3, ("spool_full", "full"), "crash", wake=False)
    tracker.ack_or_wake()  # an error is due before the ack that covers it
    assert written == [2] and tracker.changed.is_set() and tracker.acked == 2
    tracker.errors.clear()
    tracker.changed = trio.Event()
    accept = False  # the connection's sender is busy, or the socket full
    tracker.submitted(4)
    tracker.settle(4, None, wake=False)
    tracker.ack_or_wake()
    assert tracker.changed.is_set() and tracker.acked == 2  # the acker sends it


async def test_an_ack_written_in_part_is_finished_before_anything_else(
    make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    """send_now() writes to a non-blocking socket: what did not fit goes out first with the
    acker's next send, so the client reads whole frames (here: 3 bytes written at a time)."""
    real_write = os.write
    short = 0

    def short_write(fd: int, data: bytes) -> int:
        nonlocal short
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return real_write(fd, data)  # os is os: the input writer's files are not acks
        short += 1
        return real_write(fd, bytes(data[:3]))

    monkeypatch.setattr(acks.os, "write", short_write)
    config = make_config()
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config)
        client = await RawClient.connect(config.socket_path)
        await client.hello()
        for seq in (1, 2, 3):  # one event, one group, one ack: nothing else carries the rest
            assert await exchange(client, [event(seq, Kind.CRASH, input=bytes([seq]))]) == []
        await client.aclose()
        daemon.stop()
    assert short == 3  # every ack went the short way


@pytest.mark.parametrize(
    "seq",
    [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0xFFFFFFFF, 0x100000000, 2**63 - 1, -1],
)
def test_an_ack_frame_is_what_encode_writes(seq: int) -> None:
    """The per-crash ack is written without a packer; its bytes must stay encode's."""
    assert acks.ack_frame(seq) == encode(Ack(seq))
