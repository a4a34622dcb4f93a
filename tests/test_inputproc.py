"""Crash input files written by a child process (pfcollector.inputproc). Rules: a batch's files
are durable and private before its reply; a child that dies or answers garbage fails only its
batch (the bytes stay in the spool's journal) and the next batch starts a new one; a child that
never gets going leaves the files to a worker thread; a child outlives neither its daemon's stop
nor its ``kill -9``; the child takes no file name it did not expect."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import trio

import pfclient
from pfcollector import inputchild, inputproc
from pfcollector.acks import AckTracker
from pfcollector.config import Config
from pfcollector.ingest import GroupCommitter
from pfcollector.inputproc import InputProcess
from pfcollector.inputs import InputStore
from pfcollector.inputwriter import InputWriter
from pfcollector.spool import Spool

from .conftest import start_daemon
from .test_inputs import crash_pending, until


def items(*contents: bytes) -> list[tuple[str, bytes]]:
    return [(hashlib.sha256(c).hexdigest(), c) for c in contents]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_a_batch_is_on_disk_and_private_when_write_returns(tmp_path: Path) -> None:
    store = InputStore(tmp_path / "inputs")
    writer = InputProcess(store)
    try:
        await writer.write(items(b"one", b"two"))
        await writer.write(items(b"three", b"one"))  # an existing file is fine
        assert writer.started == 1  # one child for every batch
        proc = writer._proc
        assert proc is not None
        assert proc.pid != os.getpid()
    finally:
        await writer.aclose()
    assert proc.returncode == 0  # it exits on its own once its stdin closes
    for content in (b"one", b"two", b"three"):
        path = store.path_for(hashlib.sha256(content).hexdigest())
        assert path.read_bytes() == content
        assert not stat.S_IMODE(path.stat().st_mode) & 0o027  # no group write, no others
    assert not list(store.root.glob("*/*.tmp"))


async def test_big_and_small_items_arrive_whole(tmp_path: Path) -> None:
    store = InputStore(tmp_path / "inputs")
    writer = InputProcess(store)
    big = bytes(range(256)) * (3 * inputproc.WRITE_CHUNK // 256 + 7)  # past a write chunk
    contents = [b"s%d" % i * 300 for i in range(500)] + [big] + [b"tail", b""]
    try:
        await writer.write(items(*contents))
    finally:
        await writer.aclose()
    for content in contents:
        assert store.path_for(hashlib.sha256(content).hexdigest()).read_bytes() == content


async def test_a_big_batch_goes_in_parts_of_the_childs_size(tmp_path: Path) -> None:
    store = InputStore(tmp_path / "inputs")
    writer = InputProcess(store, max_batch_bytes=10_000)
    sent: list[int] = []
    real = inputproc._send_batch

    async def counting(stream: trio.abc.SendStream, part: list[tuple[str, bytes]]) -> None:
        sent.append(sum(len(data) for _, data in part))
        await real(stream, part)

    contents = [bytes([i]) * 3000 for i in range(10)] + [b"x" * 25_000, b"y"]
    inputproc._send_batch = counting  # type: ignore[assignment]
    try:
        await writer.write(items(*contents))
    finally:
        inputproc._send_batch = real  # type: ignore[assignment]
        await writer.aclose()
    # Runs of at most 10,000 bytes, one item past it; every byte sent once.
    assert sent == [12_000, 12_000, 2 * 3_000 + 25_000, 1]
    assert writer.started == 1
    for content in contents:
        assert store.path_for(hashlib.sha256(content).hexdigest()).read_bytes() == content


async def test_a_killed_child_fails_its_batch_and_the_next_starts_another(
    tmp_path: Path,
) -> None:
    store = InputStore(tmp_path / "inputs")
    writer = InputProcess(store)
    try:
        await writer.write(items(b"first"))
        first = writer._proc
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        await first.wait()
        await writer.write(items(b"second"))  # died between batches: the next gets a new one
        assert writer.started == 2
        assert not writer.in_thread
    finally:
        await writer.aclose()
    assert store.path_for(hashlib.sha256(b"second").hexdigest()).read_bytes() == b"second"


async def test_a_disk_error_in_the_child_comes_back_as_that_oserror(tmp_path: Path) -> None:
    store = InputStore(tmp_path / "inputs")
    writer = InputProcess(store)
    (store.root / "ab").write_bytes(b"")  # the fan-out directory's name is taken by a file
    try:
        with pytest.raises(NotADirectoryError, match="not a directory") as raised:
            await writer.write([("ab" + "0" * 62, b"y")])
        assert raised.value.errno == errno.ENOTDIR
        assert writer.started == 1  # an answer, not a broken child: the same child goes on
        await writer.write(items(b"fine"))
        assert writer.started == 1
    finally:
        await writer.aclose()


async def test_a_child_that_cannot_start_leaves_the_files_to_a_thread(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    spool, store = Spool(tmp_path / "s.db"), InputStore(tmp_path / "inputs")
    files = InputProcess(store)
    files.command = [sys.executable, "-c", "import sys; sys.exit(3)"]  # dies before answering
    writer = InputWriter(spool, store, files=files)
    await GroupCommitter(spool, store).commit([crash_pending(b"kept", AckTracker(), 1)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await until(lambda: spool.pending_input_count() == 0, 120)
        nursery.cancel_scope.cancel()
    assert files.in_thread
    assert files.started == inputproc.START_FAILURES
    assert store.path_for(hashlib.sha256(b"kept").hexdigest()).read_bytes() == b"kept"


async def test_a_child_dying_mid_batch_fails_that_batch(tmp_path: Path) -> None:
    store = InputStore(tmp_path / "inputs")
    writer = InputProcess(store)
    writer.command = [sys.executable, "-c", "import sys; sys.stdin.buffer.read(4)"]
    try:
        with pytest.raises(OSError, match="input writer process stopped") as raised:
            await writer.write(items(b"x"))
        assert raised.value.errno == errno.EPIPE
        assert writer._proc is None  # reaped: the next batch starts another
    finally:
        await writer.aclose()


async def test_a_child_answering_garbage_is_replaced(tmp_path: Path) -> None:
    store = InputStore(tmp_path / "inputs")
    writer = InputProcess(store)
    script = "import sys; sys.stdin.buffer.read(4); sys.stdout.buffer.write(b'\\0\\0\\0\\1\\xc1')"
    writer.command = [sys.executable, "-c", script]
    try:
        with pytest.raises(OSError, match="garbage"):
            await writer.write(items(b"x"))
        assert writer._proc is None  # killed and reaped: the next batch starts another
    finally:
        await writer.aclose()


def _serve_once(store: InputStore, frame_obj: object, payload: bytes = b"") -> tuple[int, object]:
    """The child's loop on one batch frame (and its bytes): exit status and its one reply."""
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    body = msgpack.packb(frame_obj, use_bin_type=True)
    os.write(to_child_w, len(body).to_bytes(4, "big") + body + payload)
    os.close(to_child_w)
    try:
        status = inputchild.serve(store, to_child_r, from_child_w)
    finally:
        os.close(to_child_r)
        os.close(from_child_w)
    out = os.read(from_child_r, 1 << 16)
    os.close(from_child_r)
    assert int.from_bytes(out[:4], "big") == len(out) - 4  # exactly one reply
    return status, msgpack.unpackb(out[4:], raw=False)


