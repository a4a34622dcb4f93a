"""The command line against a live daemon: status, watch, tune, flush, dead letters, errors.

Rules of this module: commands run through typer's ``CliRunner`` in a worker thread
(``trio.to_thread``) while the daemon runs in this test's trio run, since the commands block on
the socket; every failure path is checked to be one line on stderr and exit code 1 (a daemon
that is not there) or 2 (a bad setting), never a traceback; logging is restored after commands
that configure it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import trio
from typer.testing import CliRunner, Result

from pfcollector.cli import app
from pfcollector.daemon import Daemon
from pfcollector.events import Kind
from pfcollector.protocol import Ack
from pfcollector.statusview import format_watch, refusal_lines
from tests.wire import RawClient, event

pytestmark = pytest.mark.usefixtures("restore_logging")

runner = CliRunner()


async def cli(*args: str) -> Result:
    return await trio.to_thread.run_sync(lambda: runner.invoke(app, list(args)))


async def feed(daemon: Daemon, n: int) -> None:
    client = await RawClient.connect(daemon.config.socket_path)
    await client.hello()
    for seq in range(1, n + 1):
        await client.send(event(seq, Kind.COVERAGE if seq % 2 else Kind.CRASH))
    with trio.fail_after(10):
        while not isinstance(msg := await client.recv(), Ack) or msg.seq < n:
            pass
    await client.aclose()


async def test_status_tune_flush_dead_letters(local_daemon: Daemon) -> None:
    sock = str(local_daemon.config.socket_path)
    await feed(local_daemon, 4)
    result = await cli("status", "--socket", sock)
    assert result.exit_code == 0, result.output
    assert "local mode (no master)" in result.output and "coverage" in result.output
    assert "(control)" in result.output  # the status request's own connection, labelled
    status = json.loads((await cli("status", "--socket", sock, "--json")).output)
    assert status["events"]["crash"]["accepted"] == 2 and status["spool"]["events"] == 4

    result = await cli("tune", "--socket", sock, "--batch-size", "7", "--flush-interval", "0.5")
    assert json.loads(result.output) == {"batch_size": 7, "flush_interval": 0.5}
    assert local_daemon.policy.batch_size == 7
    result = await cli("tune", "--socket", sock, "--batch-size", "0")
    assert result.exit_code == 1
    assert result.output.strip() == "error: batch_size: must be between 1 and 10000, got 0"

    assert (await cli("flush", "--socket", sock)).output.strip() == (
        "nothing to flush: no master (local mode, or not registered yet)"
    )
    assert (await cli("dead-letters", "list", "--socket", sock)).output.strip() == (
        "no dead letters"
    )
    result = await cli("dead-letters", "retry", "--socket", sock)
    assert result.output.strip() == "no dead letters: nothing requeued"
    result = await cli("dead-letters", "retry", "--socket", sock, "--id", "typo")
    assert result.exit_code == 1
    assert result.stderr == "error: no dead letter with id 'typo'\n"


async def test_status_watch_shows_rates(local_daemon: Daemon) -> None:
    sock = str(local_daemon.config.socket_path)
    result = await cli("status", "--socket", sock, "--watch", "--interval", "0.1", "--count", "2")
    assert result.exit_code == 0, result.output
    frames = result.output.split("pfcollector 0.1.0  pid")[1:]
    assert len(frames) == 2
    assert "in/s" in frames[0] and "local mode: nothing is sent" in frames[1]


def test_format_watch_rates_from_counter_deltas() -> None:
    def snap(uptime: float, received: int, delivered: int) -> dict[str, object]:
        return {
            "version": "0",
            "pid": 1,
            "uptime_s": uptime,
            "mode": "master",
            "draining": False,
            "config": {"master_url": "http://m"},
            "connections": {"current": 2},
            "queue": {"depth": 0, "capacity": 8},
            "events": {"crash": {"received": received}},
            "spool": {
                "events": 3,
                "bytes": 512,
                "max_bytes": 1024,
                "kinds": {"crash": {"delivered": delivered, "spooled": 3, "oldest_age_s": 75}},
            },
            "delivery": {
                "breaker": {"state": "open", "retry_in": 4.2},
                "sender": {
                    "requests": 9,
                    "retries": 3,
                    "last_success": {"wall": None},
                    "last_error": {"wall": None, "text": "HTTP 503"},
                },
            },
        }

    frame = format_watch(snap(10, 100, 50), snap(12, 300, 60), "gone")
    crash = next(line for line in frame.splitlines() if line.startswith("crash"))
    assert crash.split()[1:5] == ["100.0", "5.0", "3", "75s"]
    assert "breaker OPEN (probe in 4s)" in frame and "HTTP 503" in frame
    assert "(50.0%)" in frame and "!! gone" in frame
    assert format_watch(None, snap(12, 300, 60)).splitlines()[3].split()[1:3] == ["-", "-"]


def test_refusals_are_shown_with_an_alert_for_results() -> None:
    events = {
        "crash": {"received": 3, "accepted": 3, "rejected": 0, "refused": {}},
        "corpus": {"received": 9, "accepted": 2, "rejected": 1,
                   "refused": {"disk_full": 6, "too_long": 1}},
        "stats": {"received": 5, "accepted": 4, "rejected": 1, "refused": {"out_of_range": 1}},
    }  # fmt: skip
    doc = {"events": events}
    lines = refusal_lines(doc)
    assert lines[1] == (
        "!! ALERT: 7 corpus event(s) refused since start (disk_full 6, too_long 1): "
        "lost unless sent again"
    )
    assert lines[2] == (
        "refused since start: corpus disk_full 6, too_long 1; stats out_of_range 1"
    )
    assert not any("crash" in line for line in lines)
    # nothing refused: nothing shown
    assert refusal_lines({"events": {"crash": events["crash"]}}) == []


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--watch"],
        ["tune", "--batch-size", "5"],
        ["flush"],
        ["dead-letters", "list"],
        ["dead-letters", "retry"],
    ],
)
def test_no_daemon_is_one_line_and_exit_1(sock_dir: Path, args: list[str]) -> None:
    path = sock_dir / "none.sock"
    result = runner.invoke(app, [*args, "--socket", str(path)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no pfcollector daemon at {path}")


async def test_serve_on_a_taken_socket_is_one_line_and_exit_1(
    local_daemon: Daemon, tmp_path: Path
) -> None:
    # A real process: CliRunner's capture does not keep log lines and errors apart reliably.
    sock = str(local_daemon.config.socket_path)
    cmd = [sys.executable, "-m", "pfcollector", "serve", "--socket", sock,
           "--data-dir", str(tmp_path / "other")]  # fmt: skip
    result = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    err = result.stderr.decode()
    assert result.returncode == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: another pfcollector daemon is already listening on {sock}"]
    assert "Traceback" not in err


async def test_watch_keeps_its_state_in_the_daemons_data_dir(
    local_daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The user's default data directory is elsewhere: the daemon's answer must win.
    monkeypatch.setenv("PFCOLLECTOR_DATA_DIR", str(tmp_path / "elsewhere"))
    sock = str(local_daemon.config.socket_path)
    out = tmp_path / "afl-out"
    (out / "default" / "queue").mkdir(parents=True)
    result = await cli("watch", "afl", str(out), "--job", "j", "--once", "--socket", sock)
    assert result.exit_code == 0, result.output
    assert len(list((local_daemon.config.data_dir / "watch").glob("afl-*.json"))) == 1
    assert not (tmp_path / "elsewhere").exists()
    # --data-dir is taken as given
    mine = tmp_path / "mine"
    result = await cli(
        "watch", "afl", str(out), "--job", "j", "--once", "--socket", sock,
        "--data-dir", str(mine),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list((mine / "watch").glob("afl-*.json"))) == 1
