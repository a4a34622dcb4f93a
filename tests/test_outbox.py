"""The daemon's outbox importer: files clients wrote while it was away.

Rules of this module: a real daemon (real socket, real SQLite spool) in the test's trio run;
outbox files are written by pfclient's own writer or planted by hand (hostile ones). The
importer is woken by hand (``Importer.wake``), never waited for by the clock.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from pfclient._outbox import outbox_bytes, write_event
from pfcollector.config import Config
from pfcollector.daemon import Daemon
from pfcollector.metrics import Metrics, daemon_snapshot
from pfcollector.outbox import Importer, decode_file, file_limit
from tests.conftest import start_daemon

HELLO = {"job_id": "job-o", "fuzzer": "fz", "pid": 77}


def crash(event_id: str, data: bytes = b"boom") -> dict[str, Any]:
    return {"kind": "crash", "id": event_id, "ts": 1700000000.0, "type": "SEGV", "signal": 11,
            "input": data}  # fmt: skip


def stored_ids(daemon: Daemon) -> list[str]:
    return [row.event.id for row in daemon.spool.read_after(0, 10_000)]


async def import_now(daemon: Daemon) -> None:
    """Wake the importer and wait until it finished one more pass."""
    before = daemon.outbox.passes
    daemon.outbox.wake()
    while daemon.outbox.passes < before + 2:  # a pass that started after the wake is over
        daemon.outbox.wake()
        await trio.sleep(0.01)


@pytest.fixture
def outbox_config(make_config: Callable[..., Config]) -> Config:
    return make_config(coalesce=False)


async def test_files_written_before_start_are_imported_and_deleted(
    outbox_config: Config, nursery: trio.Nursery
) -> None:
    outbox = outbox_config.outbox_dir
    for i in range(3):
        write_event(outbox, HELLO, crash(f"c-{i}", f"input {i}".encode()))
    daemon = await start_daemon(nursery, outbox_config)
    await import_now(daemon)
    assert sorted(stored_ids(daemon)) == ["c-0", "c-1", "c-2"]
    assert [p.name for p in outbox.iterdir()] == ["rejected"]
    rows = {r.event.id: r.event for r in daemon.spool.read_after(0, 10)}
    assert rows["c-1"].job_id == "job-o" and rows["c-1"].fuzzer == "fz"
    status = await daemon.status()
    assert status["outbox"]["imported"] == 3 and status["outbox"]["rejected"] == 0
    text = (await Metrics(lambda: daemon_snapshot(daemon)).render()).decode()
    assert "pfcollector_outbox_imported_total 3.0" in text
    assert "pfcollector_outbox_rejected_total 0.0" in text
    daemon.stop()


async def test_a_resend_of_a_stored_event_is_stored_once(
    outbox_config: Config, nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(nursery, outbox_config)
    write_event(outbox_config.outbox_dir, HELLO, crash("same"))
    await import_now(daemon)
    write_event(outbox_config.outbox_dir, HELLO, crash("same"))
    await import_now(daemon)
    assert stored_ids(daemon) == ["same"]
    daemon.stop()


async def test_welcome_names_the_outbox(outbox_config: Config, nursery: trio.Nursery) -> None:
    daemon = await start_daemon(nursery, outbox_config)
    stream = await trio.open_unix_socket(str(outbox_config.socket_path))
    body = msgpack.packb({"t": "hello", "v": 1, "job_id": "j", "fuzzer": "f", "pid": 1})
    await stream.send_all(struct.pack(">I", len(body)) + body)
    data = await stream.receive_some(4096)
    welcome = msgpack.unpackb(data[4:])
    assert welcome["outbox"] == str(outbox_config.outbox_dir)
    assert os.path.isabs(welcome["outbox"])
    await stream.aclose()
    daemon.stop()


def _frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _plant_hostile(outbox: Path, tmp_path: Path) -> dict[str, str]:
    """Every kind of bad file; returns name -> what must happen ('rejected' or 'skipped')."""
    good = outbox_bytes(HELLO, crash("x"))
    secret = tmp_path / "secret"
    secret.write_bytes(good.replace(b"x", b"y"))
    (outbox / "link.pfev").symlink_to(secret)
    os.mkfifo(outbox / "fifo.pfev")
    (outbox / "truncated.pfev").write_bytes(outbox_bytes(HELLO, crash("truncated"))[:-3])
    (outbox / "garbage.pfev").write_bytes(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
    (outbox / "oneframe.pfev").write_bytes(_frame({"t": "hello", "v": 1, "job_id": "j",
                                                   "fuzzer": "f", "pid": 1}))  # fmt: skip
    (outbox / "three.pfev").write_bytes(outbox_bytes(HELLO, crash("three")) + b"\0\0\0\1\xc0")
    (outbox / "mismatch.pfev").write_bytes(outbox_bytes(HELLO, crash("other")))
    (outbox / "badfield.pfev").write_bytes(outbox_bytes(HELLO, {**crash("badfield"),
                                                                "signal": 11.0}))  # fmt: skip
    (outbox / "noid.pfev").write_bytes(
        _frame({"t": "hello", "v": 1, "job_id": "j", "fuzzer": "f", "pid": 1})
        + _frame({"t": "event", "seq": 1, "kind": "stats"})
    )
    with open(outbox / "huge.pfev", "wb") as f:  # sparse: over the limit without the bytes
        f.truncate(file_limit(1024) + 1)
    (outbox / "foreign.pfev").write_bytes(outbox_bytes(HELLO, crash("foreign")))
    if os.geteuid() == 0:
        os.chown(outbox / "foreign.pfev", 65534, 65534)
    (outbox / "dir.pfev").mkdir()
    return {"link": "rejected", "fifo": "rejected", "truncated": "rejected",
            "garbage": "rejected", "oneframe": "rejected", "three": "rejected",
            "mismatch": "rejected", "badfield": "rejected", "noid": "rejected",
            "huge": "rejected", "dir": "rejected",
            "foreign": "rejected" if os.geteuid() == 0 else "imported"}  # fmt: skip


async def test_hostile_outbox(
    make_config: Callable[..., Config], nursery: trio.Nursery, tmp_path: Path
) -> None:
    config = make_config(coalesce=False, max_frame=1024)
    outbox = config.outbox_dir
    outbox.mkdir(parents=True)
    expected = _plant_hostile(outbox, tmp_path)
    write_event(outbox, HELLO, crash("good-1", b"one"))
    daemon = await start_daemon(nursery, config)
    await import_now(daemon)
    write_event(outbox, HELLO, crash("good-2", b"two"))  # the daemon keeps running and importing
    await import_now(daemon)
    ids = set(stored_ids(daemon))
    assert {"good-1", "good-2"} <= ids
    assert "y" not in ids and "x" not in ids  # the symlink's target was never read
    rejected = {p.name.split(".pfev")[0] for p in (outbox / "rejected").iterdir()}
    assert rejected == {name for name, fate in expected.items() if fate == "rejected"}
    assert sorted(p.name for p in outbox.iterdir()) == ["rejected"]
    assert (tmp_path / "secret").exists()
    status = await daemon.status()
    assert status["outbox"]["rejected"] == len(rejected)
    assert status["outbox"]["imported"] == len(ids)
    daemon.stop()


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", "bad_outbox_file"),
        (b"\0\0\0\0", "empty_frame"),
        (_frame([1, 2]), "not_a_map"),
        (_frame({"t": "event", "seq": 1, "kind": "stats", "id": "a"}), "no_hello"),
        (_frame({"t": "hello", "v": 9, "job_id": "j", "fuzzer": "f", "pid": 1}),
         "unsupported_version"),
    ],
)
def test_decode_uses_the_socket_codes(content: bytes, code: str) -> None:
    from pfcollector.outbox import Rejected

    with pytest.raises(Rejected) as info:
        decode_file("a.pfev", content, 1024, 0, 0)
    assert info.value.code == code


def test_admits_follows_the_socket_rules() -> None:
    me = os.geteuid()
    private = Importer(Path("/nonexistent"), max_frame=1024, socket_mode=0o600)
    assert private.admits(me, 0) and private.admits(0, 0)
    assert not private.admits(65534, 65534)
    group = Importer(Path("/nonexistent"), max_frame=1024, socket_mode=0o660, socket_group=4242)
    assert group.admits(65534, 4242)
    assert not group.admits(65534, 65534)
    listed = Importer(Path("/nonexistent"), max_frame=1024, socket_mode=0o666,
                      allows=lambda uid, gid: uid == me)  # fmt: skip
    assert not listed.admits(65534, 65534) and listed.admits(me, 0)


async def test_an_outbox_writable_by_all_is_refused_not_fatal(
    outbox_config: Config, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    outbox_config.outbox_dir.mkdir(parents=True)
    os.chmod(outbox_config.outbox_dir, 0o777)
    if os.geteuid() == 0:
        os.chown(outbox_config.outbox_dir, 65534, 65534)  # someone else's directory
    else:
        pytest.skip("needs root to give the outbox another owner")
    daemon = await start_daemon(nursery, outbox_config)
    assert daemon.server.outbox is None  # the welcome names no outbox then
    assert any("outbox disabled" in r.getMessage() for r in caplog.records)
    status = await daemon.status()
    assert status["outbox"]["passes"] == 0
    daemon.stop()


def test_the_writer_makes_missing_parents_private(tmp_path: Path) -> None:
    outbox = tmp_path / "data" / "deeper" / "outbox"
    write_event(outbox, HELLO, crash("p-1"))
    for path in (tmp_path / "data", tmp_path / "data" / "deeper", outbox):
        assert path.stat().st_mode & 0o777 == 0o750, path  # not 0755: the daemon refuses that


async def test_a_pass_reads_within_the_memory_budget(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    """Twenty 1 MiB crashes against a 16 MiB budget: each read is reserved first and holds at
    most a quarter of the budget (plus the one file that crosses it), and all are imported."""
    config = make_config(coalesce=False, memory_budget=16 * 1024 * 1024)
    daemon = await start_daemon(nursery, config)
    budget = daemon.outbox.budget
    assert budget is daemon.budget
    batches: list[int] = []
    read_batch = daemon.outbox._read_batch

    def watched(limit: int) -> Any:
        batch = read_batch(limit)
        batches.append(sum(len(f.data) for f in batch if isinstance(f.data, bytes)))
        assert limit == budget.capacity // 4
        return batch

    daemon.outbox._read_batch = watched  # type: ignore[method-assign]
    for i in range(20):
        write_event(config.outbox_dir, HELLO, crash(f"big-{i}", bytes([i]) * (1024 * 1024)))
    with trio.fail_after(30):
        while len(stored_ids(daemon)) < 20:
            await import_now(daemon)
    assert sorted(stored_ids(daemon)) == sorted(f"big-{i}" for i in range(20))
    read = [n for n in batches if n]
    assert len(read) >= 4 and max(read) <= budget.capacity // 4 + 1024 * 1024
    daemon.stop()
