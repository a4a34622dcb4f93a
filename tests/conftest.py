"""Shared fixtures. Unix socket paths must stay under 108 bytes, so sockets live in a short
temporary directory rather than in ``tmp_path``.

Optional toolchains (clang, gcc, g++, afl++, go): a test that needs one calls
:func:`require_tool` first. When the tool is missing the test is SKIPPED with a reason naming
the tool and the Debian package (pytest's ``-ra`` summary lists it), so the README's test
command passes on a machine with only Python and pip. CI sets ``PFCOLLECTOR_REQUIRE_TOOLCHAINS=1``
(see ``.ci/run``): then a missing tool FAILS the test instead, so CI never skips silently.

    from .conftest import require_tool

    def test_header_compiles_with_clang() -> None:
        clang = require_tool("clang")          # a path, or the test is skipped / failed
        ...

Something else optional the machine may lack (a tmpfs mount in an unprivileged container):
``missing("why")`` skips or fails the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import trio

from pfcollector.config import Config
from pfcollector.daemon import Daemon
from pfcollector.events import Event, Kind

REQUIRE_TOOLCHAINS = "PFCOLLECTOR_REQUIRE_TOOLCHAINS"
"""Set to ``1`` to turn every "toolchain missing" skip into a failure (CI does)."""

# The Debian package that brings each tool (named in the skip reason).
TOOL_PACKAGES = {
    "clang": "clang",
    "gcc": "gcc",
    "g++": "g++",
    "afl-fuzz": "afl++",
    "afl-cc": "afl++",
    "go": "golang-go",
    "systemd-analyze": "systemd",
}


def require_tool(*names: str, package: str | None = None) -> str:
    """The path of the first of ``names`` on PATH; else skip (or fail under CI) the test.

    ``require_tool("clang")``; ``require_tool("afl-cc", "afl-gcc", package="afl++")`` accepts
    any of several names. Call it at the start of a sync test, or in a sync fixture of a trio
    test (a skip raised inside trio loses its reason in pytest's summary).
    """
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    pkg = package or TOOL_PACKAGES.get(names[0], names[0])
    what = " or ".join(names)
    missing(f"{what} not installed (optional toolchain; Debian: apt-get install {pkg})")


def missing(reason: str) -> NoReturn:
    """Skip the test for ``reason`` (something optional the machine lacks), or fail it when
    ``PFCOLLECTOR_REQUIRE_TOOLCHAINS=1`` (CI has everything, so nothing may skip there)."""
    if os.environ.get(REQUIRE_TOOLCHAINS) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_TOOLCHAINS}=1 requires it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _private_client_outbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that falls back to its outbox writes under the test's tmp_path, never in
    the home directory (a test that needs the daemon's outbox names it)."""
    monkeypatch.setenv("PFCOLLECTOR_OUTBOX", str(tmp_path / "client-outbox"))


@pytest.fixture(scope="session")
def clang() -> str:
    """clang's path, for tests that build C: ``@pytest.mark.usefixtures("clang")`` (a sync
    fixture, so the skip keeps its reason in trio tests too)."""
    return require_tool("clang")


@pytest.fixture(scope="session")
def afl_tools() -> tuple[str, str]:
    """``(afl-fuzz, afl-cc)``, for tests that run real AFL++."""
    afl_fuzz = require_tool("afl-fuzz")
    return afl_fuzz, require_tool("afl-cc", "afl-clang-fast", "afl-gcc", package="afl++")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pf"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_config(tmp_path: Path, sock_dir: Path) -> Callable[..., Config]:
    def make(**overrides: Any) -> Config:
        values: dict[str, Any] = {
            "socket_path": sock_dir / "pf.sock",
            "data_dir": tmp_path / "data",
        }
        values.update(overrides)
        return Config(**values)

    return make


@pytest.fixture
async def local_daemon(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> AsyncIterator[Daemon]:
    """A daemon in local mode, in this test's trio run, with a real socket and spool.

    Coalescing is off so that every event can be found in the spool by id; the policies
    have their own tests (test_policies.py).
    """
    config = make_config(coalesce=False)
    daemon: Daemon = await nursery.start(
        lambda task_status: Daemon(config).run(handle_signals=False, task_status=task_status)
    )
    yield daemon
    daemon.stop()


async def start_daemon(nursery: trio.Nursery, config: Config) -> Daemon:
    """A daemon for ``config`` in ``nursery`` (signals left to the test runner)."""
    daemon: Daemon = await nursery.start(
        lambda task_status: Daemon(config).run(handle_signals=False, task_status=task_status)
    )
    return daemon


def make_event(kind: Kind = Kind.COVERAGE, job_id: str = "job-1", **fields: Any) -> Event:
    defaults: dict[Kind, dict[str, Any]] = {
        Kind.CRASH: {
            "type": "SEGV",
            "signal": 11,
            "exit_code": 0,
            "output": "",
            "stack_trace": "",
            "hash": "ab" * 32,
            "size": 3,
            "file_path": "/x",
        },
        Kind.COVERAGE: {"edges": 10, "new_edges": 1, "exec_count": 100},
        Kind.CORPUS: {"files": ["a"], "total_size": 1},
        Kind.STATS: {"executions": 5},
    }
    return Event(
        id=str(uuid.uuid4()),
        kind=kind,
        job_id=job_id,
        fuzzer="afl",
        timestamp_ns=1_700_000_000_000_000_000,
        fields={**defaults.get(kind, {"message": ""}), **fields},
    )


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger's handlers and level back after a test that configures logging
    (the CLI's commands do): ``pytestmark = pytest.mark.usefixtures("restore_logging")``."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def unix_listener(path: Path | str, backlog: int, timeout: float) -> socket.socket:
    """A listening Unix socket at ``path`` for a scripted daemon; accepts time out after
    ``timeout`` seconds."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(backlog)
    listener.settimeout(timeout)
    return listener
