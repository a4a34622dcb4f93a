"""An id names one event. Rules: a resend (same id, kind, job, peer uid and content) is stored
once and acknowledged; anything else under an id the spool holds is refused with the non-fatal
``id_conflict`` naming the field ``id``, and the first event stays as it was. The two-uid test
runs a real client as another uid (tests run as root) against a real daemon and socket."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from pfcollector.config import Config
from pfcollector.events import Kind
from pfcollector.protocol import ErrorMsg
from pfcollector.spool import Spool

from .conftest import make_event, start_daemon
from .wire import RawClient, event, exchange

OTHER_UID = 65534  # nobody


def test_resend_is_stored_once_and_a_reuse_is_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    first = dataclasses.replace(make_event(Kind.CRASH, type="SEGV"), id="x", peer_uid=1000)
    assert spool.append([first]) == [None]
    assert spool.append([first]) == [None]  # a resend: acknowledged, stored once
    assert spool.total_count == 1
    others = [
        dataclasses.replace(first, kind=Kind.CORPUS, fields={"files": ["a"], "total_size": 1}),
        dataclasses.replace(first, job_id="job-2"),
        dataclasses.replace(first, peer_uid=1001),
        dataclasses.replace(first, fields={**first.fields, "type": "FAKE-NOT-A-BUG"}),
    ]
    assert spool.append(others) == ["id_conflict"] * 4
    (kept,) = spool.read_after(0, 10)
    assert kept.event.fields["type"] == "SEGV" and kept.event.peer_uid == 1000
    assert spool.total_count == 1
    spool.close()


def test_a_spool_from_before_digests_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "s.db"
    spool = Spool(path)
    ev = dataclasses.replace(make_event(Kind.CRASH), id="old")
    spool.append([ev])
    spool.close()
    db = sqlite3.connect(path)  # what an older daemon left: no digest column
    db.execute("ALTER TABLE events DROP COLUMN digest")
    db.commit()
    db.close()
    spool = Spool(path)
    assert spool.append([ev]) == [None]  # no digest kept: same kind, job, uid is a resend
    assert spool.append([dataclasses.replace(ev, job_id="other")]) == ["id_conflict"]
    assert spool.total_count == 1
    spool.close()


def test_a_resend_of_an_event_stored_in_the_producers_key_order_is_a_resend(
    tmp_path: Path,
) -> None:
    """Daemons before the typed fast path packed fields in the order the producer sent them;
    now they are in schema order. A resend across that upgrade is the same event."""
    spool = Spool(tmp_path / "s.db")
    ev = dataclasses.replace(make_event(Kind.CRASH, type="SEGV", signal=11), id="x")
    reordered = dataclasses.replace(ev, fields=dict(reversed(list(ev.fields.items()))))
    assert list(reordered.fields) != list(ev.fields)
    assert spool.append([reordered]) == [None]  # as the older daemon stored it
    assert spool.append([ev]) == [None]  # the resend, in schema order
    assert spool.total_count == 1
    changed = dataclasses.replace(ev, fields={**ev.fields, "signal": 6})
    assert spool.append([changed]) == ["id_conflict"]  # other content is still refused
    spool.close()


_CLIENT = r"""
import json, socket, struct, sys
import msgpack
from pfcollector.events import Kind
from pfcollector.protocol import EventMsg, Hello, encode, parse_server_message

import os
os.setgroups([])  # imports done as root (the interpreter lives under /root); then drop
os.setgid(int(sys.argv[4]))
os.setuid(int(sys.argv[4]))
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
buf = b""
def recv():
    global buf
    while True:
        if len(buf) >= 4:
            (n,) = struct.unpack(">I", buf[:4])
            if len(buf) >= 4 + n:
                msg, buf = msgpack.unpackb(buf[4:4 + n], raw=False), buf[4 + n:]
                return parse_server_message(msg)
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
sock.sendall(encode(Hello(1, "job-1", "afl", 1)))
recv()
fields = {"type": sys.argv[3], "signal": 11, "exit_code": 0, "output": "", "stack_trace": "",
          "input": b"fake"}
sock.sendall(encode(EventMsg(1, Kind.CRASH, fields, sys.argv[2], None, None)))
out = []
while True:
    msg = recv()
    out.append(type(msg).__name__ + ":" + getattr(msg, "code", ""))
    if type(msg).__name__ == "Ack":
        break
print(json.dumps({"uid": __import__("os").getuid(), "seen": out}))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
async def test_another_uid_cannot_take_an_id(
    make_config: Callable[..., Config], sock_dir: Path
) -> None:
    sock_dir.chmod(0o755)  # the other uid must reach the socket
    config = make_config(coalesce=False, socket_mode=0o666)
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, config)

        async def other(id_: str, crash_type: str) -> dict[str, object]:
            result = await trio.run_process(
                [
                    sys.executable,
                    "-c",
                    _CLIENT,
                    str(config.socket_path),
                    id_,
                    crash_type,
                    str(OTHER_UID),
                ],
                capture_stdout=True,
                capture_stderr=True,
            )
            return dict(json.loads(result.stdout))

        # The attacker goes first, under the id the victim's watcher will use.
        first = await other("victim-crash-1", "FAKE-NOT-A-BUG")
        assert first == {"uid": OTHER_UID, "seen": ["Ack:"]}
        # Its own resend is a resend.
        assert (await other("victim-crash-1", "FAKE-NOT-A-BUG"))["seen"] == ["Ack:"]
        # The victim (this process, root) sends its real crash under that id: refused, loudly.
        client = await RawClient.connect(config.socket_path)
        await client.hello()
        real = dataclasses.replace(event(1, Kind.CRASH, type="heap-overflow"), id="victim-crash-1")
        errors = await exchange(client, [real])
        await client.aclose()
        assert [(e.code, e.field, e.fatal, e.seq) for e in errors] == [
            ("id_conflict", "id", False, 1)
        ]
        assert isinstance(errors[0], ErrorMsg) and "id" in errors[0].message
        # And the other way round: a fresh id, the victim first, the attacker refused.
        client = await RawClient.connect(config.socket_path)
        await client.hello()
        real2 = dataclasses.replace(event(2, Kind.CRASH, type="heap-overflow"), id="victim-2")
        assert await exchange(client, [real2]) == []
        await client.aclose()
        assert (await other("victim-2", "heap-overflow"))["seen"] == [
            "ErrorMsg:id_conflict",
            "Ack:",
        ]
        status = await daemon.status()
        assert status["errors"]["id_conflict"] == 2
        stored = {r.event.id: r.event for r in daemon.spool.read_after(0, 10)}
        assert stored["victim-2"].fields["type"] == "heap-overflow"
        assert stored["victim-2"].peer_uid == os.getuid()
        daemon.stop()
