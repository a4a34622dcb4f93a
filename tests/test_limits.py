"""Connection limits, in virtual time (``autojump_clock``) over a real Unix socket: the daemon
and its clients share one trio run, and these tests send nothing that needs a spool commit (a
worker thread), so the clock only jumps when every task is waiting on a deadline. Rules: each
violation gets a fatal error naming the limit, closes that connection only, and is counted in
``status``; other clients carry on."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from pfcollector.config import Config, ConfigError
from pfcollector.events import Kind
from pfcollector.ingest import Pending
from pfcollector.protocol import Ack, ErrorMsg, Welcome
from pfcollector.server import Limits, Server

from .conftest import start_daemon
from .wire import RawClient, event


def limited(make_config: Callable[..., Config], **limits: Any) -> Config:
    """A config with only the limits under test: under the autojump clock, virtual time jumps
    while a status query waits on its worker thread, so an unrelated hour-long idle timeout
    would fire. Timeouts not named are off."""
    return make_config(**{"idle_timeout": 0, "slow_sender_timeout": 0, **limits})


async def fatal_error(client: RawClient) -> ErrorMsg:
    """The fatal error the daemon sends before it closes the connection (acks may follow)."""
    fatal = [m for m in [msg async for msg in _until_eof(client)] if isinstance(m, ErrorMsg)]
    assert fatal, "no error before the daemon closed the connection"
    assert fatal[-1].fatal
    return fatal[-1]


async def _until_eof(client: RawClient) -> AsyncIterator[object]:
    while (msg := await client.recv()) is not None:
        yield msg


async def test_idle_timeout(
    make_config: Callable[..., Config],
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    daemon = await start_daemon(nursery, limited(make_config, idle_timeout=60.0))
    quiet = await RawClient.connect(daemon.config.socket_path)
    await quiet.hello()
    start_time = trio.current_time()
    error = await fatal_error(quiet)
    assert error.code == "idle_timeout"
    assert trio.current_time() - start_time == pytest.approx(60.0, abs=0.5)
    assert (await daemon.status())["errors"]["idle_timeout"] == 1
    await quiet.aclose()
    daemon.stop()


async def test_slow_sender_half_a_frame(
    make_config: Callable[..., Config],
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    daemon = await start_daemon(
        nursery, limited(make_config, slow_sender_timeout=5.0, idle_timeout=0)
    )
    slow = await RawClient.connect(daemon.config.socket_path)
    good = await RawClient.connect(daemon.config.socket_path)
    assert isinstance(await slow.hello(), Welcome)
    await good.hello()
    await slow.send_raw(struct.pack(">I", 100) + b"\x85" + b"\xa1t" * 10)  # 21 of 100 bytes
    error = await fatal_error(slow)
    assert error.code == "slow_sender"
    await good.send(event(1, Kind.STATS))  # the other client is untouched
    assert isinstance(await good.recv(), Ack)
    await slow.aclose()
    await good.aclose()
    daemon.stop()


async def test_trickling_bytes_do_not_reset_the_frame_clock(
    make_config: Callable[..., Config],
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    daemon = await start_daemon(
        nursery, limited(make_config, slow_sender_timeout=5.0, idle_timeout=0)
    )
    slow = await RawClient.connect(daemon.config.socket_path)
    await slow.hello()
    await slow.send_raw(struct.pack(">I", 100))
    sent = 0
    with contextlib.suppress(trio.BrokenResourceError):
        for _ in range(20):  # one byte a second never completes the frame in time
            await trio.sleep(1.0)
            await slow.send_raw(b"\xa1")
            sent += 1
    assert sent < 10
    await slow.aclose()
    assert (await daemon.status())["errors"]["slow_sender"] == 1
    daemon.stop()


async def test_rate_limit(
    make_config: Callable[..., Config],
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    daemon = await start_daemon(nursery, limited(make_config, rate_limit=100.0))
    fast = await RawClient.connect(daemon.config.socket_path)
    await fast.hello()
    for seq in range(1, 101):  # the bucket holds one second's worth
        await fast.send(event(seq, Kind.STATS))
    await trio.sleep(0.5)  # refills 50
    with contextlib.suppress(trio.BrokenResourceError):  # the daemon closes on the violation
        for seq in range(101, 300):
            await fast.send(event(seq, Kind.STATS))
    error = await fatal_error(fast)
    assert error.code == "rate_limited"
    status = await daemon.status()
    assert status["errors"]["rate_limited"] == 1
    assert 140 <= status["events"]["stats"]["accepted"] <= 160
    await fast.aclose()
    daemon.stop()


async def test_uid_allowlist(
    make_config: Callable[..., Config],
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    me = os.getuid()
    daemon = await start_daemon(nursery, limited(make_config, allow_uids=f"{me + 4242}"))
    client = await RawClient.connect(daemon.config.socket_path)
    error = await fatal_error(client)
    assert error.code == "peer_not_allowed"
    assert str(me) in error.message
    await client.aclose()
    daemon.stop()


async def test_gid_allowlist_admits(
    make_config: Callable[..., Config],
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    daemon = await start_daemon(
        nursery, limited(make_config, allow_uids="4242", allow_gids=str(os.getgid()))
    )
    client = await RawClient.connect(daemon.config.socket_path)
    assert isinstance(await client.hello(), Welcome)
    status = await daemon.status()
    (live,) = status["connections"]["live"]
    assert (live["uid"], live["gid"], live["pid"]) == (os.getuid(), os.getgid(), os.getpid())
    await client.aclose()
    daemon.stop()


async def test_max_connections(
    make_config: Callable[..., Config],
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    daemon = await start_daemon(nursery, limited(make_config, max_connections=2))
    first = await RawClient.connect(daemon.config.socket_path)
    second = await RawClient.connect(daemon.config.socket_path)
    await first.hello()
    await second.hello()
    third = await RawClient.connect(daemon.config.socket_path)
    assert (await fatal_error(third)).code == "too_many_connections"
    await first.send(event(1, Kind.STATS))
    assert isinstance(await first.recv(), Ack)
    for c in (first, second, third):
        await c.aclose()
    daemon.stop()


async def test_socket_group(
    make_config: Callable[..., Config],
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    daemon = await start_daemon(nursery, limited(make_config, socket_group=str(os.getgid())))
    assert daemon.config.socket_path.stat().st_gid == os.getgid()
    daemon.stop()


def test_limit_settings_are_validated(make_config: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError, match="allow_uids"):
        make_config(allow_uids="root")
    with pytest.raises(ConfigError, match="socket_group: no group named"):
        make_config(socket_group="no-such-group-pf")
    with pytest.raises(ConfigError, match="idle_timeout"):
        make_config(idle_timeout=-1)


async def _no_control(op: str, args: object, peer: object) -> None:
    return None


async def test_backpressure_is_never_punished_as_a_slow_sender(
    sock_dir: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The daemon holds a producer back (its ingest channel is full) for 3x the slow-sender
    timeout while frames span several reads; the producer writes all along and is never
    disconnected. Then a producer that really stalls mid-frame still is."""
    send, recv = trio.open_memory_channel[Pending](1)
    limits = Limits(slow_sender_timeout=5.0, idle_timeout=0)
    server = Server(sock_dir / "bp.sock", send, _no_control, limits=limits)
    await nursery.start(server.serve)
    client = await RawClient.connect(sock_dir / "bp.sock")
    assert isinstance(await client.hello(), Welcome)
    big = [event(seq, Kind.CRASH, input=bytes([seq]) * 300_000) for seq in range(1, 21)]

    async def produce() -> None:
        for ev in big:  # frames larger than one read: each spans reads
            await client.send(ev)

    nursery.start_soon(produce)
    await trio.sleep(3 * limits.slow_sender_timeout)  # the daemon does not take events
    assert server.budget.waiting + send.statistics().tasks_waiting_send > 0  # held back

    async def commit() -> None:
        async for item in recv:
            item.tracker.settle(item.seq, None)
            if item.hold is not None:
                item.hold.release()
            await trio.sleep(1.0)  # a slow spool: the producer stays held back

    nursery.start_soon(commit)
    with trio.fail_after(300):
        while True:
            msg = await client.recv()
            assert not isinstance(msg, ErrorMsg), msg
            if isinstance(msg, Ack) and msg.seq == big[-1].seq:
                break
    assert server.stats.errors["slow_sender"] == 0
    # A real stall mid-frame: half a frame, then nothing.
    await client.send_raw(struct.pack(">I", 100) + b"\x85" + b"\xa1t" * 10)
    error = await fatal_error(client)
    assert error.code == "slow_sender"
    await client.aclose()
    server.stop()
