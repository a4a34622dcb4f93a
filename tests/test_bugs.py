"""Crashes bucketed by bug (``crash_dedupe = "bug"``, ``pfcollector.bugs``).

Rules: per job, the first crash of a bug (same report signature) is stored and sent with the
sanitizer's crash type; later ones, whatever their input, are acknowledged, counted as hits and
their inputs kept in the input store; a crash without a recognisable report is deduplicated by
input; the bug table is written in the append's transaction and survives reopening; ``input``
and ``off`` keep the older behaviours. Reports are the real fixtures of test_report.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

import pfclient
from pfcollector import bugs
from pfcollector.acks import AckTracker
from pfcollector.cli import app
from pfcollector.config import Config, ConfigError, load
from pfcollector.devmaster import DevMaster
from pfcollector.events import Event, Kind
from pfcollector.ingest import GroupCommitter, Pending
from pfcollector.inputs import InputStore
from pfcollector.metrics import Metrics
from pfcollector.spool import Spool
from pfcollector.statusview import format_status
from tests import sanitizer_targets as targets

from .conftest import start_daemon

HEAP = (targets.REPORTS / "asan-heap-buffer-overflow.txt").read_text()
UAF = (targets.REPORTS / "asan-heap-use-after-free.txt").read_text()
HEAP_SIG = "heap-buffer-overflow READ 4\nread_past_heap\ndispatch"


def crash(seq: int, data: bytes, output: str = "", job: str = "job-1") -> Pending:
    fields = {"type": "SEGV", "signal": 11, "exit_code": 0, "output": output, "stack_trace": ""}
    tracker = AckTracker()
    tracker.submitted(seq)
    return Pending(Event(f"c-{job}-{seq}", Kind.CRASH, job, "afl", 1, fields), data, tracker, seq)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[Spool, InputStore]]:
    spool = Spool(tmp_path / "spool.db")
    yield spool, InputStore(tmp_path / "inputs")
    spool.close()


async def test_one_crash_per_bug_is_stored_the_rest_are_hits(
    store: tuple[Spool, InputStore],
) -> None:
    spool, inputs = store
    committer = GroupCommitter(spool, inputs)  # the default: bug
    group = [crash(i, f"heap {i}".encode(), HEAP) for i in range(1, 6)]
    group += [crash(10 + i, f"uaf {i}".encode(), UAF) for i in range(1, 4)]
    group.append(crash(20, b"no report at all"))
    await committer.commit(group)
    stored = [s.event for s in spool.read_after(0, 100)]
    assert [e.id for e in stored] == ["c-job-1-1", "c-job-1-11", "c-job-1-20"]
    assert [e.fields["type"] for e in stored] == [
        "heap-buffer-overflow READ 4",
        "heap-use-after-free READ 1",
        "SEGV",  # no report: the producer's type, deduplicated by input
    ]
    listed = spool.read(bugs.list_bugs)
    assert [(b["type"], b["hits"], b["first_id"]) for b in listed] == [
        ("heap-buffer-overflow READ 4", 5, "c-job-1-1"),
        ("heap-use-after-free READ 1", 3, "c-job-1-11"),
    ]
    assert listed[0]["signature"] == HEAP_SIG
    assert listed[0]["first_ns"] <= listed[0]["last_ns"]
    # Every input of every crash is kept (for minimisation later), not only the first's.
    assert spool.pending_input_count() == 9
    assert spool.status()["crash"]["deduped"] == 6


async def test_later_groups_and_a_reopened_spool_still_know_the_bug(tmp_path: Path) -> None:
    spool, inputs = Spool(tmp_path / "s.db"), InputStore(tmp_path / "inputs")
    await GroupCommitter(spool, inputs).commit([crash(1, b"a", HEAP)])
    spool.close()
    spool = Spool(tmp_path / "s.db")
    committer = GroupCommitter(spool, inputs)
    await committer.commit([crash(2, b"b", HEAP)])
    await committer.commit([crash(1, b"a", HEAP)])  # a resend of the first: not a hit
    await committer.commit([crash(3, b"c", HEAP, job="job-2")])  # another job: another bug
    assert [s.event.id for s in spool.read_after(0, 10)] == ["c-job-1-1", "c-job-2-3"]
    assert [(b["job_id"], b["hits"]) for b in spool.read(bugs.list_bugs)] == [
        ("job-1", 2),
        ("job-2", 1),
    ]
    assert [b["job_id"] for b in spool.read(bugs.list_bugs, "job-2")] == ["job-2"]
    spool.close()
    assert [b["hits"] for b in bugs.read_bugs(tmp_path / "s.db", "job-1")] == [2]


async def test_input_mode_dedupes_by_input_and_off_keeps_all(
    store: tuple[Spool, InputStore],
) -> None:
    spool, inputs = store
    await GroupCommitter(spool, inputs, crash_dedupe="input").commit(
        [crash(1, b"x", HEAP), crash(2, b"y", HEAP), crash(3, b"x", HEAP)]
    )
    stored = [s.event for s in spool.read_after(0, 10)]
    assert [e.id for e in stored] == ["c-job-1-1", "c-job-1-2"]
    assert stored[0].fields["type"] == "SEGV"  # only bug mode retypes
    assert spool.read(bugs.list_bugs) == []
    assert spool.pending_input_count() == 2  # the repeat had the same bytes
    await GroupCommitter(spool, inputs, crash_dedupe="off").commit(
        [crash(4, b"x", HEAP), crash(5, b"x", HEAP)]
    )
    assert spool.total_count == 4


def test_setting_values_and_their_older_form(make_config: Callable[..., Config]) -> None:
    assert make_config().crash_dedupe == "bug"
    assert make_config(crash_dedupe=False).crash_dedupe == "off"
    assert make_config(crash_dedupe=True).crash_dedupe == "bug"
    assert make_config(crash_dedupe="input").crash_dedupe == "input"
    with pytest.raises(ConfigError, match="crash_dedupe"):
        make_config(crash_dedupe="stack")


def test_setting_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PFCOLLECTOR_CRASH_DEDUPE", "false")
    assert load({}, config_file=None).config.crash_dedupe == "off"
    monkeypatch.setenv("PFCOLLECTOR_CRASH_DEDUPE", "input")
    assert load({}, config_file=None).config.crash_dedupe == "input"
    monkeypatch.delenv("PFCOLLECTOR_CRASH_DEDUPE")
    file = tmp_path / "c.toml"
    file.write_text("crash_dedupe = true\n")
    assert load({}, config_file=file).config.crash_dedupe == "bug"
    file.write_text('crash_dedupe = "nope"\n')
    with pytest.raises(ConfigError, match="crash_dedupe"):
        load({}, config_file=file)


async def test_master_gets_one_crash_per_bug_with_its_type_and_report(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    """Real socket, real spool, the reference master on 127.0.0.1."""
    with DevMaster() as master:
        config = make_config(master_url=master.url, bot_id="bot-1", flush_interval=0.1,
                             coalesce=False)  # fmt: skip
        daemon = await start_daemon(nursery, config)

        def produce() -> None:
            with pfclient.Client(config.socket_path, job_id="job-9", fuzzer="afl") as client:
                for i in range(12):
                    report = HEAP if i % 3 else UAF
                    client.crash("SEGV", f"input {i}".encode(), signal=6, output=report)

        await trio.to_thread.run_sync(produce)
        with trio.fail_after(20):
            while master.count("crash") < 2:
                await trio.sleep(0.05)
        rows = master.rows("crash")
        assert sorted(r["type"] for r in rows) == [
            "heap-buffer-overflow READ 4",
            "heap-use-after-free READ 1",
        ]
        assert all("ERROR: AddressSanitizer" in r["output"] for r in rows)
        status = await daemon.status()
        top = status["policies"]["crash"]["top_bugs"]
        assert [(b["job_id"], b["type"], b["hits"]) for b in top] == [
            ("job-9", "heap-buffer-overflow READ 4", 8),
            ("job-9", "heap-use-after-free READ 1", 4),
        ]
        assert status["spool"]["kinds"]["crash"]["deduped"] == 10
        view = format_status(status)
        assert "heap-buffer-overflow READ 4  in read_past_heap < dispatch" in view
        text = (await Metrics(daemon.status).render()).decode()
        hits = {
            (s.labels["type"], s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "pfcollector_bug_crashes_total"
        }
        assert hits == {("heap-buffer-overflow READ 4", 8.0), ("heap-use-after-free READ 1", 4.0)}
        for i in range(12):
            digest = hashlib.sha256(f"input {i}".encode()).hexdigest()
            with trio.fail_after(10):
                while not daemon.inputs.path_for(digest).exists():
                    await trio.sleep(0.02)
        daemon.stop()
        assert master.count("crash") == 2


async def test_bugs_command_lists_a_spools_bugs(tmp_path: Path) -> None:
    runner = CliRunner()
    data = tmp_path / "data"
    missing = runner.invoke(app, ["bugs", "--data-dir", str(data)])
    assert missing.exit_code == 1
    assert "no spool at" in missing.output
    assert "Traceback" not in missing.output
    spool = Spool(data / "spool.db")
    committer = GroupCommitter(spool, InputStore(data / "inputs"))
    await committer.commit([crash(1, b"a", HEAP), crash(2, b"b", HEAP), crash(3, b"c", UAF)])
    await committer.commit([crash(4, b"d", UAF, job="job-2")])
    empty = runner.invoke(app, ["bugs", "--data-dir", str(data), "--job", "job-3"])
    assert (empty.exit_code, empty.output.strip()) == (
        0,
        f"no bugs recorded for job 'job-3' in {data / 'spool.db'}",
    )
    table = runner.invoke(app, ["bugs", "--data-dir", str(data)])  # beside the open spool
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split()[:5] == ["job", "bug", "hits", "first", "last"]
    assert lines[1].split()[:3] == ["job-1", bugs.bug_id("job-1", HEAP_SIG), "2"]
    assert "heap-buffer-overflow READ 4  in read_past_heap < dispatch" in lines[1]
    as_json = runner.invoke(app, ["bugs", "--data-dir", str(data), "--job", "job-2", "--json"])
    (only,) = json.loads(as_json.output)
    assert (only["job_id"], only["first_id"], only["hits"]) == ("job-2", "c-job-2-4", 1)
    assert only["signature"] == "heap-use-after-free READ 1\nuse_after_free\ndispatch"
    spool.close()


@pytest.mark.slow
def test_bugs_and_hits_survive_kill_9(tmp_path: Path, sock_dir: Path) -> None:
    """Acked hits are durable: SIGKILL right after the acks, restart, the bug goes on."""
    from tests.test_kill9 import DaemonProcess

    with DevMaster() as master:
        daemon = DaemonProcess(sock_dir / "pf.sock", tmp_path / "data", master.url,
                               tmp_path / "daemon.log")  # fmt: skip
        try:
            daemon.start()
            with pfclient.Client(daemon.socket_path, job_id="job-k", fuzzer="afl") as client:
                for i in range(5):
                    client.crash("SEGV", f"first {i}".encode(), signal=11, output=HEAP)
            daemon.kill9()
            daemon.start()
            with pfclient.Client(daemon.socket_path, job_id="job-k", fuzzer="afl") as client:
                for i in range(5):
                    client.crash("SEGV", f"second {i}".encode(), signal=11, output=HEAP)
                client.crash("SEGV", b"other", signal=11, output=UAF)
            status = daemon.wait_spool_empty()
        finally:
            daemon.close()
        assert sorted(r["type"] for r in master.rows("crash")) == [
            "heap-buffer-overflow READ 4",
            "heap-use-after-free READ 1",
        ]
    top = status["policies"]["crash"]["top_bugs"]
    assert [(b["type"], b["hits"]) for b in top] == [
        ("heap-buffer-overflow READ 4", 10),
        ("heap-use-after-free READ 1", 1),
    ]
    assert status["spool"]["kinds"]["crash"]["deduped"] == 9
    inputs = InputStore(tmp_path / "data" / "inputs")
    for data in [f"first {i}".encode() for i in range(5)] + [b"other"]:
        assert inputs.path_for(hashlib.sha256(data).hexdigest()).exists()
