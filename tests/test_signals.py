"""Signals, on a real daemon process (``python -m pfcollector serve``) with a real socket and
spool. Rules: SIGTERM stops accepting, drains, exits 0; a second SIGTERM ends the drain at once
(everything stays in the spool) and still exits 0; SIGHUP during the drain does not kill it;
and in-process, ``stop()`` returns even when signal handling is on. Every wait is bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

import pfclient
from pfcollector.config import Config
from pfcollector.daemon import Daemon
from pfcollector.spool import Spool


def wait_for(pred: Callable[[], bool], limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_second_sigterm_ends_the_drain_and_sighup_is_harmless(
    tmp_path: Path, sock_dir: Path
) -> None:
    sock = sock_dir / "pf.sock"
    data = tmp_path / "data"
    # A master that is not there: the drain would wait its whole 120 s deadline.
    cmd = [sys.executable, "-m", "pfcollector", "serve", "--socket", str(sock), "--data-dir",
           str(data), "--master", "http://127.0.0.1:9", "--bot-id", "b", "--drain-deadline",
           "120", "--no-coalesce"]  # fmt: skip
    # A breaker that does not open: a drain with the breaker open ends at once on its own.
    env = {**os.environ, "PFCOLLECTOR_BREAKER_THRESHOLD": "1000"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(sock.exists)
        with pfclient.Client(str(sock), job_id="j", fuzzer="f") as client:
            for i in range(20):
                client.crash("SEGV", f"input {i}".encode(), signal=11)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGHUP)  # during the drain: logged, not fatal
        time.sleep(0.3)
        assert proc.poll() is None
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10  # far from the 120 s drain deadline
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=10)
    assert "ending the drain" in err
    assert "SIGHUP" in err
    spool = Spool(data / "spool.db")
    assert spool.total_count == 20  # all kept for the next start
    spool.close()


async def test_stop_returns_with_signal_handling_on(
    make_config: Callable[..., Config],
) -> None:
    config = make_config()
    with trio.fail_after(10):  # run() must return: the signal task must not hold it open
        async with trio.open_nursery() as nursery:
            daemon: Daemon = await nursery.start(
                lambda task_status: Daemon(config).run(task_status=task_status)
            )
            assert config.socket_path.exists()
            daemon.stop()
    assert not config.socket_path.exists()
