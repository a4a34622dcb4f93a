"""The cumulative ack's one rule, tested without sockets: an ack covering a seq is sent only
after every error for seqs up to it. (A group that failed while earlier errors were being
sent once made the ack overtake its own error, so a client took a refused event as stored.)"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from pfcollector.ingest import AckTracker, Pending
from pfcollector.protocol import Ack, ErrorMsg, ServerMessage
from pfcollector.server import Server


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

    async def send(msg: ServerMessage) -> None:
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
        nursery.start_soon(server._acker, tracker, send)
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

    async def send(msg: ServerMessage) -> None:
        sent.append(msg)
        await trio.sleep(0.01)

    channel, _ = trio.open_memory_channel[Pending](1)
    server = Server(Path("/nonexistent"), channel, _no_control)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server._acker, tracker, send)
        tracker.settle(1, None)
        tracker.close()
    assert sent == [Ack(1)]
