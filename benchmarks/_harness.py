"""Processes for the benchmarks: the daemon, the reference master, the baseline, the clients.

Every process started here is registered in :data:`CHILDREN`; :func:`kill_all` (called from a
``finally`` in ``run.py``) kills whatever is still alive, by pid. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pfcollector.control import DaemonUnreachable, request

__all__ = [
    "CHILDREN",
    "DAEMON_ENV",
    "BenchError",
    "ClientRun",
    "DaemonProc",
    "cpu_seconds",
    "free_port",
    "kill_all",
    "load_now",
    "machine_info",
    "run_clients",
    "run_together",
    "start_baseline",
    "start_master",
]

HERE = Path(__file__).resolve().parent
PY = sys.executable
#: Every process started, so that a failure anywhere still kills them all.
CHILDREN: list[subprocess.Popen[bytes]] = []
#: Environment of the daemon and master processes (``run.py --src`` sets ``PYTHONPATH``).
DAEMON_ENV: dict[str, str] = dict(os.environ)


class BenchError(Exception):
    """Something broke (events lost, a process died, a wait ran out): the run fails."""


def kill_all() -> None:
    """Kill every child still running (by pid), and reap it."""
    for proc in CHILDREN:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    CHILDREN.clear()


def _spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, **kw)
    CHILDREN.append(proc)
    return proc


def load_now() -> dict[str, Any]:
    """The machine's load right now (other people's tests make the figures noisy)."""
    one, five, fifteen = os.getloadavg()
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        uptime = ""
    return {"load1": one, "load5": five, "load15": fifteen, "uptime": uptime.strip()}


def machine_info(data_root: Path) -> dict[str, Any]:
    """What the figures were measured on."""
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    fs = "?"
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        best = ""
        target = str(data_root.resolve())
        for line in f:
            parts = line.split()
            if len(parts) > 2 and target.startswith(parts[1]) and len(parts[1]) >= len(best):
                best, fs = parts[1], f"{parts[2]} on {parts[1]} ({parts[0]})"
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "data_fs": fs,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the ")" of comm: state is fields[0], utime is field 14 of the line, i.e. [11]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (and is closed now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_line(proc: subprocess.Popen[bytes], want: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            if want.encode() in buf:
                return buf.decode(errors="replace")
        elif proc.poll() is not None:
            break
    raise BenchError(f"{proc.args!r} did not print {want!r} within {timeout}s: {buf[-500:]!r}")


@dataclass
class DaemonProc:
    """A ``pfcollector serve`` process (optionally with ``py-spy record`` attached)."""

    proc: subprocess.Popen[bytes]
    socket_path: Path
    data_dir: Path
    log_path: Path
    pid: int = 0
    profiler: subprocess.Popen[bytes] | None = None

    def status(self) -> dict[str, Any]:
        """The daemon's ``status`` reply."""
        result: dict[str, Any] = request(self.socket_path, "status", timeout=30.0)
        return result

    def vmhwm_kib(self) -> int:
        """Peak resident set size so far (``VmHWM``), KiB."""
        return vmhwm_kib(self.pid)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM the daemon, wait (bounded) for it (and its py-spy) to exit."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise BenchError(f"daemon {self.pid} did not stop within {timeout}s") from None
        if self.profiler is not None:  # py-spy writes its output when its target exits
            try:
                self.profiler.wait(30)
            except subprocess.TimeoutExpired:
                self.profiler.kill()
                raise BenchError("py-spy did not finish writing its profile") from None
        return rc

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""


def start_daemon(
    root: Path,
    name: str,
    extra: list[str] | None = None,
    profile: Path | None = None,
    *,
    reuse: bool = False,
) -> DaemonProc:
    """Start a daemon on data directory ``root/name`` (fresh unless ``reuse``); return once it
    answers ``status``."""
    daemon = spawn_daemon(root, name, extra, reuse=reuse)
    return wait_daemon(daemon, profile)


def spawn_daemon(
    root: Path, name: str, extra: list[str] | None = None, *, reuse: bool = False
) -> DaemonProc:
    """Start a daemon process on ``root/name`` without waiting for it (see :func:`wait_daemon`:
    many daemons start faster spawned together, then waited for)."""
    data = root / name
    data.mkdir(parents=True, exist_ok=reuse, mode=0o750)  # serve refuses a dir open to others
    sock = data / "pf.sock"
    log = data / f"daemon-{time.monotonic_ns()}.log"
    cmd = [PY, "-m", "pfcollector", "serve", "--socket", str(sock), "--data-dir", str(data),
           "--log-level", "warning", *(extra or [])]  # fmt: skip
    with open(log, "wb", opener=lambda path, flags: os.open(path, flags, 0o640)) as logf:
        proc = _spawn(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                      env=DAEMON_ENV)  # fmt: skip
    return DaemonProc(proc, sock, data, log)


