"""Watchers read only what the fuzzer produced (issue 11 item 7), survive a real fuzzer's values
(issue 12 item 11) and tell the user about a wrong or missing directory (issue 12 item 2).

Rules of this module: real files, symlinks, FIFOs and directories planted in a synthetic
output directory; a recording sink (no daemon). A FIFO would block an ``open`` without
``O_NONBLOCK`` forever, so each scan runs under a thread join with a bound. The fuzzer_stats
files in ``tests/data/afl/`` were captured from real ``afl-fuzz`` runs (afl++ 4.04c, the
crashing target of test_watch_afl.py), at the start, middle and end of a run.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from pfclient import DaemonUnavailable
from pfcollector.events import CRASH_INPUT_MAX
from pfcollector.watch import (
    AflWatcher,
    LibFuzzerWatcher,
    StateFile,
    parse_fuzzer_stats,
    parse_status_line,
    stats_fields,
)
from tests.test_watch_afl import FakeSink, make_instance

DATA = Path(__file__).parent / "data"


def scan_bounded(scan: object) -> int:
    """Run ``scan()`` in a thread; fail (rather than hang) if it blocks."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(scan()), daemon=True)  # type: ignore[operator]
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the scan blocked (a FIFO opened without O_NONBLOCK?)"
    return result[0]


def plant(directory: Path, secret: Path, prefix: str) -> None:
    """A symlink, a FIFO, a directory and an oversized sparse file, all named like inputs."""
    (directory / f"{prefix}1").symlink_to(secret)
    os.mkfifo(directory / f"{prefix}2")
    (directory / f"{prefix}3").mkdir()
    with open(directory / f"{prefix}4", "wb") as f:
        f.truncate(CRASH_INPUT_MAX + 1)


def test_afl_watcher_refuses_planted_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out, secret = tmp_path / "out", tmp_path / "shadow"
    secret.write_bytes(b"root:secret")
    inst = make_instance(out, "default", crashes=1, queue=1)
    plant(inst / "crashes", secret, "id:00000")  # id:000001 .. id:000004
    (inst / "crashes" / "id:000005,sig:11,real").write_bytes(b"real crash")
    elsewhere = tmp_path / "elsewhere"
    make_instance(elsewhere, "evil", crashes=1, queue=1)
    (out / "evil").symlink_to(elsewhere / "evil")  # a symlinked instance
    (inst / "queue").rename(inst / "queue.real")
    (inst / "queue").symlink_to(elsewhere / "evil" / "queue")  # a symlinked subdirectory
    (inst / "fuzzer_stats").unlink()
    (inst / "fuzzer_stats").symlink_to(secret)
    sink = FakeSink()
    with caplog.at_level(logging.WARNING, logger="pfcollector.watch"):
        watcher = AflWatcher(out, sink, StateFile(tmp_path / "s.json", out), settle=0.0)
        scan_bounded(watcher.scan)
        scan_bounded(watcher.scan)  # refusals are logged once, not once per scan
    inputs = [s[2]["input"] for s in sink.sent if s[1] == "crash"]
    assert inputs == [b"default-crash-0", b"real crash"]
    assert all(s[0] == "afl++/default" for s in sink.sent)  # nothing of "evil"
    assert not [s for s in sink.sent if s[1] == "corpus"]  # the symlinked queue was not read
    assert not [s for s in sink.sent if s[1] == "stats"]
    assert b"secret" not in repr(sink.sent).encode()
    refusals = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
    for name in ("id:000001", "id:000002", "id:000003", "id:000004", "queue", "fuzzer_stats"):
        assert sum(name in m for m in refusals) == 1, (name, refusals)


def test_libfuzzer_watcher_refuses_planted_files(tmp_path: Path) -> None:
    arts, secret = tmp_path / "arts", tmp_path / "shadow"
    arts.mkdir()
    secret.write_bytes(b"root:secret")
    plant(arts, secret, "crash-aa")
    (arts / "crash-ff").write_bytes(b"real")
    log = tmp_path / "fuzz.log"
    os.mkfifo(log)  # a FIFO where the log should be
    sink = FakeSink()
    watcher = LibFuzzerWatcher(arts, sink, StateFile(tmp_path / "s.json", arts), log, settle=0.0)
    scan_bounded(watcher.scan)
    assert [(s[1], s[2]["input"]) for s in sink.sent] == [("crash", b"real")]


# -- real fuzzers' values ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["start", "middle", "end"])
def test_captured_afl_fuzzer_stats_give_valid_fields(name: str) -> None:
    raw = parse_fuzzer_stats((DATA / "afl" / f"fuzzer_stats.{name}").read_text())
    fields = stats_fields(raw)
    assert fields["executions"] > 0
    if name == "start":  # afl-fuzz's first write, captured as it is: "execs_per_sec : inf"
        assert raw["execs_per_sec"] == "inf" and "exec_per_second" not in fields
    else:
        assert fields["exec_per_second"] > 0
    for value in fields.values():
        assert math.isfinite(value) and 0 <= value < 2**63


