"""The Go client (``clients/go``) and the ``examples/go-bot`` program, run by the Go toolchain.

Rules of this module:

* ``go vet`` and ``go test`` run offline: ``GOFLAGS=-mod=mod``, ``GOPROXY=off``, and
  ``GOCACHE``/``GOPATH`` in a temporary directory, so nothing is downloaded and the user's
  caches are untouched. The module uses the standard library only.
* The Go tests start ``pfcollector serve`` and ``pfcollector dev-master`` themselves
  (``PFCLIENT_TEST_PFCOLLECTOR`` points at this venv's ``pfcollector``), so they are real
  end-to-end tests; here we also check that none of them skipped (but the two that need the
  outbox importer, when this pfcollector has none).
* Without ``go`` every test here is skipped with the reason (``apt-get install golang-go``);
  CI installs it and sets ``PFCOLLECTOR_REQUIRE_TOOLCHAINS=1``, which makes that a failure.
  ``-race`` needs cgo and a C compiler; without them that test says so (fails under CI).
* The example runs against a live daemon subprocess delivering to an in-process
  :class:`DevMaster`, and the checks are made on what the master stored.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pfcollector.devmaster import DevMaster

from . import daemonproc
from .conftest import missing, require_tool
from .daemonproc import serve_process

ROOT = Path(__file__).resolve().parents[1]
GO_CLIENT = ROOT / "clients" / "go"
GO_BOT = ROOT / "examples" / "go-bot"
GO = shutil.which("go")
WAIT_S = 20.0



@pytest.fixture(scope="module", autouse=True)
def go_tool() -> str:
    """Every test here needs go: skipped without it, failed under CI (conftest.require_tool)."""
    return require_tool("go")


@pytest.fixture(scope="module")
def go_env() -> Iterator[dict[str, str]]:
    """The environment of every go command: offline, private caches, our pfcollector."""
    tmp = Path(tempfile.mkdtemp(prefix="pfgo-env"))
    bindir = Path(sys.executable).parent
    env = {
        **os.environ,
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",
        "GOCACHE": str(tmp / "cache"),
        "GOPATH": str(tmp / "gopath"),
        "GOTMPDIR": "",
        "PFCLIENT_TEST_PFCOLLECTOR": str(bindir / "pfcollector"),
        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for var in ("PFCOLLECTOR_SOCKET", "PFCOLLECTOR_OUTBOX", "PFCOLLECTOR_DATA_DIR"):
        env.pop(var, None)
    yield env
    shutil.rmtree(tmp, ignore_errors=True)


def go(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    assert GO is not None
    result = subprocess.run(
        [GO, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"go {' '.join(args)} failed:\n{output}"
    return output


def test_go_vet(go_env: dict[str, str]) -> None:
    for module in (GO_CLIENT, GO_BOT):
        go(["vet", "./..."], module, go_env)
    unformatted = subprocess.run(
        [str(Path(GO or "go").parent / "gofmt"), "-l", str(GO_CLIENT), str(GO_BOT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unformatted.stdout == "", f"not gofmt-ed: {unformatted.stdout}"


#: Go tests that need the daemon's outbox importer (``pfcollector.outbox``).
OUTBOX_TESTS = (
    "TestCrashGoesToTheOutboxWhileTheDaemonIsDown",
    "TestAHungDaemonCostsOneCrashTimeoutAndLosesNothing",
)


def test_go_test_against_a_live_daemon(go_env: dict[str, str]) -> None:
    out = go(["test", "-count=1", "-v", "./..."], GO_CLIENT, go_env)
    required = [
        "TestEveryBotEventTypeReachesTheMaster",
        "TestHandleEventFrom16Goroutines",
        "TestKill9OfTheDaemonLosesNoCrash",
    ]
    if importlib.util.find_spec("pfcollector.outbox") is not None:
        required += OUTBOX_TESTS
    else:  # a daemon without the importer: those two say so and skip
        for name in OUTBOX_TESTS:
            assert f"--- SKIP: {name}" in out, out
    for name in required:  # the live tests found pfcollector and ran
        assert f"--- PASS: {name}" in out, out
    skipped = re.findall(r"--- SKIP: (\w+)", out)
    assert set(skipped) <= set(OUTBOX_TESTS), out


def race_supported(env: dict[str, str]) -> str | None:
    """``None`` when ``go test -race`` can run here, else why not."""
    assert GO is not None
    probe = subprocess.run(
        [GO, "env", "CGO_ENABLED", "GOOS", "GOARCH", "CC"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    cgo, goos, goarch, cc = [*probe.stdout.split("\n"), "", "", "", ""][:4]
    if f"{goos}/{goarch}" not in ("linux/amd64", "linux/arm64", "darwin/amd64", "darwin/arm64"):
        return f"the race detector does not support {goos}/{goarch}"
    if cgo.strip() != "1" or shutil.which(cc.strip() or "gcc") is None:
        return "the race detector needs cgo and a C compiler (apt-get install gcc)"
    return None


def test_go_test_race(go_env: dict[str, str]) -> None:
    reason = race_supported(go_env)
    if reason is not None:
        missing(reason)  # skipped, or failed under PFCOLLECTOR_REQUIRE_TOOLCHAINS=1 (CI)
    out = go(["test", "-race", "-count=1", "-v", "./..."], GO_CLIENT, go_env, timeout=900)
    assert "--- PASS: TestHandleEventFrom16Goroutines" in out, out
    assert "DATA RACE" not in out


# -- the example ---------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT_S) -> None:
    daemonproc.wait_for(what, check, timeout)


@pytest.fixture
def master() -> Iterator[DevMaster]:
    with DevMaster() as m:
        yield m


@pytest.fixture
def daemon(master: DevMaster) -> Iterator[tuple[Path, Path]]:
    """A live daemon subprocess delivering to ``master``: its socket and data dir."""
    tmp = Path(tempfile.mkdtemp(prefix="pfgo"))
    sock, data = tmp / "pf.sock", tmp / "data"
    try:
        with serve_process(sock, data, master.url):
            yield sock, data
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_go_bot_example_delivers_every_event_type(
    go_env: dict[str, str], daemon: tuple[Path, Path], master: DevMaster
) -> None:
    sock, _ = daemon
    out = go(["run", ".", "-socket", str(sock), "-job", "job-gobot"], GO_BOT, go_env)
    match = re.search(r"^crash sha256 ([0-9a-f]{64}) input ([0-9a-f]+)$", out, re.M)
    assert match, out
    sha, input_hex = match.groups()
    assert hashlib.sha256(bytes.fromhex(input_hex)).hexdigest() == sha
    assert "warn" not in out, out

    def rows(kind: str) -> list[dict[str, Any]]:
        return [r for r in master.rows(kind) if r["job_id"] == "job-gobot"]

    def bodies() -> dict[str, dict[str, Any]]:
        return {
            str(r["body"]["type"]): r["body"]
            for r in master.rows("status")
            if r["body"].get("job_id") == "job-gobot"
        }

    wait_for("the crash", lambda: len(rows("crash")) == 1)
    (crash,) = rows("crash")
    assert (crash["hash"], crash["type"], crash["exit_code"]) == (sha, "panic", 2)
    assert crash["output"].startswith("panic: runtime error: index out of range")
    assert "parseRecord" in crash["stack_trace"]
    assert hashlib.sha256(Path(crash["file_path"]).read_bytes()).hexdigest() == sha
    wait_for("corpus", lambda: len(rows("corpus")) == 3)
    assert all(r["files"][0].startswith("id:00000") for r in rows("corpus"))
    wait_for("coverage", lambda: len(rows("coverage")) >= 1)
    wait_for("stats and lifecycle", lambda: len(bodies()) == 5)
    got = bodies()
    assert set(got) == {"fuzzer_stats", "started", "stopped", "error", "timeout"}
    assert got["fuzzer_stats"]["unique_crashes"] == 1
    assert got["fuzzer_stats"]["executions"] > 0
    assert got["started"]["message"] == "fuzzer=go-bot type=gofuzz"
    assert got["stopped"]["message"] == "found a crash fuzzer=go-bot"
    assert "progress_updates = 1" in out and "daemon_connected = true" in out
