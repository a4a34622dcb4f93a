"""systemd socket activation: the inherited listening socket, validated, used and left alone.

Rules of this module: the unit tests hand ``listen_socket`` a duplicated descriptor and an
explicit environment (never fd 3 of the test process); the end-to-end test starts a real
daemon subprocess with the listening socket as fd 3 through a small wrapper that sets
``LISTEN_PID`` to its own pid and then execs, as systemd does; every subprocess is waited for
under a timeout and killed if a test fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pfcollector.activation import ActivationError, listen_socket
from pfcollector.control import DaemonUnreachable, request

WRAPPER = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)  # dup2 makes fd 3 inheritable, as systemd leaves it
if fd != 3:
    os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="pfcollector")
os.execv(sys.executable, [sys.executable, "-m", "pfcollector", *sys.argv[2:]])
"""


@pytest.fixture
def unix_listener(sock_dir: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sock_dir / "act.sock"))
    sock.listen(16)
    yield sock
    sock.close()


def test_no_activation_without_our_pid(unix_listener: socket.socket) -> None:
    assert listen_socket({}) is None
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1"}
    assert listen_socket(env, pid=4242, fd=unix_listener.fileno()) is None
    assert env == {"LISTEN_FDS": "1", "LISTEN_PID": "1"}  # meant for another process: untouched


def test_the_inherited_socket_is_returned_and_the_variables_removed(
    unix_listener: socket.socket,
) -> None:
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "77", "LISTEN_FDNAMES": "x", "HOME": "/h"}
    sock = listen_socket(env, pid=77, fd=os.dup(unix_listener.fileno()))
    assert sock is not None
    try:
        assert sock.getsockname() == unix_listener.getsockname()
        assert not sock.get_inheritable()
    finally:
        sock.close()
    assert env == {"HOME": "/h"}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "AF_INET SOCK_DGRAM"),
        (lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), "not listening"),
    ],
)
def test_a_wrong_socket_is_refused(make: object, message: str) -> None:
    sock = make()  # type: ignore[operator]
    try:
        with pytest.raises(ActivationError, match=message):
            listen_socket({"LISTEN_FDS": "1", "LISTEN_PID": "5"}, pid=5, fd=sock.fileno())
        sock.fileno()  # still open: a refused descriptor is left as it was
    finally:
        sock.close()


def test_more_than_one_socket_is_refused() -> None:
    with pytest.raises(ActivationError, match=r"LISTEN_FDS='2'.*exactly one socket"):
        listen_socket({"LISTEN_FDS": "2", "LISTEN_PID": "5"}, pid=5)


def wait_for(pred: object, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


def ask(path: Path) -> dict[str, object] | None:
    try:
        result: dict[str, object] = request(path, "status", timeout=2.0)
    except DaemonUnreachable:
        return None
    return result


@pytest.mark.slow
def test_socket_activated_daemon(
    unix_listener: socket.socket, tmp_path: Path, sock_dir: Path
) -> None:
    path = Path(unix_listener.getsockname())
    config = tmp_path / "pf.toml"
    config.write_text("batch_size = 5\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PFCOLLECTOR_", "LISTEN_"))}
    args = [
        "serve",
        "--config",
        str(config),
        "--socket",
        str(sock_dir / "unused.sock"),  # ignored: systemd's socket wins
        "--data-dir",
        str(tmp_path / "data"),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, str(unix_listener.fileno()), *args],
        pass_fds=(unix_listener.fileno(),),
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    unix_listener.close()  # only the daemon holds it now
    try:
        status: dict[str, object] = {}
        wait_for(lambda: ask(path) is not None)
        status = ask(path) or {}
        assert status["config"]["batch_size"] == 5  # type: ignore[index]
        assert not (sock_dir / "unused.sock").exists()

        config.write_text("batch_size = 9\nflush_interval = 1.5\n")  # SIGHUP re-reads it
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: (ask(path) or {}).get("config", {}).get("batch_size") == 9)  # type: ignore[union-attr]

        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
        assert proc.returncode == 0, stderr
        # the start-up line names the inherited socket, not the --socket it ignored
        assert f"listening on {path}, passed by systemd (socket activation)" in stderr
        assert "unused.sock" not in stderr
        assert "SIGHUP: settings reloaded" in stderr
        assert path.exists()  # systemd's socket file: not ours to remove
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_a_bad_inherited_socket_is_one_line_and_exit_1(tmp_path: Path) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PFCOLLECTOR_", "LISTEN_"))}
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                WRAPPER,
                str(udp.fileno()),
                "serve",
                "--data-dir",
                str(tmp_path / "data"),
            ],
            pass_fds=(udp.fileno(),),
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        udp.close()
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: file descriptor 3 is AF_INET SOCK_DGRAM, not a Unix stream socket")
    )
