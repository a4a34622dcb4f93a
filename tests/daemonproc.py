"""A real ``pfcollector serve`` subprocess delivering to a reference master, for client tests.

The C and Go client tests drive the daemon from outside, as a harness would: a separate
process on a real socket and data directory, stopped with SIGTERM (after a SIGCONT, in case a
test left it stopped) and killed only if it does not exit.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import pfclient

__all__ = ["serve_process", "wait_for"]


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    """Poll ``check`` every 50 ms; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def serve_process(
    sock: Path, data: Path, master_url: str, *, start_timeout: float = 20.0
) -> Iterator[subprocess.Popen[str]]:
    """A daemon on ``sock`` and ``data`` delivering to ``master_url`` (bot id ``b``, flushing
    every 0.2 s), once it answers ``status``; stopped on the way out."""
    cmd = [sys.executable, "-m", "pfcollector", "serve", "--socket", str(sock),
           "--data-dir", str(data), "--master", master_url, "--bot-id", "b",
           "--flush-interval", "0.2", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                pytest.fail(f"the daemon exited with {proc.returncode}: {err}")
            try:
                pfclient.status(sock, timeout=1.0)
            except pfclient.PfClientError:
                return False
            return True

        wait_for("the daemon to answer status", ready, start_timeout)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
