"""``pfcollector watch libfuzzer``: artifact names and status lines parsed, artifacts sent once
as crashes (type from the prefix), the log followed by byte offset (whole lines only; a
truncated log is read again), state surviving restarts. Unit tests use synthetic files and a
recording sink; one integration test drives a live in-process daemon from a worker thread."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import trio

from pfcollector.daemon import Daemon
from pfcollector.events import Kind
from pfcollector.watch import (
    LibFuzzerWatcher,
    Sink,
    StateFile,
    artifact_type,
    parse_status_line,
)

LOG = (
    "INFO: Seed: 1234\n"
    "#2\tINITED cov: 3 ft: 4 corp: 1/1b exec/s: 0 rss: 30Mb\n"
    "#12345\tNEW    cov: 120 ft: 200 corp: 30/1234b lim: 4 exec/s: 5000 rss: 40Mb L: 3/3 MS: 1\n"
    "#1048576\tpulse  cov: 125 ft: 210 corp: 31/2Kb lim: 4 exec/s: 6000 rss: 41Mb\n"
)


class FakeSink(Sink):
    def __init__(self) -> None:
        super().__init__(None, "job-lf")
        self.sent: list[tuple[str, str, dict[str, Any], str | None]] = []

    def send(
        self, fuzzer: str, kind: str, fields: dict[str, Any], event_id: str | None = None
    ) -> None:
        self.sent.append((fuzzer, kind, fields, event_id))

    def flush(self) -> None:
        pass


def test_status_lines_and_artifact_names() -> None:
    line = parse_status_line(
        "#12345\tNEW    cov: 120 ft: 200 corp: 30/1234b lim: 4 exec/s: 5000 rss: 40Mb L: 3/3"
    )
    assert line is not None
    assert (line.executions, line.event, line.cov, line.features) == (12345, "NEW", 120, 200)
    assert (line.corpus_count, line.corpus_bytes, line.exec_per_second, line.rss_mb) == (
        30,
        1234,
        5000,
        40,
    )
    done = parse_status_line(
        "#2097152\tDONE   cov: 125 ft: 210 corp: 31/2Kb exec/s: 69905 rss: 4Mb"
    )
    assert done is not None and done.event == "DONE" and done.corpus_bytes == 2048
    assert parse_status_line("INFO: Seed: 1") is None
    assert parse_status_line("==1==ERROR: AddressSanitizer: SEGV") is None
    assert [
        artifact_type(n)
        for n in (
            "crash-da39a3ee",
            "leak-01ab",
            "timeout-ff",
            "oom-0",
            "slow-unit-1",
            "crash-x.txt",
        )
    ] == ["crash", "leak", "timeout", "oom", None, None]


def test_artifacts_and_log_once_across_restarts(tmp_path: Path) -> None:
    arts, log, state = tmp_path / "arts", tmp_path / "fuzz.log", tmp_path / "state.json"
    arts.mkdir()
    (arts / "crash-aa11").write_bytes(b"boom")
    (arts / "oom-bb22").write_bytes(b"big")
    (arts / "README").write_text("no")
    log.write_text(LOG + "#1048577\tNEW    cov: 1")  # an unfinished line is left for later

    def watcher(sink: FakeSink) -> LibFuzzerWatcher:
        return LibFuzzerWatcher(arts, sink, StateFile(state, arts), log, settle=0.0)

    sink = FakeSink()
    assert watcher(sink).scan() == 4
    crashes = [s for s in sink.sent if s[1] == "crash"]
    assert [(c[2]["type"], c[2]["input"]) for c in crashes] == [("crash", b"boom"), ("oom", b"big")]
    stats = next(s[2] for s in sink.sent if s[1] == "stats")
    assert stats["executions"] == 1048576 and stats["covered_edges"] == 125
    assert stats["memory_usage"] == 41 * 1024 * 1024 and stats["unique_crashes"] == 2
    cov = next(s[2] for s in sink.sent if s[1] == "coverage")
    assert cov == {"edges": 125, "new_edges": 125, "exec_count": 1048576}

    again = FakeSink()
    assert watcher(again).scan() == 0  # restart: nothing resent
    with log.open("a") as f:
        f.write("30 ft: 1 corp: 1/1b exec/s: 1 rss: 1Mb\n#2000000\tDONE   cov: 130 exec/s: 9\n")
    (arts / "timeout-cc33").write_bytes(b"slow")
    third = FakeSink()
    watcher(third).scan()
    assert [(s[1], s[2].get("type"), s[2].get("edges")) for s in third.sent] == [
        ("crash", "timeout", None),
        ("stats", None, None),
        ("coverage", None, 130),
    ]
    assert third.sent[2][2]["new_edges"] == 5
    assert third.sent[0][3] == next(
        s[3] for s in fresh_sends(arts, tmp_path) if s[2].get("type") == "timeout"
    )

    log.write_text("#5\tNEW    cov: 7 ft: 7 corp: 2/2b exec/s: 1 rss: 1Mb\n")  # truncated
    fourth = FakeSink()
    watcher(fourth).scan()
    assert next(s[2] for s in fourth.sent if s[1] == "stats")["executions"] == 5


def fresh_sends(arts: Path, tmp_path: Path) -> list[tuple[str, str, dict[str, Any], str | None]]:
    """Everything a watcher with no state would send: ids must match the first sends."""
    sink = FakeSink()
    LibFuzzerWatcher(arts, sink, StateFile(tmp_path / "fresh.json", arts), None, settle=0.0).scan()
    return sink.sent


def test_young_artifacts_wait(tmp_path: Path) -> None:
    (tmp_path / "crash-01").write_bytes(b"x")
    sink = FakeSink()
    w = LibFuzzerWatcher(tmp_path, sink, StateFile(tmp_path / "s.json", tmp_path), None, "lf", 60)
    assert w.scan() == 0
    old = time.time() - 120
    os.utime(tmp_path / "crash-01", (old, old))
    assert w.scan() == 1 and sink.sent[0][0] == "lf"


async def test_live_daemon(local_daemon: Daemon, tmp_path: Path) -> None:
    arts, log = tmp_path / "arts", tmp_path / "fuzz.log"
    arts.mkdir()
    (arts / "leak-77").write_bytes(b"leaky")
    log.write_text(LOG)

    def scan() -> int:
        sink = Sink(local_daemon.config.socket_path, "job-lf")
        try:
            st = StateFile(tmp_path / "state.json", arts)
            return LibFuzzerWatcher(arts, sink, st, log, settle=0.0).scan()
        finally:
            sink.close()

    with trio.fail_after(20):
        assert await trio.to_thread.run_sync(scan) == 3
        assert await trio.to_thread.run_sync(scan) == 0
    events = [r.event for r in local_daemon.spool.read_after(0, 100)]
    crash = next(e for e in events if e.kind is Kind.CRASH)
    assert crash.fuzzer == "libfuzzer" and crash.fields["type"] == "leak"
    assert crash.fields["hash"] == hashlib.sha256(b"leaky").hexdigest()
    cov = next(e for e in events if e.kind is Kind.COVERAGE)
    assert cov.fields["edges"] == 125 and cov.fields["exec_count"] == 1048576


# -- the log's report goes with its artifact (issue 16) ---------------------------------------

REPORTS = Path(__file__).parent / "data" / "reports"


def test_the_log_report_goes_with_its_artifact(tmp_path: Path) -> None:
    """A real report (tests/data/reports, captured from tests/targets) in a fuzzing log, as
    libFuzzer writes it: status lines, the report, then ``Test unit written to``. The crash
    carries the report, and the daemon's parser buckets it as the fixture says."""
    import json

    from pfcollector.report import parse

    expected = json.loads((REPORTS / "expected.json").read_text())
    arts, log = tmp_path / "arts", tmp_path / "fuzz.log"
    arts.mkdir()
    report = (REPORTS / "libfuzzer-heap-buffer-overflow.txt").read_text()
    leak = (REPORTS / "asan-leak.txt").read_text()
    written = "artifact_prefix='./arts/'; Test unit written to ./arts/"
    log.write_text(LOG + report + "MS: 1 ChangeBit-; base unit: 0\n0x68,0x78,\nhx\n"
                   f"{written}crash-aa11\nBase64: aHg=\n" + LOG + leak +
                   f"{written}leak-bb22\n")  # fmt: skip
    (arts / "crash-aa11").write_bytes(b"hx")
    (arts / "leak-bb22").write_bytes(b"lx")
    (arts / "crash-cc33").write_bytes(b"no report")  # its line never came
    sink = FakeSink()
    LibFuzzerWatcher(arts, sink, StateFile(tmp_path / "s.json", arts), log, settle=0.0).scan()
    crashes = {s[2]["output"].split("\n", 1)[0]: s[2] for s in sink.sent if s[1] == "crash"}
    hbo = crashes["libFuzzer artifact crash-aa11"]
    assert hbo["stack_trace"].startswith("=================")
    assert "read_past_heap" in hbo["stack_trace"] and "Test unit" not in hbo["output"]
    assert parse(hbo["output"], hbo["stack_trace"]).signature == expected[
        "libfuzzer-heap-buffer-overflow"]  # fmt: skip
    assert "INITED" not in hbo["output"]  # only the lines after the last status line
    leaky = crashes["libFuzzer artifact leak-bb22"]
    assert parse(leaky["output"], leaky["stack_trace"]).signature == expected["asan-leak"]
    assert "stack_trace" not in crashes["libFuzzer artifact crash-cc33"]


