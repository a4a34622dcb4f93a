"""Files the daemon keeps are private: another local user can read nothing under the data
directory (issue 15, docs/security.md "Local users").

The daemon is a real ``pfcollector serve`` subprocess started as the README says, with the
default umask 022; a second uid is a forked child that drops to ``nobody`` (65534). Tests that
need the second uid run only as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pfclient
from pfcollector.private import (
    NotPrivate,
    check_private,
    create_private_file,
    make_private_dir,
    open_private_file,
)

NOBODY = 65534
WAIT_LIMIT = 30.0
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second uid")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user can enter (0755), as /var/lib or a home directory would be."""
    path = Path(tempfile.mkdtemp(prefix="pfpriv"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def readable_by(uid: int, root: Path) -> list[str]:
    """What ``uid`` can list or read under ``root`` (a forked child drops to that uid)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            found = []
            for directory, _dirs, files in os.walk(root, onerror=lambda exc: None):
                found.append(f"listed {directory}")
                for name in files:
                    path = os.path.join(directory, name)
                    with contextlib.suppress(OSError):
                        with open(path, "rb") as f:
                            f.read(1)
                        found.append(f"read {path}")
            os.write(write_fd, "\n".join(found).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return [line for line in out.splitlines() if line]


def start_serve(
    data_dir: Path, socket_path: Path, *extra: str, **env: str
) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PFCOLLECTOR_")} | {
        "PFCOLLECTOR_CONFIG": os.devnull,
        **env,
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pfcollector",
            "serve",
            "--data-dir",
            str(data_dir),
            "--socket",
            str(socket_path),
            *extra,
        ],
        env=environ,
        umask=0o022,  # what a root shell has: the daemon must not rely on it
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_socket(proc: subprocess.Popen[str], path: Path) -> None:
    deadline = time.monotonic() + WAIT_LIMIT
    while not path.exists():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"serve exited {proc.returncode}: {out}")
        if time.monotonic() > deadline:
            pytest.fail("serve did not start")
        time.sleep(0.05)


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=WAIT_LIMIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@as_root
def test_a_second_uid_reads_nothing_under_the_data_directory(open_dir: Path) -> None:
    data, sock = open_dir / "data", open_dir / "pf.sock"
    proc = start_serve(data, sock)
    try:
        wait_for_socket(proc, sock)
        with pfclient.Client(sock, job_id="job-1", fuzzer="afl") as client:
            client.crash("SEGV", b"exploit-material", stack_trace="#0 secret_function")
        deadline = time.monotonic() + WAIT_LIMIT
        while not list(data.glob("inputs/*/*")):  # the input file is written after the ack
            assert time.monotonic() < deadline, "the input file was never written"
            time.sleep(0.05)
        names = {p.name for p in data.iterdir()}
        assert {"spool.db", "spool.db-wal", "spool.db-shm", "inputs"} <= names
        assert readable_by(NOBODY, data) == []  # the daemon running: WAL and shm exist
        for path in [data, *data.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode & 0o007 == 0, f"{path} is {mode:04o}"
            assert mode == (0o750 if path.is_dir() else 0o640), f"{path} is {mode:04o}"
    finally:
        stop(proc)
    assert readable_by(NOBODY, data) == []


@as_root
def test_the_second_uid_check_sees_an_open_directory(open_dir: Path) -> None:
    """The check above can fail: a file left open to others is found."""
    (open_dir / "leak").write_bytes(b"x")
    (open_dir / "leak").chmod(0o644)
    assert readable_by(NOBODY, open_dir) == [f"listed {open_dir}", f"read {open_dir}/leak"]


def test_serve_refuses_a_data_directory_open_to_others(open_dir: Path) -> None:
    data = open_dir / "data"
    data.mkdir(mode=0o755)
    (data / "spool.db").touch(mode=0o644)
    proc = start_serve(data, open_dir / "pf.sock")
    out, _ = proc.communicate(timeout=WAIT_LIMIT)  # it exits by itself
    assert proc.returncode == 1
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "open to other users (mode 0755)" in errors[0], out
    assert "--fix-permissions" in errors[0]
    assert "Traceback" not in out


def test_serve_fix_permissions_closes_the_whole_tree(open_dir: Path) -> None:
    data = open_dir / "data"
    (data / "inputs" / "ab").mkdir(parents=True, mode=0o755)
    for path in (data, data / "inputs", data / "inputs" / "ab"):
        path.chmod(0o755)
    (data / "inputs" / "ab" / "abcd").write_bytes(b"crash")
    (data / "inputs" / "ab" / "abcd").chmod(0o644)
    sock = open_dir / "pf.sock"
    proc = start_serve(data, sock, "--fix-permissions")
    try:
        wait_for_socket(proc, sock)
    finally:
        out = stop(proc)
    assert "took other users' access away from 4 entries" in out
    for path in [data, *data.rglob("*")]:
        assert path.stat().st_mode & 0o007 == 0, path
    assert check_private(data) == 0


def test_check_private_reports_one_line_and_fixes(tmp_path: Path) -> None:
    root = tmp_path / "d"
    assert check_private(root) == 0  # missing: it will be created private
    make_private_dir(root / "outbox")
    assert check_private(root) == 0
    (root / "outbox").chmod(0o777)
    with pytest.raises(NotPrivate, match=r"outbox is open to other users \(mode 0777\)"):
        check_private(root)
    os.symlink("/etc/passwd", root / "link")  # never followed, never changed
    before = os.stat("/etc/passwd").st_mode
    assert check_private(root, fix=True) == 1
    assert os.stat("/etc/passwd").st_mode == before
    assert stat.S_IMODE((root / "outbox").stat().st_mode) == 0o770


def test_private_helpers_ignore_a_wide_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        made = make_private_dir(tmp_path / "a" / "b")
        fd = open_private_file(made / "f")
        os.close(fd)
        assert create_private_file(made / "g") and not create_private_file(made / "g")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o750
    assert stat.S_IMODE(made.stat().st_mode) == 0o750
    assert stat.S_IMODE((made / "f").stat().st_mode) == 0o640
    assert stat.S_IMODE((made / "g").stat().st_mode) == 0o640
    with pytest.raises(FileExistsError):
        open_private_file(made / "f")  # O_EXCL: nothing is overwritten
    os.symlink(made / "nowhere", made / "dangling")
    with pytest.raises(FileExistsError):
        open_private_file(made / "dangling")  # nor created through a symlink


def test_watcher_state_is_private_whatever_the_umask(tmp_path: Path) -> None:
    from pfcollector.watch._state import StateFile

    old = os.umask(0)
    try:
        state = StateFile(tmp_path / "data" / "watch" / "afl-1.json", tmp_path)
        state.save()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "data" / "watch").stat().st_mode) == 0o750
    assert stat.S_IMODE(state.path.stat().st_mode) & 0o077 == 0
