"""The C client (``clients/c/pfclient.h``) and the libFuzzer example, end to end.

Rules of this module:

* Everything is real: the header is compiled by gcc, clang (``-std=c99 -Wall -Wextra -Werror
  -pedantic``) and g++ (``-std=c++11``); C programs run as subprocesses against a live
  ``python -m pfcollector serve`` subprocess delivering to an in-process :class:`DevMaster` on
  127.0.0.1, and the checks are made on what the master stored.
* The tests are plain sync functions (subprocesses, no trio). Every subprocess has a timeout,
  and every daemon is stopped in a ``finally`` block: SIGTERM, then wait.
* A missing compiler FAILS with a message naming the Debian package (CI installs ``clang``,
  ``gcc`` and ``g++``). Only clang may be excused, and only explicitly: with
  ``PFCOLLECTOR_ALLOW_NO_CLANG=1`` the clang tests are skipped (and ``-ra`` lists them).
* Built binaries go to a per-module temporary directory; socket paths stay short (108 bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

import pfclient
from pfcollector.devmaster import DevMaster

ROOT = Path(__file__).resolve().parents[1]
C_DIR = ROOT / "clients" / "c"
HEADER = C_DIR / "pfclient.h"
SENDER = C_DIR / "tests" / "sender.c"
LIBFUZZER_DIR = ROOT / "examples" / "libfuzzer"
C99 = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"]
CXX11 = ["-std=c++11", "-Wall", "-Wextra", "-Werror", "-pedantic"]
PACKAGES = {"gcc": "gcc", "g++": "g++", "clang": "clang"}
WAIT_S = 15.0  # for anything to reach the master (the daemon flushes every 0.2 s)


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is not None:
        return path
    if tool == "clang" and os.environ.get("PFCOLLECTOR_ALLOW_NO_CLANG") == "1":
        pytest.skip("clang is not installed (allowed by PFCOLLECTOR_ALLOW_NO_CLANG=1)")
    pytest.fail(f"{tool} is required for the C client tests: apt-get install -y {PACKAGES[tool]}")


def run(cmd: list[str], timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def compile_ok(cmd: list[str]) -> None:
    result = run(cmd)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}{result.stderr}"
    assert result.stderr == "", f"warnings from {cmd[0]}:\n{result.stderr}"


def wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def build_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pfc"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def sender(build_dir: Path) -> Path:
    out = build_dir / "sender"
    compile_ok([require("gcc"), *C99, "-O2", "-o", str(out), str(SENDER)])
    return out


@pytest.fixture(scope="module")
def master() -> Iterator[DevMaster]:
    with DevMaster() as m:
        yield m


@pytest.fixture(scope="module")
def daemon(master: DevMaster, build_dir: Path) -> Iterator[Path]:
    """A live daemon subprocess delivering to ``master``; yields its socket path."""
    sock = build_dir / "pf.sock"
    cmd = [sys.executable, "-m", "pfcollector", "serve", "--socket", str(sock),
           "--data-dir", str(build_dir / "data"), "--master", master.url, "--bot-id", "b",
           "--flush-interval", "0.2", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"the daemon exited with {proc.returncode}: {proc.stderr.read()}")
            try:
                pfclient.status(sock, timeout=1.0)
            except pfclient.PfClientError:
                return False
            return True

        wait_for("the daemon to answer status", ready)
        yield sock
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def rows(master: DevMaster, kind: str, job_id: str) -> list[dict[str, Any]]:
    return [r for r in master.rows(kind) if r["job_id"] == job_id]


def status_bodies(master: DevMaster, job_id: str) -> list[dict[str, Any]]:
    return [r["body"] for r in master.rows("status") if r["body"].get("job_id") == job_id]


# -- compiling --------------------------------------------------------------------------------

DECLARATIONS_ONLY = """
#include <stdio.h>
#include <string.h>
#include "pfclient.h"
int use(pf_client *c) {
    pf_stats_t st;
    memset(&st, 0, sizeof st);
    return pf_stats(c, &st) + pf_flush(c, 1);
}
"""


@pytest.mark.parametrize("compiler", ["gcc", "clang"])
def test_header_compiles_as_c99_without_warnings(compiler: str, build_dir: Path) -> None:
    cc = require(compiler)
    compile_ok([cc, *C99, "-O2", "-o", str(build_dir / f"sender-{compiler}"), str(SENDER)])
    decl = build_dir / f"decl-{compiler}.c"
    decl.write_text(DECLARATIONS_ONLY)
    compile_ok([cc, *C99, "-I", str(C_DIR), "-c", "-o", str(decl.with_suffix(".o")), str(decl)])


CXX_PROGRAM = """
#define PFCLIENT_IMPLEMENTATION
#include "pfclient.h"
#include <cstdio>
int main() {
    pf_client *c = new pf_client;
    int rc = pf_connect(c, "/nonexistent-dir/pf.sock", "job-cxx", "g++");
    std::printf("%d %s\\n", rc, pf_last_error(c));
    pf_close(c);
    delete c;
    return rc == PF_ENOTCONN ? 0 : 1;
}
"""


def test_header_is_usable_from_cxx(build_dir: Path) -> None:
    cxx = require("g++")
    src = build_dir / "cxx.cpp"
    src.write_text(CXX_PROGRAM)
    out = build_dir / "cxx"
    compile_ok([cxx, *CXX11, "-I", str(C_DIR), "-o", str(out), str(src)])
    decl = build_dir / "decl.cpp"
    decl.write_text(DECLARATIONS_ONLY)
    compile_ok([cxx, *CXX11, "-I", str(C_DIR), "-c", "-o", str(build_dir / "decl.o"), str(decl)])
    result = run([str(out)], timeout=10)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cannot reach the pfcollector daemon" in result.stdout


# -- a live daemon ----------------------------------------------------------------------------

SMALL_INPUT = bytes([0x50, 0x46, 0x5A, 0, 0xFF, 0x80, 0x0A, 0x78])
BIG_INPUT = bytes((i * 7 + (i >> 9)) & 0xFF for i in range(300 * 1024))


def test_events_reach_the_master(sender: Path, daemon: Path, master: DevMaster) -> None:
    result = run([str(sender), "events", str(daemon)], timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    ids = dict(line.split(" ", 1) for line in result.stdout.splitlines())

    wait_for("2 crashes", lambda: len(rows(master, "crash", "job-c")) == 2)
    crashes = {r["id"]: r for r in rows(master, "crash", "job-c")}
    small, big = crashes[ids["crash-small"]], crashes[ids["crash-big"]]
    assert small["hash"] == hashlib.sha256(SMALL_INPUT).hexdigest()
    assert (small["size"], small["type"], small["signal"], small["exit_code"]) == (8, "SEGV", 11, 0)
    assert small["stack_trace"] == "#0 0x1 in parse_record target.c:12\n#1 main"
    assert small["output"] == "out ? put"  # an invalid UTF-8 byte, replaced
    assert big["hash"] == hashlib.sha256(BIG_INPUT).hexdigest()  # streamed past the ring
    assert (big["size"], big["type"], big["signal"], big["exit_code"]) == (
        len(BIG_INPUT), "heap-buffer-overflow", 6, 134)  # fmt: skip
    assert (big["output"], big["stack_trace"]) == ("", "")

    wait_for("the corpus update", lambda: len(rows(master, "corpus", "job-c")) == 1)
    (corpus,) = rows(master, "corpus", "job-c")
    assert corpus["id"] == ids["corpus"]
    assert corpus["files"] == ["queue/id:000001", "queue/id:000002,op:havoc"]
    assert corpus["total_size"] == 2048

    wait_for("coverage", lambda: len(rows(master, "coverage", "job-c")) >= 1)
    for cov in rows(master, "coverage", "job-c"):  # coalescing may keep only some of them
        assert cov["edges"] == 1500 or 2000 <= cov["edges"] < 4000

    def stats() -> list[dict[str, Any]]:
        return [b for b in status_bodies(master, "job-c") if b.get("type") == "fuzzer_stats"]

    wait_for("stats", lambda: len(stats()) == 1)
    (body,) = stats()
    assert body["id"] == ids["stats"] and body["fuzzer"] == "c-sender"
    assert {k: body[k] for k in ("executions", "exec_per_second", "total_edges",
                                 "covered_edges", "coverage_percent", "unique_crashes",
                                 "total_crashes", "corpus_size", "cpu_usage",
                                 "memory_usage")} == {
        "executions": 123456, "exec_per_second": 8500.5, "total_edges": 4000,
        "covered_edges": 1500, "coverage_percent": 37.5, "unique_crashes": 2,
        "total_crashes": 2, "corpus_size": 312, "cpu_usage": 99.5, "memory_usage": 1 << 20,
    }  # fmt: skip
    wait_for("the started event", lambda: any(
        b.get("type") == "started" for b in status_bodies(master, "job-c")))  # fmt: skip
    started = next(b for b in status_bodies(master, "job-c") if b.get("type") == "started")
    assert started["message"] == "hello from C" and started["id"] == ids["started"]
    assert all(n == 1 for n in master.submissions().values())


# -- fail-open --------------------------------------------------------------------------------


def test_no_daemon_every_call_fails_fast(sender: Path, build_dir: Path) -> None:
    started = time.monotonic()
    result = run([str(sender), "failopen", str(build_dir / "nobody-here.sock")], timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr  # no call >= 0 or > 200 ms
    lines = [line.split() for line in result.stdout.splitlines() if line[0] != "l"]
    assert len(lines) == 1 + 5 * 200
    assert all(int(rc) == -2 for _, rc, _ in lines)  # PF_ENOTCONN
    assert elapsed < 10
    assert "cannot reach the pfcollector daemon" in result.stdout


def _frame(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def _read_frame(conn: socket.socket) -> dict[str, Any]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            assert chunk, "client closed early"
            data += chunk
        return data

    (size,) = struct.unpack(">I", exactly(4))
    message: dict[str, Any] = msgpack.unpackb(exactly(size), raw=False)
    return message


def test_daemon_refuses_then_vanishes(sender: Path, build_dir: Path) -> None:
    """A scripted daemon: welcome (with an unknown nested key), refuse the crash, go away."""
    path = build_dir / "gone.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(20)
    seen: list[dict[str, Any]] = []

    def script() -> None:
        conn, _ = listener.accept()
        listener.close()
        path.unlink()
        with conn:
            conn.settimeout(20)
            seen.append(_read_frame(conn))
            welcome = {"t": "welcome", "v": 1, "daemon": "scripted", "max_frame": 1 << 24,
                       "later": {"a": [1, 2.5, None]}}  # fmt: skip
            conn.sendall(_frame(welcome))
            crash = _read_frame(conn)
            seen.append(crash)
            conn.sendall(_frame({"t": "error", "code": "too_long", "seq": crash["seq"],
                                 "message": "crash event: field 'type' too long",
                                 "field": "type", "fatal": False})
                         + _frame({"t": "ack", "seq": crash["seq"]}))  # fmt: skip

    thread = threading.Thread(target=script)
    thread.start()
    try:
        result = run([str(sender), "gone", str(path)], timeout=30)
    finally:
        thread.join(timeout=30)
        with contextlib.suppress(OSError):
            listener.close()
    assert result.returncode == 0, result.stdout + result.stderr  # not -SIGPIPE, all errors
    hello, crash = seen
    assert (hello["t"], hello["v"], hello["job_id"], hello["fuzzer"]) == (
        "hello", 1, "job-c", "c-sender")  # fmt: skip
    assert crash["kind"] == "crash" and crash["input"] == b"boom" and crash["seq"] == 1
    assert len(crash["id"]) == 36 and crash["id"][14] == "4"  # UUID-formatted, version 4
    assert "crash -4 daemon error too_long (seq 1)" in result.stdout  # PF_EREJECTED


# -- libFuzzer --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzer(build_dir: Path) -> Path:
    require("clang")
    out = build_dir / "fuzz_parser"
    result = run(["sh", str(LIBFUZZER_DIR / "build.sh"), str(out)], env={**os.environ})
    assert result.returncode == 0, (
        "building the libFuzzer example failed (Debian: apt-get install -y clang, which brings "
        f"libclang-rt-dev with libFuzzer):\n{result.stdout}{result.stderr}"
    )
    return out


def _fuzz_env(sock: Path, job_id: str, report_ms: int) -> dict[str, str]:
    return {**os.environ, "PFCOLLECTOR_SOCKET": str(sock), "PFCOLLECTOR_JOB_ID": job_id,
            "PFCOLLECTOR_REPORT_MS": str(report_ms), "ASAN_OPTIONS": "detect_leaks=0"}  # fmt: skip


def test_libfuzzer_reports_stats_and_coverage_at_exit(
    fuzzer: Path, daemon: Path, master: DevMaster, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(LIBFUZZER_DIR / "seeds", corpus)
    result = run([str(fuzzer), "-runs=0", str(corpus)], cwd=tmp_path,
                 env=_fuzz_env(daemon, "lf-seeds", 60_000), timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    def kinds() -> set[str]:
        return {str(b.get("type")) for b in status_bodies(master, "lf-seeds")}

    wait_for("started, stats and stopped", lambda: kinds() >= {"started", "fuzzer_stats",
                                                                "stopped"})  # fmt: skip
    stats = [b for b in status_bodies(master, "lf-seeds") if b["type"] == "fuzzer_stats"]
    assert stats[-1]["executions"] >= 1 and stats[-1]["fuzzer"] == "libfuzzer"
    assert 0 < stats[-1]["covered_edges"] <= stats[-1]["total_edges"]
    wait_for("coverage", lambda: len(rows(master, "coverage", "lf-seeds")) >= 1)
    assert rows(master, "coverage", "lf-seeds")[-1]["edges"] == stats[-1]["covered_edges"]


def test_libfuzzer_crash_reaches_the_master(
    fuzzer: Path, daemon: Path, master: DevMaster, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(LIBFUZZER_DIR / "seeds", corpus)  # one byte away from the crash
    result = run([str(fuzzer), "-seed=1", "-max_total_time=30", str(corpus)], cwd=tmp_path,
                 env=_fuzz_env(daemon, "lf-crash", 1), timeout=60)  # fmt: skip
    assert result.returncode != 0, "libFuzzer found no crash:\n" + result.stderr[-3000:]
    (crash_file,) = tmp_path.glob("crash-*")  # libFuzzer still writes its own artifact
    data = crash_file.read_bytes()

    wait_for("the crash", lambda: len(rows(master, "crash", "lf-crash")) == 1)
    (crash,) = rows(master, "crash", "lf-crash")
    assert crash["hash"] == hashlib.sha256(data).hexdigest() and crash["size"] == len(data)
    # The hook says SEGV; the daemon buckets by the ASan report and sends its type (bugs.py).
    assert (crash["type"], crash["signal"], crash["exit_code"]) == (
        "null-dereference WRITE",
        11,
        1,
    )
    assert "ERROR: AddressSanitizer: SEGV" in crash["stack_trace"]
    assert "pfz_parse" in crash["stack_trace"]
    assert crash["output"].startswith("SUMMARY: AddressSanitizer: SEGV")
    wait_for("periodic stats", lambda: any(
        b.get("type") == "fuzzer_stats" for b in status_bodies(master, "lf-crash")))  # fmt: skip
