"""Disk faults. Rules: when the spool cannot be written (a full disk, injected or real), the
producer gets an error naming it for each event of that group, nothing acknowledged before is
lost, no half-written input is left, and writes work again once space returns; a corrupt spool
is moved aside at start and the daemon runs on a fresh one; ``pfcollector spool check``
reports the state. The real full disk is a tmpfs mounted by the test (root only: CI runs as
root; elsewhere it is skipped with the reason)."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from typer.testing import CliRunner

from pfcollector.cli import app
from pfcollector.config import Config
from pfcollector.events import Kind
from pfcollector.protocol import ErrorMsg, EventMsg
from pfcollector.spool import Spool
from pfcollector.spoolfile import check_spool, open_spool

from .conftest import make_event, missing, require_tool, start_daemon
from .wire import RawClient, event, exchange


def crash(seq: int, size: int = 64) -> EventMsg:
    data = f"crash {seq} ".encode() + os.urandom(size)
    return EventMsg(seq, Kind.CRASH, {**event(seq, Kind.CRASH).fields, "input": data},
                    f"crash-{seq}", None, None)  # fmt: skip


async def errors_by_seq(client: RawClient, events: list[EventMsg]) -> dict[int, ErrorMsg]:
    return {e.seq: e for e in await exchange(client, events) if e.seq is not None}


async def test_injected_disk_full_refuses_then_recovers(
    make_config: Callable[..., Config], nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = await start_daemon(nursery, make_config())
    client = await RawClient.connect(daemon.config.socket_path)
    await client.hello()
    assert await errors_by_seq(client, [crash(s) for s in range(1, 11)]) == {}

    real_commit = Spool._commit

    def full(self: Spool, *args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Spool, "_commit", full)  # the COMMIT of either way (ingest._store)
    errors = await errors_by_seq(client, [crash(s) for s in range(11, 21)])
    assert set(errors) == set(range(11, 21))
    assert {e.code for e in errors.values()} == {"disk_full"}
    assert "disk is full" in errors[11].message
    assert (await daemon.status())["spool"]["write_error"] == "disk_full"

    monkeypatch.setattr(Spool, "_commit", real_commit)
    assert await errors_by_seq(client, [crash(s) for s in range(21, 31)]) == {}
    assert (await daemon.status())["spool"]["write_error"] is None
    stored = {r.event.id for r in daemon.spool.read_after(0, 100)}
    assert stored == {f"crash-{s}" for s in [*range(1, 11), *range(21, 31)]}
    await client.aclose()
    daemon.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "small"
    mount.mkdir()
    tool = require_tool("mount", package="mount")
    done = subprocess.run([tool, "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:  # root without CAP_SYS_ADMIN, as in an unprivileged container
        missing(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_real_full_disk_then_space_returns(
    make_config: Callable[..., Config], small_disk: Path, nursery: trio.Nursery
) -> None:
    daemon = await start_daemon(nursery, make_config(data_dir=small_disk / "data"))
    client = await RawClient.connect(daemon.config.socket_path)
    await client.hello()
    acked: dict[str, bytes] = {}  # id -> input
    refused: list[ErrorMsg] = []
    seq = 0
    for _ in range(40):  # 40 x 5 x 64 KiB = 12.5 MiB into 3 MiB
        batch = [crash(seq + i, 64 * 1024) for i in range(1, 6)]
        seq += 5
        errors = await errors_by_seq(client, batch)
        refused += errors.values()
        acked |= {ev.id: ev.fields["input"] for ev in batch if ev.seq not in errors and ev.id}
        if errors:
            break
    assert refused, "the 3 MiB disk never filled up"
    assert {e.code for e in refused} <= {"disk_full", "spool_full"}
    assert "disk_full" in {e.code for e in refused}
    await trio.run_process(["mount", "-o", "remount,size=32m", str(small_disk)])
    later = [crash(seq + i, 64 * 1024) for i in range(1, 6)]
    assert await errors_by_seq(client, later) == {}  # space is back: accepted again
    acked |= {ev.id: ev.fields["input"] for ev in later if ev.id}
    stored = {r.event.id for r in daemon.spool.read_after(0, 1000)}
    assert set(acked) <= stored  # nothing acknowledged was lost
    with trio.fail_after(30):  # the input writer catches up once the disk has room
        while daemon.spool.pending_input_count():
            await trio.sleep(0.05)
    inputs = small_disk / "data" / "inputs"
    assert not list(inputs.glob("*/*.tmp"))  # no half-written input is left
    for data in acked.values():
        sha = hashlib.sha256(data).hexdigest()
        assert (inputs / sha[:2] / sha).read_bytes() == data
    await client.aclose()
    daemon.stop()


def test_garbage_spool_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    path.write_bytes(b"not a database at all" * 500)
    spool = open_spool(path, 1024**3)
    assert spool.total_count == 0
    assert spool.check() == "ok"
    spool.close()
    (aside,) = tmp_path.glob("spool.db.corrupt-*")
    assert aside.read_bytes().startswith(b"not a database")


def test_damaged_pages_are_found_at_start(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    spool = Spool(path)
    spool.append([make_event(Kind.CORPUS, files=["x" * 200] * 20) for _ in range(300)])
    spool.close()
    raw = bytearray(path.read_bytes())
    page = 4096
    for offset in range(3 * page, len(raw) - page, 5 * page):  # scribble on interior pages
        raw[offset + 100 : offset + 400] = os.urandom(300)
    path.write_bytes(bytes(raw))
    assert not check_spool(path)["ok"]
    spool = open_spool(path, 1024**3)
    assert spool.total_count == 0  # a fresh spool; the damaged one is kept aside
    spool.close()
    assert list(tmp_path.glob("spool.db.corrupt-*"))


def test_spool_check_command(tmp_path: Path) -> None:
    runner = CliRunner()
    data = tmp_path / "data"
    result = runner.invoke(app, ["spool", "check", "--data-dir", str(data)])
    assert result.exit_code == 1
    assert "no spool file" in result.output
    spool = Spool(data / "spool.db")
    spool.append([make_event(Kind.CRASH) for _ in range(3)])
    spool.dead_letter([(spool.read_after(0, 1)[0].event.id, 400, "bad")])
    spool.close()
    result = runner.invoke(app, ["spool", "check", "--data-dir", str(data), "--json"])
    assert result.exit_code == 0, result.output
    assert '"crash"' in result.output
    report = check_spool(data / "spool.db")
    assert report["ok"]
    assert report["kinds"]["crash"]["events"] == 2
    assert report["dead_letters"] == {"crash": 1}
    (data / "spool.db").write_bytes(b"garbage" * 1000)
    result = runner.invoke(app, ["spool", "check", "--data-dir", str(data)])
    assert result.exit_code == 1
    assert "cannot be read" in result.output or "not a database" in result.output
