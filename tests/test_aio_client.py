"""pfclient's asyncio (:class:`pfclient.aio.AsyncClient`) and trio
(:func:`pfclient.trio_client.open_trio_client`) clients against a live in-process daemon: every
kind, the crash ack, caller-made ids, rejections raised by flush, status, reconnect after the
connection breaks, an absent daemon. asyncio code runs under ``asyncio.run`` in a worker thread
(pytest runs trio; the daemon lives in the test's trio loop); no pytest-asyncio. The sans-I/O
:class:`pfclient.aio.Session` is checked on its own, and ``import pfclient`` never imports trio."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from pfclient import DaemonUnavailable, EventRejected
from pfclient._wire import encode_frame
from pfclient.aio import AsyncClient, Session
from pfclient.trio_client import open_trio_client
from pfcollector.daemon import Daemon
from pfcollector.events import Kind


def run_asyncio(coro_fn: Any, *args: Any) -> Any:
    return trio.to_thread.run_sync(lambda: asyncio.run(coro_fn(*args)))


async def test_asyncio_client_every_kind(local_daemon: Daemon) -> None:
    sock = local_daemon.config.socket_path

    async def main() -> dict[str, Any]:
        async with AsyncClient(sock, job_id="job-aio", fuzzer="aio") as pf:
            await pf.stats(executions=10, exec_per_second=2.5)
            await pf.coverage(5, new_edges=1, exec_count=10, id="aio-cov-1")
            await pf.corpus(["q/1", "q/2"], total_size=3)
            await pf.lifecycle("started", "hi")
            crash_id = await pf.crash("SIGSEGV", b"\x01\x02", signal=11)
            await pf.flush()
            with pytest.raises(ValueError, match="lifecycle kind"):
                await pf.lifecycle("nope")
            return {"crash": crash_id, "status": await pf.status()}

    with trio.fail_after(20):
        result = await run_asyncio(main)
    assert result["status"]["events"]["crash"]["accepted"] == 1
    events = {r.event.id: r.event for r in local_daemon.spool.read_after(0, 100)}
    crash = events[result["crash"]]
    assert crash.kind is Kind.CRASH and crash.fuzzer == "aio" and crash.fields["signal"] == 11
    assert events["aio-cov-1"].fields["edges"] == 5


async def test_asyncio_rejection_reconnect_and_absent_daemon(
    local_daemon: Daemon, tmp_path: Path
) -> None:
    sock = local_daemon.config.socket_path

    async def main() -> list[str]:
        pf = await AsyncClient(sock, job_id="job-aio", fuzzer="aio", timeout=5).connect()
        try:
            await pf.coverage(1, id="bad id!")  # refused: bad_id
            with pytest.raises(EventRejected) as info:
                await pf.flush()
            assert info.value.code == "bad_id" and pf.rejected
            with pytest.raises(EventRejected):
                await pf.crash("X", b"", signal=1, id="also bad!")
            # break the connection under the client: it reconnects and resends. Wait for the
            # daemon's last ack first: server.py's handler dies on a broken pipe while acking
            # (its except does not catch the nursery's ExceptionGroup; reported, not ours).
            await asyncio.sleep(0.2)
            assert pf._writer is not None
            pf._writer.transport.abort()
            await asyncio.sleep(0.05)
            ids = [await pf.coverage(n, id=f"aio-re-{n}") for n in range(3)]
            await pf.flush()
            return ids
        finally:
            await pf.aclose()

    async def absent() -> None:
        with pytest.raises(DaemonUnavailable, match="cannot reach"):
            await AsyncClient(tmp_path / "none.sock", job_id="j", fuzzer="f",
                              fail_open=False).connect()  # fmt: skip
        # fail-open (the default): nothing raises, the crash is kept in the outbox
        async with AsyncClient(tmp_path / "none.sock", job_id="j", fuzzer="f",
                               outbox=tmp_path / "aio-outbox") as pf:  # fmt: skip
            for n in range(1000):
                await pf.stats(executions=n)
            crash_id = await pf.crash("SEGV", b"kept", signal=11)
            assert not pf.connected and pf.outboxed == 1
        assert [p.name for p in (tmp_path / "aio-outbox").iterdir()] == [f"{crash_id}.pfev"]

    with trio.fail_after(20):
        ids = await run_asyncio(main)
        await run_asyncio(absent)
    stored = {r.event.id for r in local_daemon.spool.read_after(0, 100)}
    assert set(ids) <= stored


async def test_trio_client(local_daemon: Daemon, tmp_path: Path) -> None:
    sock = local_daemon.config.socket_path
    with trio.fail_after(20):
        async with open_trio_client(sock, job_id="job-trio", fuzzer="trio") as pf:
            crash_id = await pf.crash("SIGABRT", b"abc", signal=6, id="trio-crash-1")
            await pf.corpus(["x"], total_size=1, contents=[b"x"])
            await pf.stats(executions=1)
            await pf.flush()
            assert (await pf.status())["events"]["crash"]["accepted"] == 1
        with pytest.raises(DaemonUnavailable):
            async with open_trio_client(tmp_path / "none.sock", job_id="j", fuzzer="f",
                                        fail_open=False):  # fmt: skip
                pass  # pragma: no cover
        async with open_trio_client(tmp_path / "none.sock", job_id="j", fuzzer="f",
                                    outbox=tmp_path / "trio-outbox") as absent:  # fmt: skip
            await absent.stats(executions=1)
            kept = await absent.crash("SEGV", b"kept", signal=11)
        assert [p.name for p in (tmp_path / "trio-outbox").iterdir()] == [f"{kept}.pfev"]
    assert crash_id == "trio-crash-1"
    events = {r.event.id: r.event for r in local_daemon.spool.read_after(0, 100)}
    assert events["trio-crash-1"].fields["type"] == "SIGABRT"


def test_session_is_sans_io() -> None:
    s = Session("job", "fz")
    hello = s.hello(123)
    assert hello[4:] and s.welcome is None
    s.feed(encode_frame({"t": "welcome", "v": 1, "daemon": "x", "max_frame": 100}))
    assert s.max_frame == 100
    p1 = s.event("coverage", {"edges": 1}, None, 1.0, "a", waited=False)
    p2 = s.event("coverage", {"edges": 2}, None, 1.0, "b", waited=True)
    for p in (p1, p2):
        s.unacked[p.id] = p
        s.frame(p)
    with pytest.raises(EventRejected, match="frame_too_large"):
        s.event("crash", {"type": "X", "input": b"x" * 200}, None, None, None, waited=True)
    s.feed(
        encode_frame(
            {
                "t": "error",
                "code": "wrong_type",
                "message": "m",
                "seq": 2,
                "field": "edges",
                "fatal": False,
            }
        )
        + encode_frame({"t": "ack", "seq": 2})
    )
    assert p1.done and p2.done and p2.error is not None and p2.error.event_id == "b"
    assert not s.unacked and s.unreported == []  # p2 was waited on: its caller raises it
    s.hello(123)  # a reconnect starts seqs again
    p3 = s.event("coverage", {"edges": 3}, None, 1.0, "c", waited=False)
    s.unacked[p3.id] = p3
    assert [f[4:] for f in s.resend()] and p3.seq == 1


def test_pfclient_does_not_need_trio() -> None:
    code = "import sys, pfclient, pfclient.aio; assert 'trio' not in sys.modules, 'trio imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