def wait_daemon(daemon: DaemonProc, profile: Path | None = None) -> DaemonProc:
    """Wait until a spawned daemon answers ``status`` (and attach py-spy with ``profile``)."""
    proc = daemon.proc
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise BenchError(f"daemon exited with {proc.returncode}: {daemon.log_tail()}")
        try:
            daemon.pid = int(daemon.status()["pid"])
        except (DaemonUnreachable, OSError):
            if time.monotonic() > deadline:
                raise BenchError(f"daemon did not answer within 60s: {daemon.log_tail()}") from None
            time.sleep(0.05)
            continue
        if profile is not None:  # attach now: the profile leaves out start-up (imports)
            spy = shutil.which("py-spy", path=str(Path(PY).parent)) or "py-spy"
            daemon.profiler = _spawn([spy, "record", "--pid", str(daemon.pid), "--format", "raw",
                                      "--rate", "250", "--output", str(profile)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)  # fmt: skip
            _wait_line(daemon.profiler, "Sampling", 20)
        return daemon


def start_baseline(root: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """The trivial read-and-decode server (``_baseline.py``), listening."""
    root.mkdir(parents=True, exist_ok=True)
    sock = root / "baseline.sock"
    proc = _spawn([PY, str(HERE / "_baseline.py"), "--socket", str(sock)],
                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)  # fmt: skip
    _wait_line(proc, "ready", 20)
    return proc, sock


def start_master(root: Path, cost_per_item: float = 0.0) -> tuple[subprocess.Popen[bytes], str]:
    """The reference master (``pfcollector.devmaster``) in its own process, on a file db;
    ``cost_per_item`` seconds per stored result (``--cost-per-item``)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = _spawn([PY, "-m", "pfcollector.devmaster", "--port", str(port),
                   "--db", str(root / "master.db"), "--cost-per-item", repr(cost_per_item)],
                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=DAEMON_ENV)  # fmt: skip
    _wait_line(proc, "listening", 20)
    return proc, f"http://127.0.0.1:{port}"


def stop_proc(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class ClientRun:
    """What a set of client processes saw."""

    results: list[dict[str, Any]]
    t_go: float
    latencies: array[float] = field(default_factory=lambda: array("d"))

    @property
    def sent(self) -> int:
        return sum(r["sent"] for r in self.results)

    @property
    def acked(self) -> int:
        return sum(r["acked"] for r in self.results)

    @property
    def elapsed(self) -> float:
        """From ``go`` to the last ack of the last client."""
        return max(r["t_last_ack"] or self.t_go for r in self.results) - self.t_go

    @property
    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            for code, n in r["errors"].items():
                out[code] = out.get(code, 0) + n
        return out

    def check_complete(self, what: str) -> None:
        """Every event acknowledged, none refused: otherwise the benchmark is broken."""
        short = [r for r in self.results if r["offered"] != r["sent"]]
        if self.acked != self.sent or self.errors or short:
            bad = [r for r in self.results if r["acked"] != r["sent"] or r["errors"]]
            raise BenchError(
                f"{what}: {self.acked} of {self.sent} events acknowledged, errors "
                f"{self.errors}; first bad client: {bad[0] if bad else None}"
            )


def run_together(cmds: list[list[str]], what: str, timeout: float) -> float:
    """Start every command, wait until each printed ``ready``, say ``go`` to all at once, and
    wait up to ``timeout`` s for each to exit 0; returns the ``go`` time (``time.monotonic``)."""
    procs = [_spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for cmd in cmds]
    try:
        for proc in procs:
            _wait_line(proc, "ready", 120)
        t_go = time.monotonic()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        for proc in procs:
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise BenchError(f"{what} {proc.args!r} did not finish") from None
            if rc != 0:
                raise BenchError(f"{what} exited with {rc}: {proc.args!r}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    return t_go


def run_clients(
    socket_path: Path,
    work: Path,
    mixes: list[str],
    count: int,
    *,
    window: int = 4096,
    rate: float = 0.0,
    duration: float = 0.0,
    max_seconds: float = 60.0,
    latency: bool = False,
) -> ClientRun:
    """One ``_load.py`` process per entry of ``mixes``, each sending up to ``count`` events.

    ``rate`` is per process (events/s, 0 = as fast as the window allows); with ``duration``,
    a process stops offering events after that many seconds and waits for its acks (bounded
    by ``max_seconds`` in all).
    """
    work.mkdir(parents=True, exist_ok=True)
    cmds = []
    for i, mix in enumerate(mixes):
        cmd = [PY, str(HERE / "_load.py"), "--socket", str(socket_path), "--mix", mix,
               "--count", str(count), "--index", str(i), "--window", str(window),
               "--rate", str(rate), "--duration", str(duration),
               "--max-seconds", str(max_seconds),
               "--out", str(work / f"client{i}.json")]  # fmt: skip
        if latency:
            cmd += ["--latency-out", str(work / f"client{i}.lat")]
        cmds.append(cmd)
    t_go = run_together(cmds, "client", max_seconds + 30)
    results = [json.loads((work / f"client{i}.json").read_text()) for i in range(len(mixes))]
    lat = array("d")
    if latency:
        for i in range(len(mixes)):
            with open(work / f"client{i}.lat", "rb") as f:
                lat.frombytes(f.read())
    return ClientRun(results, t_go, lat)


def vmhwm_kib(pid: int) -> int:
    """Peak resident set size so far (``VmHWM``) of process ``pid``, KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise BenchError(f"no VmHWM for pid {pid}")