def test_the_child_takes_no_name_but_a_sha256(tmp_path: Path) -> None:
    store = InputStore(tmp_path / "inputs")
    status, reply = _serve_once(store, [["../../escaped", 1]], b"x")
    assert status == 1  # the framing of what follows is lost: the child ends
    assert reply == [errno.EPROTO, "bad batch: bad item name '../../escaped'"]
    assert not (tmp_path / "escaped").exists()
    for bad, why in (("not a list", "a batch is a list"),
                     ([["a" * 64, -1]], "bad item size -1"),
                     ([["a" * 64]], "an item is [sha256, size]")):  # fmt: skip
        assert _serve_once(store, bad) == (1, [errno.EPROTO, f"bad batch: {why}"])
    # A frame length no batch has: refused before anything is allocated for it.
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    os.write(to_child_w, (inputchild.MAX_FRAME + 1).to_bytes(4, "big"))
    os.close(to_child_w)
    assert inputchild.serve(store, to_child_r, from_child_w) == 1
    out = os.read(from_child_r, 1 << 16)
    for fd in (to_child_r, from_child_w, from_child_r):
        os.close(fd)
    too_big = inputchild.MAX_FRAME + 1
    assert msgpack.unpackb(out[4:]) == [errno.EPROTO, f"bad batch: a frame of {too_big} bytes"]
    good = [hashlib.sha256(c).hexdigest() for c in (b"ok", b"", b"yes")]
    status, reply = _serve_once(store, [[good[0], 2], [good[1], 0], [good[2], 3]], b"okyes")
    assert (status, reply) == (0, None)
    assert [store.path_for(sha).read_bytes() for sha in good] == [b"ok", b"", b"yes"]
    assert not list(store.root.glob("*/*.tmp"))