def test_a_report_is_kept_until_its_artifact_settles(tmp_path: Path) -> None:
    """The log may name an artifact before it is old enough to send (``settle``): the report
    waits in the state, across a restart of the watcher."""
    arts, log, state = tmp_path / "arts", tmp_path / "fuzz.log", tmp_path / "s.json"
    arts.mkdir()
    report = (REPORTS / "libfuzzer-deadly-signal.txt").read_text()
    log.write_text(report + "Test unit written to ./crash-dd44\n")
    (arts / "crash-dd44").write_bytes(b"kx")
    first = FakeSink()
    LibFuzzerWatcher(arts, first, StateFile(state, arts), log, settle=60).scan()
    assert not [s for s in first.sent if s[1] == "crash"]
    old = time.time() - 120
    os.utime(arts / "crash-dd44", (old, old))
    second = FakeSink()
    LibFuzzerWatcher(arts, second, StateFile(state, arts), log, settle=60).scan()
    (crash,) = [s[2] for s in second.sent if s[1] == "crash"]
    assert "AddressSanitizer: SEGV" in crash["stack_trace"]


def test_a_real_libfuzzer_run_reports_its_bug(tmp_path: Path) -> None:
    """libFuzzer built by clang from tests/targets/bugs.c finds the heap overflow in its seed
    corpus, writes the artifact and its log; the watcher's crash parses to the bug's
    signature (the same as a reproduced run's)."""
    import json
    import subprocess

    from pfcollector.report import parse
    from tests.conftest import require_tool
    from tests.sanitizer_targets import SANITIZER_ENV, build

    require_tool("clang")
    built = build(tmp_path, ("fuzzer",))
    corpus, arts, log = tmp_path / "corpus", tmp_path / "arts", tmp_path / "fuzz.log"
    corpus.mkdir()
    arts.mkdir()
    (corpus / "seed").write_bytes(b"hx")
    with log.open("wb") as f:
        subprocess.run([str(built["fuzzer"]), f"-artifact_prefix={arts}/", "-runs=100",
                        str(corpus)], stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path,
                       env={**os.environ, **SANITIZER_ENV}, timeout=120, check=False)  # fmt: skip
    assert "Test unit written to" in log.read_text(errors="replace")
    sink = FakeSink()
    LibFuzzerWatcher(arts, sink, StateFile(tmp_path / "s.json", arts), log, settle=0.0).scan()
    (crash,) = [s[2] for s in sink.sent if s[1] == "crash"]
    expected = json.loads((REPORTS / "expected.json").read_text())
    assert parse(crash["output"], crash["stack_trace"]).signature == expected[
        "libfuzzer-heap-buffer-overflow"]  # fmt: skip
