"""The chaos suite in short mode, and the rude clients it uses, one at a time.

Rules of this module:

* ``benchmarks/chaos.py --quick`` runs as a subprocess (it starts its own master, daemon and
  producers, and cleans them up); the test asserts on its JSON result: nothing acknowledged
  lost, no duplicate at the master by id, no dead letter that was not poisoned on purpose,
  and a daemon that never exited on its own. The seed is printed and ``PFCOLLECTOR_CHAOS_SEED``
  replays one.
* The rude-client tests run a local-mode daemon in this test's trio run over a real Unix
  socket: a client that hangs up at any point of a frame costs its connection, never the
  daemon. Real I/O, so the real clock; every wait is bounded by ``trio.fail_after``.
* Nothing is asserted about timing (the machine is shared); every subprocess is waited for.
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from pfcollector.daemon import Daemon
from pfcollector.events import Kind
from pfcollector.protocol import Ack, EventMsg, Hello, Welcome, encode

from .wire import RawClient

CHAOS = Path(__file__).resolve().parent.parent / "benchmarks" / "chaos.py"


@pytest.mark.slow
def test_chaos_quick(tmp_path: Path) -> None:
    seed = int(os.environ.get("PFCOLLECTOR_CHAOS_SEED") or random.SystemRandom().getrandbits(32))
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, str(CHAOS), "--quick", "--seed", str(seed), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    print(proc.stdout)
    assert out.exists(), f"chaos.py wrote no result (exit {proc.returncode}):\n{proc.stderr}"
    result = json.loads(out.read_text())
    totals = result["totals"]
    assert result["daemon_died"] == 0, "the daemon exited on its own during the chaos"
    assert totals["lost"] == 0, result["examples"]["lost"]
    assert totals["duplicates_at_master"] == 0
    assert totals["wrongly_dead_lettered"] == 0, result["examples"]["wrongly_dead_lettered"]
    assert totals["poison_delivered"] == 0, result["examples"]["poison_delivered"]
    assert result["daemon_exit_code"] == 0
    assert result["per_kind"]["crash"]["acknowledged"] > 0
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _frames() -> tuple[bytes, bytes]:
    hello = encode(Hello(1, "rude", "chaos", 1))
    event = encode(EventMsg(1, Kind.CRASH, {"type": "SEGV", "input": b"x" * 300}, "rude-1"))
    return hello, event


async def _still_serves(daemon: Daemon) -> None:
    """A well-behaved client still gets its crash acknowledged."""
    with trio.fail_after(10):
        client = await RawClient.connect(daemon.config.socket_path)
        try:
            assert isinstance(await client.hello(), Welcome)
            await client.send(
                EventMsg(1, Kind.CRASH, {"type": "SEGV", "input": os.urandom(16)}, "polite-1")
            )
            while not isinstance(msg := await client.recv(), Ack):
                assert msg is not None, "daemon closed the polite connection"
        finally:
            await client.aclose()


async def _hang_up_after(path: Path, data: bytes, *, reset: bool = False) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(str(path))
        if data:
            await sock.send(data)
        if reset:  # close with unread data pending on our side: the daemon may see ECONNRESET
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


@pytest.mark.parametrize("cut", ["hello", "half_header", "half_body", "whole_event"])
async def test_client_hanging_up_costs_only_its_connection(local_daemon: Daemon, cut: str) -> None:
    """Hello then hang up (before the welcome is written), or hang up inside a frame.

    Bug found by the chaos suite: hanging up right after ``hello`` makes the daemon's write
    of ``welcome`` fail with EPIPE inside the connection's nursery; the resulting exception
    group is not caught by ``except (trio.BrokenResourceError, ...)`` in ``Server._handle``,
    and the whole daemon exits.
    """
    hello, event = _frames()
    data = {
        "hello": hello,
        "half_header": hello + event[:2],
        "half_body": hello + event[: len(event) // 2],
        "whole_event": hello + event,
    }[cut]
    with trio.fail_after(10):
        for _ in range(5):
            await _hang_up_after(local_daemon.config.socket_path, data)
            await trio.sleep(0.02)
    await _still_serves(local_daemon)


async def test_client_resetting_mid_frame_costs_only_its_connection(local_daemon: Daemon) -> None:
    hello, event = _frames()
    with trio.fail_after(10):
        for i in range(5):
            cut = hello + event[: 10 + i * 40]
            await _hang_up_after(local_daemon.config.socket_path, cut, reset=True)
            await trio.sleep(0.02)
    await _still_serves(local_daemon)
