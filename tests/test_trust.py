"""Clients talk only to a daemon they trust; the daemon listens only where no one else can.

Rules of this module: the squatter is a real process of another uid (a child that
``setuid()``s to 65534, so these tests need root and skip without it) listening on a real
Unix socket; it records every byte it receives. The socket directory checks run on real
directories with real owners and modes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import pfclient
from pfcollector import sockdir
from pfcollector.sockdir import SocketPathRefused, prepare_socket_dir

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second uid")

SQUATTER = textwrap.dedent(
    """
    import os, socket, sys
    path, log = sys.argv[1:3]
    os.setgid(65534)
    os.setuid(65534)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = s.accept()
        conn.settimeout(0.5)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                with open(log, "ab") as f:
                    f.write(data)
        except OSError:
            pass
        conn.close()
    """
)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A sticky world-writable directory, like /tmp, with a short path."""
    path = Path(tempfile.mkdtemp(prefix="pfsq"))
    os.chmod(path, 0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def squatter(shared_dir: Path) -> Iterator[tuple[Path, Path]]:
    sock, log = shared_dir / "pf.sock", shared_dir / "received"
    proc = subprocess.Popen([sys.executable, "-c", SQUATTER, str(sock), str(log)],
                            stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        yield sock, log
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@needs_root
def test_strict_client_refuses_a_squatter_and_sends_nothing(
    squatter: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, log = squatter
    monkeypatch.delenv("PFCOLLECTOR_DAEMON_UID", raising=False)
    with pytest.raises(pfclient.UntrustedDaemon) as info:
        pfclient.Client(sock, job_id="secret-job", fuzzer="f", fail_open=False, timeout=1)
    assert str(sock) in str(info.value) and f"uid {NOBODY}" in str(info.value)
    assert info.value.uid == NOBODY
    with pytest.raises(pfclient.UntrustedDaemon):
        pfclient.status(sock, timeout=1)
    assert not log.exists()


@needs_root
def test_fail_open_client_sends_the_squatter_nothing_and_keeps_the_crash(
    squatter: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sock, log = squatter
    outbox = tmp_path / "outbox"
    with pfclient.Client(sock, job_id="secret-job", fuzzer="f", outbox=outbox, timeout=1) as pf:
        for i in range(100):
            pf.stats(executions=i)
        event_id = pf.crash("SEGV", b"secret input", signal=11, stack_trace="secret trace")
        assert not pf.connected
    assert not log.exists()  # not even the hello
    assert [p.name for p in outbox.iterdir()] == [f"{event_id}.pfev"]
    refusals = [r for r in caplog.records if f"uid {NOBODY}" in r.getMessage()]
    assert len(refusals) == 1  # logged once, not once per call


@needs_root
def test_a_trusted_uid_is_talked_to(
    squatter: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, log = squatter
    monkeypatch.setenv("PFCOLLECTOR_DAEMON_UID", str(NOBODY))
    with pytest.raises(pfclient.DaemonUnavailable, match="no welcome"):
        pfclient.Client(sock, job_id="j", fuzzer="f", fail_open=False, timeout=0.3)
    assert log.exists()  # it got the hello: the operator said to trust it


@needs_root
def test_daemon_will_not_start_on_a_squatted_path(
    squatter: tuple[Path, Path], tmp_path: Path
) -> None:
    sock, _ = squatter
    proc = subprocess.run(
        [sys.executable, "-m", "pfcollector", "serve", "--socket", str(sock), "--data-dir",
         str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert str(sock) in proc.stderr and f"uid {NOBODY}" in proc.stderr
    print(proc.stderr)


# -- the socket directory ---------------------------------------------------------------------


@pytest.fixture
def fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "pfcollector-x"
    monkeypatch.setattr(sockdir, "fallback_socket_dir", lambda uid=None: path)
    return path


def test_fallback_dir_is_made_private(fallback: Path) -> None:
    prepare_socket_dir(fallback / "pfcollector.sock")
    assert fallback.stat().st_mode & 0o777 == 0o700


def test_fallback_dir_with_a_group_is_0750(fallback: Path) -> None:
    prepare_socket_dir(fallback / "pfcollector.sock", group=os.getegid())
    assert fallback.stat().st_mode & 0o777 == 0o750


@needs_root
def test_fallback_dir_of_another_uid_is_refused(fallback: Path) -> None:
    fallback.mkdir(mode=0o700)
    os.chown(fallback, NOBODY, NOBODY)
    with pytest.raises(SocketPathRefused, match=rf"{fallback}.*uid {NOBODY}"):
        prepare_socket_dir(fallback / "pfcollector.sock")


def test_fallback_dir_writable_by_others_is_refused(fallback: Path) -> None:
    fallback.mkdir()
    os.chmod(fallback, 0o777)
    with pytest.raises(SocketPathRefused, match="writable by others"):
        prepare_socket_dir(fallback / "pfcollector.sock")


def test_fallback_dir_as_a_symlink_is_refused(fallback: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    fallback.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SocketPathRefused, match="not a directory"):
        prepare_socket_dir(fallback / "pfcollector.sock")


def test_world_writable_dir_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(SocketPathRefused, match="anyone may replace"):
        prepare_socket_dir(open_dir / "pf.sock")


@needs_root
def test_pfcollector_status_refuses_a_squatter(squatter: tuple[Path, Path]) -> None:
    sock, log = squatter
    proc = subprocess.run([sys.executable, "-m", "pfcollector", "status", "--socket", str(sock)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and f"uid {NOBODY}" in proc.stderr
    assert not log.exists()