async def test_the_daemon_writes_inputs_in_a_child_and_stops_it(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    config = make_config()
    daemon = await start_daemon(nursery, config)
    files = daemon.input_writer.files
    assert isinstance(files, InputProcess)

    def produce() -> str:
        with pfclient.Client(str(config.socket_path), job_id="job-1", fuzzer="t") as client:
            return client.crash("SEGV", b"an input", signal=11)

    await trio.to_thread.run_sync(produce)
    sha = hashlib.sha256(b"an input").hexdigest()
    await until(lambda: daemon.inputs.path_for(sha).exists())
    # The file is there at its rename; the child still syncs its directory (an fd of its
    # own) before it answers. Once it has answered, it waits on its stdin holding nothing.
    while (await daemon.status())["spool"]["inputs_pending"]:
        await trio.sleep(0.01)
    proc = files._proc
    assert proc is not None
    assert alive(proc.pid)
    # Nothing of the daemon's but its pipes and stderr: not the socket, not the spool.
    assert sorted(int(fd) for fd in os.listdir(f"/proc/{proc.pid}/fd")) == [0, 1, 2]
    status = (await daemon.status())["spool"]
    assert status["input_writer"] == {"pid": proc.pid, "starts": 1, "in_thread": False}
    assert status["inputs_pending"] == 0
    daemon.stop()
    await until(lambda: proc.returncode is not None)
    assert proc.returncode == 0  # stopped by its closed stdin, not killed


def test_a_daemon_killed_with_sigkill_leaves_no_writer_behind(tmp_path: Path) -> None:
    data, sock = tmp_path / "data", tmp_path / "pf.sock"
    data.mkdir(mode=0o750)
    daemon = _serve(data, sock)
    try:
        client = _connect(sock)
        with client:
            client.crash("SEGV", b"before the kill", signal=11)
        children = _wait_for_child(daemon.pid)
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(alive(pid) for pid in children), "the input writer outlived its daemon"
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def _connect(sock: Path) -> pfclient.Client:
    """A client once the daemon listens (pfclient itself is fail-open: it would not wait)."""
    deadline = time.monotonic() + 20
    while not sock.exists():
        if time.monotonic() > deadline:
            raise AssertionError("the daemon never listened")
        time.sleep(0.05)
    return pfclient.Client(str(sock), job_id="job-1", fuzzer="t", timeout=5, fail_open=False)


def _wait_for_child(pid: int) -> list[int]:
    """The daemon's child processes, once it has one (its input writer)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError("the daemon started no input writer")


def test_status_shows_the_input_writer_only_when_it_is_not_well() -> None:
    from pfcollector.statusview import _input_writer_lines

    well = {"input_writer": {"pid": 7, "starts": 1, "in_thread": False}, "inputs_pending": 0}
    assert _input_writer_lines(well) == []
    restarted = {"input_writer": {"pid": 8, "starts": 3, "in_thread": False}, "inputs_pending": 2}
    assert _input_writer_lines(restarted) == [
        "input files: input writer process started 3 times (see the log); "
        "2 input(s) waiting in the spool"
    ]
    fallen_back = {"input_writer": {"pid": None, "starts": 3, "in_thread": True}}
    assert "worker thread" in _input_writer_lines(fallen_back)[0]
    assert _input_writer_lines({}) == []  # a scoped status has no spool details


def _serve(data: Path, sock: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pfcollector", "serve", "--data-dir", str(data),
         "--socket", str(sock)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def test_inputs_acked_before_a_kill_9_are_in_their_files_after_the_restart(
    tmp_path: Path,
) -> None:
    """kill -9 right after the last ack, with the child likely mid-batch: the next daemon
    writes every acknowledged input from the spool's journal, whole, and leaves no .tmp."""
    data, sock = tmp_path / "data", tmp_path / "pf.sock"
    data.mkdir(mode=0o750)
    inputs = [b"input %d " % i * (1 + i % 300) for i in range(400)]
    daemon = _serve(data, sock)
    try:
        with _connect(sock) as client:
            for i, content in enumerate(inputs):
                client.crash("SEGV", content, signal=11, id=f"crash-{i}")
        os.kill(daemon.pid, signal.SIGKILL)  # every crash above was acknowledged
        daemon.wait(timeout=10)
        sock.unlink(missing_ok=True)
        daemon = _serve(data, sock)
        root = data / "inputs"
        paths = [root / h[:2] / h for h in (hashlib.sha256(c).hexdigest() for c in inputs)]
        deadline = time.monotonic() + 30
        while not all(p.exists() for p in paths) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.read_bytes() if p.exists() else None for p in paths] == inputs
        with _connect(sock):  # the restarted daemon serves
            pass
    finally:
        if daemon.poll() is None:
            daemon.terminate()
            daemon.wait(timeout=30)
    assert not list((data / "inputs").glob("*/*.tmp"))  # cleaned at start or renamed
