"""Control ops are for admins (issue 15, docs/security.md "Local users", docs/protocol.md).

A real daemon on a real socket; the second uid is a forked child that drops to ``nobody``
(65534) and speaks to the socket with the same client code as ``pfcollector status``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import pytest
import trio

import pfclient
from pfcollector.access import Access, NotPermitted, scoped_status
from pfcollector.config import Config, ConfigError
from pfcollector.control import request
from pfcollector.daemon import Daemon
from pfcollector.server import ConnectionInfo
from pfcollector.statusview import format_status
from tests.conftest import start_daemon
from tests.wire import RawClient

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second uid")


def as_uid(uid: int, action: Callable[[], Any]) -> dict[str, Any]:
    """Run ``action`` in a forked child with ``uid``; its result or its error as a dict."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                out: dict[str, Any] = {"result": action()}
            except Exception as exc:
                out = {"error": str(exc), "type": type(exc).__name__}
            os.write(write_fd, json.dumps(out, default=str).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as f:
        raw = f.read()
    os.waitpid(pid, 0)
    return dict(json.loads(raw))


async def ask(uid: int, daemon: Daemon, op: str, args: dict[str, Any] | None = None) -> Any:
    path = daemon.config.socket_path
    return await trio.to_thread.run_sync(as_uid, uid, lambda: request(path, op, args))


async def open_daemon(
    make_config: Callable[..., Config], nursery: trio.Nursery, **kw: Any
) -> Daemon:
    config = make_config(socket_mode=0o666, coalesce=False, **kw)
    config.socket_path.parent.chmod(0o755)  # the second uid must reach the socket
    return await start_daemon(nursery, config)


async def test_a_fuzzer_uid_may_send_events_but_not_tune_or_flush(
    make_config: Callable[..., Config], nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pfcollector.access")
    daemon = await open_daemon(make_config, nursery)
    path = daemon.config.socket_path

    def crash() -> str:
        with pfclient.Client(path, job_id="fuzzer-job", fuzzer="afl", timeout=10) as client:
            return client.crash("SEGV", b"input")

    sent = await trio.to_thread.run_sync(as_uid, NOBODY, crash)
    assert "result" in sent, sent  # events stay open to every allowed uid
    stored = await trio.to_thread.run_sync(daemon.spool.read_after, 0, 10)
    assert [(s.event.id, s.event.peer_uid) for s in stored] == [(sent["result"], NOBODY)]

    interval = daemon.policy.flush_interval
    for op, args in [
        ("tune", {"flush_interval": 3600}),
        ("flush", {}),
        ("dead_letters", {}),
        ("dead_letters_retry", {}),
    ]:
        got = await ask(NOBODY, daemon, op, args)
        assert got["error"].startswith(f"not_permitted: {op} is for the daemon's uid"), got
        assert f"uid {NOBODY} is none of them" in got["error"]
    assert daemon.policy.flush_interval == interval  # nothing was held back
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 4
    assert all(f"uid {NOBODY}" in r.getMessage() and "pid " in r.getMessage() for r in refused)

    own = await ask(0, daemon, "tune", {"flush_interval": 2.0})  # the daemon's own uid (root)
    assert own["result"]["flush_interval"] == 2.0
    tuned = [r.getMessage() for r in caplog.records if "control op tune from" in r.getMessage()]
    assert tuned and "uid 0" in tuned[0]


async def test_a_fuzzer_uid_sees_only_its_own_connections(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    daemon = await open_daemon(make_config, nursery)
    other = await RawClient.connect(daemon.config.socket_path)  # root's job, live
    await other.hello(job_id="root-secret-job", fuzzer="root-fuzzer")
    with trio.fail_after(10):
        while not any(c.job_id for c in daemon.server.connections.values()):
            await trio.sleep(0.01)

    scoped = (await ask(NOBODY, daemon, "status"))["result"]
    assert scoped["scope"] == "peer"
    assert [c["uid"] for c in scoped["connections"]["live"]] == [NOBODY]  # its own request
    assert "root-secret-job" not in json.dumps(scoped)
    assert scoped["policies"] is None and "allow_uids" not in scoped["config"]
    assert "(control)" in format_status(scoped)  # pfcollector status shows it as usual

    full = (await ask(0, daemon, "status"))["result"]
    assert full["scope"] == "full"
    assert "root-secret-job" in json.dumps(full)
    await other.aclose()


async def test_admin_uids_gives_a_uid_the_control_ops(
    make_config: Callable[..., Config], nursery: trio.Nursery
) -> None:
    daemon = await open_daemon(make_config, nursery, admin_uids=f"1234, {NOBODY}")
    got = await ask(NOBODY, daemon, "tune", {"batch_size": 7})
    assert got["result"]["batch_size"] == 7
    assert (await ask(NOBODY, daemon, "status"))["result"]["scope"] == "full"


def test_the_access_rules() -> None:
    access = Access(frozenset({42}), daemon_uid=1000)
    assert access.is_admin(0) and access.is_admin(1000) and access.is_admin(42)
    assert not access.is_admin(43)
    peer = ConnectionInfo(1, pid=77, uid=43, gid=43, connected_at=0.0)
    assert access.check("status", peer) is False
    with pytest.raises(NotPermitted) as info:
        access.check("flush", peer)
    assert isinstance(info.value, LookupError)  # the server answers it, keeps the connection
    with pytest.raises(ConfigError, match="admin_uids"):
        Config(admin_uids="root")


def test_scoped_status_keeps_the_health_and_drops_the_rest() -> None:
    full = {
        "scope": "full",
        "connections": {"current": 2, "total": 2, "max": 8, "live": [{"uid": 1}, {"uid": 2}]},
        "config": {"batch_size": 1, "flush_interval": 1.0, "allow_uids": "1", "token": "***"},
        "policies": {"crash": {"top_repeats": ["sig"]}},
        "delivery": {"breaker": {}, "sender": {}, "pipeline": {"jobs": ["x"]}},
    }
    scoped = scoped_status(full, 2)
    assert scoped["connections"]["live"] == [{"uid": 2}]
    assert scoped["config"] == {"batch_size": 1, "flush_interval": 1.0}
    assert scoped["policies"] is None and "pipeline" not in scoped["delivery"]
