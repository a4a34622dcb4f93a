"""The daemon's ingest side over a real Unix socket in a temporary directory, with a real
SQLite spool: handshake, cumulative acks after durable commit, validation errors that name the
field and keep the connection, fatal framing errors that close only that connection, many
concurrent clients, the socket file's mode and life cycle, status, and shutdown with events in
flight. Real I/O, so the real clock; every wait is bounded by ``trio.fail_after``."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from pfcollector.config import Config
from pfcollector.daemon import Daemon
from pfcollector.events import Kind
from pfcollector.protocol import Ack, Control, ErrorMsg, EventMsg, Reply, Welcome
from pfcollector.server import AddressInUse, bind_unix
from pfcollector.spool import Spool

from .wire import RawClient, event


async def until_ack(client: RawClient, seq: int) -> list[ErrorMsg]:
    """Read until an ack covering ``seq``; return the errors seen on the way."""
    errors = []
    with trio.fail_after(10):
        while True:
            msg = await client.recv()
            assert msg is not None, "daemon closed the connection"
            if isinstance(msg, ErrorMsg):
                errors.append(msg)
            elif isinstance(msg, Ack) and msg.seq >= seq:
                return errors


async def test_hello_events_and_cumulative_ack(local_daemon: Daemon) -> None:
    client = await RawClient.connect(local_daemon.config.socket_path)
    welcome = await client.hello()
    assert isinstance(welcome, Welcome) and welcome.version == 1
    for seq in range(1, 51):
        await client.send(event(seq))
    await client.send(event(51, Kind.CRASH))
    assert await until_ack(client, 51) == []
    rows = local_daemon.spool.read_after(0, 1000)
    assert len(rows) == 51
    crash = rows[-1].event
    assert crash.id == "ev-51-crash" and crash.kind is Kind.CRASH
    assert crash.fields["size"] == len(b"crash-51")
    input_file = Path(crash.fields["file_path"])  # written off the ack path, soon after
    with trio.fail_after(10):
        while not input_file.exists():
            await trio.sleep(0.01)
    assert input_file.read_bytes() == b"crash-51"
    assert crash.peer_pid == os.getpid()
    await client.aclose()


async def test_bad_field_is_named_and_connection_survives(local_daemon: Daemon) -> None:
    client = await RawClient.connect(local_daemon.config.socket_path)
    await client.hello()
    await client.send(event(1))
    await client.send(event(2, Kind.COVERAGE, edges=11.0))  # a float for an int field
    await client.send(event(3))
    errors = await until_ack(client, 3)
    assert len(errors) == 1
    assert errors[0].seq == 2 and errors[0].field == "edges" and not errors[0].fatal
    assert "edges" in errors[0].message
    assert [r.event.id for r in local_daemon.spool.read_after(0, 10)] == [
        "ev-1-coverage",
        "ev-3-coverage",
    ]
    status = await local_daemon.status()
    coverage = status["events"]["coverage"]
    assert coverage["rejected"] == 1 and coverage["refused"] == {"wrong_type": 1}
    assert coverage["received"] == 3 and coverage["accepted"] == 2  # every event that came in
    await client.aclose()


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1", "not_msgpack"),
        (struct.pack(">I", 1 << 30), "frame_too_large"),
    ],
)
async def test_fatal_frame_error_closes_only_that_connection(
    local_daemon: Daemon, payload: bytes, code: str
) -> None:
    bad = await RawClient.connect(local_daemon.config.socket_path)
    good = await RawClient.connect(local_daemon.config.socket_path)
    await good.hello()
    await bad.hello()
    await bad.send_raw(payload)
    with trio.fail_after(5):
        msg = await bad.recv()
        assert isinstance(msg, ErrorMsg) and msg.code == code and msg.fatal
        assert await bad.recv() is None  # closed by the daemon
    await good.send(event(1))
    assert await until_ack(good, 1) == []
    await bad.aclose()
    await good.aclose()


async def test_many_concurrent_clients(local_daemon: Daemon) -> None:
    clients, per_client = 80, 40

    async def one(n: int) -> None:
        client = await RawClient.connect(local_daemon.config.socket_path)
        await client.hello(job_id=f"job-{n % 4}", fuzzer=f"f{n}")
        for seq in range(1, per_client + 1):
            kind = Kind.CRASH if seq % 10 == 0 else Kind.COVERAGE
            fields = event(seq, kind).fields
            if kind is Kind.CRASH:
                fields = {**fields, "input": f"client {n} crash {seq}".encode()}  # distinct
            await client.send(EventMsg(seq, kind, fields, f"c{n}-{seq}", None, None))
        assert await until_ack(client, per_client) == []
        await client.aclose()

    async with trio.open_nursery() as nursery:
        for n in range(clients):
            nursery.start_soon(one, n)
    assert local_daemon.spool.total_count == clients * per_client
    status = await local_daemon.status()
    assert status["connections"]["total"] == clients
    assert status["events"]["crash"]["accepted"] == clients * per_client // 10


async def test_status_control_and_unknown_op(local_daemon: Daemon) -> None:
    client = await RawClient.connect(local_daemon.config.socket_path)
    await client.send(Control(7, "status", {}))  # allowed without hello
    reply = await client.recv()
    assert isinstance(reply, Reply) and reply.ok and reply.req == 7
    assert reply.result["mode"] == "local"
    assert reply.result["config"]["batch_size"] == 100
    assert reply.result["queue"]["capacity"] > 0
    await client.send(Control(8, "frobnicate", {}))
    reply = await client.recv()
    assert isinstance(reply, Reply) and not reply.ok and "frobnicate" in (reply.error or "")
    await client.aclose()


async def test_socket_mode_and_stale_and_live(
    make_config: Callable[..., Config], sock_dir: Path, nursery: trio.Nursery
) -> None:
    path = sock_dir / "pf.sock"
    stale = bind_unix(path, 0o600)
    stale.close()  # the file stays: a daemon that died
    assert path.exists()
    daemon: Daemon = await nursery.start(
        lambda task_status: Daemon(make_config(coalesce=False)).run(
            handle_signals=False, task_status=task_status
        )
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    with pytest.raises(AddressInUse, match="already listening"):
        bind_unix(path, 0o660)
    daemon.stop()
    with trio.fail_after(10):
        while path.exists():
            await trio.sleep(0.01)
    not_a_socket = sock_dir / "file"
    not_a_socket.write_text("x")
    with pytest.raises(AddressInUse, match="not a socket"):
        bind_unix(not_a_socket, 0o660)


async def test_shutdown_with_events_in_flight(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    config = make_config(coalesce=False)
    daemon: Daemon = await nursery.start(
        lambda task_status: Daemon(config).run(handle_signals=False, task_status=task_status)
    )
    acked: dict[int, int] = {}

    async def producer(n: int) -> None:
        client = await RawClient.connect(config.socket_path)
        await client.hello()
        seq = 0
        async with trio.open_nursery() as inner:

            async def reader() -> None:
                try:
                    while (msg := await client.recv()) is not None:
                        if isinstance(msg, Ack):
                            acked[n] = msg.seq
                except trio.BrokenResourceError:
                    pass  # the daemon closed while we still had bytes in flight

            inner.start_soon(reader)
            try:
                while True:
                    seq += 1
                    ev = event(seq, Kind.CRASH if seq % 3 == 0 else Kind.COVERAGE)
                    fields = dict(ev.fields)
                    if ev.kind is Kind.CRASH:
                        fields["input"] = f"producer {n} crash {seq}".encode()
                    await client.send(EventMsg(seq, ev.kind, fields, f"p{n}-{seq}", None, None))
                    await trio.lowlevel.checkpoint()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await client.aclose()

    async with trio.open_nursery() as producers:
        for n in range(8):
            producers.start_soon(producer, n)
        await trio.sleep(0.3)
        daemon.stop()
    with trio.fail_after(10):
        while daemon.spool._db is not None and daemon.server.connections:
            await trio.sleep(0.01)
        await trio.sleep(0.2)
    spool = Spool(config.spool_path)
    stored = {r.event.id for r in spool.read_after(0, 10**6)}
    spool.close()
    assert sum(acked.values()) > 0
    for n, upto in acked.items():  # every acknowledged event is in the spool
        missing = [s for s in range(1, upto + 1) if f"p{n}-{s}" not in stored]
        assert missing == [], f"producer {n}: acked but not stored: {missing[:5]}"
