"""No terminal escapes from outside (issue 15, docs/security.md "The master and the network").

A hostile master answers with an error text that would retitle the operator's terminal and
wipe a line; a client names its job with bidi controls. ``status``, ``status --watch`` and
``dead-letters list`` print them escaped.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trio
from typer.testing import CliRunner, Result

from pfcollector.cli import app
from pfcollector.config import Config
from pfcollector.events import Kind
from pfcollector.statusview import printable
from tests.conftest import start_daemon
from tests.wire import RawClient, event

HOSTILE = "\x1b]0;owned-title\x07\x1b[2K\r\x9b31m\u202eevil\u2066 \x7f"
UNSAFE = ("\x1b", "\x07", "\r", "\x9b", "\u202e", "\u2066", "\x7f")


@pytest.fixture
def hostile_master() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.dumps({"error": "bad", "details": HOSTILE}).encode()
            self.send_response(500 if "results/status" in self.path else 400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


async def cli(*args: str) -> Result:
    return await trio.to_thread.run_sync(lambda: CliRunner().invoke(app, list(args)))


def assert_escaped(where: str, text: str) -> None:
    for char in UNSAFE:
        assert char not in text, f"{char!r} printed raw by {where}: {text!r}"
    assert "\\x1b]0;owned-title\\x07" in text, f"{where} does not show the text: {text!r}"


async def test_status_and_dead_letters_print_the_masters_text_escaped(
    make_config: Callable[..., Config], nursery: trio.Nursery, hostile_master: str
) -> None:
    config = make_config(
        master_url=hostile_master,
        bot_id="bot-1",
        coalesce=False,
        flush_interval=0.1,
        retry_attempts=1,
        retry_base=0.01,
        retry_cap=0.02,
    )
    daemon = await start_daemon(nursery, config)
    client = await RawClient.connect(config.socket_path)
    await client.hello(job_id="job\u202eevil", fuzzer="afl\u2066")
    await client.send(event(1, Kind.CRASH))  # 400: a dead letter with the hostile text
    await client.send(event(2, Kind.STATS))  # 500: the last error is the hostile text
    with trio.fail_after(15):
        while not (
            daemon.spool.dead_letters(10)
            and daemon.sender is not None
            and "owned" in (daemon.sender.stats.last_error or "")
        ):
            await trio.sleep(0.02)
    sock = str(config.socket_path)
    status = await cli("status", "--socket", sock)
    watch = await cli("status", "--socket", sock, "--watch", "--count", "1")
    letters = await cli("dead-letters", "list", "--socket", sock)
    as_json = await cli("status", "--socket", sock, "--json")
    await client.aclose()
    daemon.stop()
    for where, result in (("status", status), ("status --watch", watch)):
        assert result.exit_code == 0, result.output
        assert_escaped(where, result.output)
    assert "job\\u202eevil / afl\\u2066" in status.output  # the client's names, escaped too
    assert letters.exit_code == 0
    assert_escaped("dead-letters list", letters.output)
    assert HOSTILE in json.loads(as_json.output)["delivery"]["sender"]["last_error"]["text"]
    assert "\x1b" not in as_json.output  # JSON escapes it: --json is safe as it is


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text, ünïcode and 日本", "plain text, ünïcode and 日本"),
        ("\x1b[2J", "\\x1b[2J"),
        ("a\tb\nc", "a\\x09b\\x0ac"),
        ("\x85\x9b\x7f", "\\x85\\x9b\\x7f"),
        ("\u202e\u200f\u061c\u2069", "\\u202e\\u200f\\u061c\\u2069"),
    ],
)
def test_printable(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_bug_views_escape_the_targets_text() -> None:
    """Crash types and frames come from the target's report: escaped, frames still split."""
    from pfcollector.bugview import format_bugs

    row = {
        "job_id": "job\u202e",
        "bug": "abc123",
        "hits": 2,
        "first_ns": 0,
        "last_ns": 0,
        "type": "heap\x1b]0;owned\x07",
        "signature": "heap\nframe_one\x1b[2K\nframe_two",
    }
    line = format_bugs([row], now_ns=0)[1]
    for char in UNSAFE:
        assert char not in line
    assert "heap\\x1b]0;owned\\x07  in frame_one\\x1b[2K < frame_two" in line
    assert "job\\u202e" in line