@pytest.mark.parametrize("bad", ["inf", "-inf", "nan", "", "n/a", "1e400", "9" * 30])
def test_non_finite_or_unparsable_values_become_absent(bad: str) -> None:
    text = (DATA / "afl" / "fuzzer_stats.start").read_text()
    lines = [
        f"execs_per_sec     : {bad}" if line.startswith("execs_per_sec") else
        f"execs_done        : {bad}" if line.startswith("execs_done") else line
        for line in text.splitlines()
    ]  # fmt: skip
    fields = stats_fields(parse_fuzzer_stats("\n".join(lines)))
    assert "executions" not in fields  # an int64 field: out of range is absent too
    assert "exec_per_second" not in fields or bad == "9" * 30  # a float: 1e30 is finite
    assert all(math.isfinite(v) for v in fields.values())


def test_captured_libfuzzer_status_lines() -> None:
    lines = (DATA / "libfuzzer" / "fuzz.log").read_text().splitlines()
    parsed = [p for p in map(parse_status_line, lines) if p is not None]
    assert len(parsed) >= 3
    for p in parsed:
        assert 0 <= p.executions < 2**63
    assert parse_status_line("#" + "9" * 30 + "\tNEW    cov: 1 ft: 1 corp: 1/1b") is None


# -- the command line --------------------------------------------------------------------------


def run_watch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pfcollector", "watch", *args],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize("kind", ["afl", "libfuzzer"])
def test_a_file_where_a_directory_is_expected_is_one_line(kind: str, tmp_path: Path) -> None:
    afile = tmp_path / "hostname"
    afile.write_text("x")
    proc = run_watch(kind, str(afile), "--job", "j", "--once", "--state", str(tmp_path / "s"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert str(afile) in proc.stderr and "not a directory" in proc.stderr


def test_a_missing_directory_is_waited_for_with_a_warning(tmp_path: Path) -> None:
    missing = tmp_path / "not-yet"
    proc = run_watch("afl", str(missing), "--job", "j", "--once", "--state",
                     str(tmp_path / "s"), "--socket", str(tmp_path / "none.sock"))  # fmt: skip
    assert "Traceback" not in proc.stderr
    assert "does not exist yet; waiting for it" in proc.stderr and str(missing) in proc.stderr


# -- crashes found while the daemon is away ----------------------------------------------------


async def test_watcher_keeps_crashes_in_the_outbox_while_the_daemon_is_away(
    tmp_path: Path, make_config: Any, nursery: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trio

    from pfcollector.watch import Sink
    from tests.conftest import start_daemon
    from tests.test_outbox import import_now

    config = make_config(coalesce=False)
    monkeypatch.setenv("PFCOLLECTOR_OUTBOX", str(config.outbox_dir))
    out, state = tmp_path / "out", tmp_path / "state.json"
    make_instance(out, "default", crashes=2, queue=1)
    sink = Sink(config.socket_path, "job-away", timeout=1.0)
    watcher = AflWatcher(out, sink, StateFile(state, out), settle=0.0)
    with pytest.raises(DaemonUnavailable):  # the queue and stats wait for the daemon...
        await trio.to_thread.run_sync(watcher.scan)
    sink.close()
    kept = sorted(p.name for p in config.outbox_dir.glob("afl-*.pfev"))
    assert len(kept) == 2  # ...the crashes are durable already, not retried in memory
    assert watcher.state.data["instances"]["default"]["crashes"]["next"] == 2
    daemon = await start_daemon(nursery, config)
    await import_now(daemon)
    stored = {r.event.id for r in daemon.spool.read_after(0, 100)}
    assert {name.removesuffix(".pfev") for name in kept} <= stored
    daemon.stop()


def test_a_crash_named_with_no_signal_number_is_still_a_valid_crash(tmp_path: Path) -> None:
    """``sig:999`` in a crash file's name (a custom mutator's, or a renamed file) was sent as
    ``signal: 999`` and the daemon refused the crash (``signal`` is 0..SIGRTMAX): lost. The
    watcher now sends such a crash as type ``crash``, signal 0, its name in the output, and
    the daemon's own parser takes every event it sends."""
    import msgpack

    from pfcollector.protocol import EventMsg, ServerConnection

    out = tmp_path / "out"
    inst = make_instance(out, "default", crashes=0, queue=0)
    names = ["id:000000,sig:999,src:000000", "id:000001,sig:123456789012345678901234567890",
             "id:000002,sig:11,src:000000"]  # fmt: skip
    for name in names:
        (inst / "crashes" / name).write_bytes(name.encode())
    sink = FakeSink()
    scan_bounded(AflWatcher(out, sink, StateFile(tmp_path / "s.json", out), settle=0.0).scan)
    crashes = [s[2] for s in sink.sent if s[1] == "crash"]
    assert [(c["type"], c["signal"]) for c in crashes] == [("crash", 0), ("crash", 0),
                                                           ("SIGSEGV", 11)]  # fmt: skip
    assert all(name in c["output"] for name, c in zip(names, crashes, strict=True))
    conn = ServerConnection()
    frames = [{"t": "hello", "v": 1, "job_id": "j", "fuzzer": "afl++/default", "pid": 1}]
    frames += [{"t": "event", "seq": i + 1, "kind": "crash", "id": f"00000000-0000-4000-8000-"
                f"{i:012d}", **c} for i, c in enumerate(crashes)]  # fmt: skip
    for frame in frames:
        body = msgpack.packb(frame, use_bin_type=True)
        conn.receive_data(len(body).to_bytes(4, "big") + body)
    parsed = []
    while (msg := conn.next_message()) is not None:  # a refusal raises MessageError here
        parsed.append(msg)
    assert [m.seq for m in parsed if isinstance(m, EventMsg)] == [1, 2, 3]
