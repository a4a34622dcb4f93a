"""Tests for :mod:`pfclient`, the thin blocking client, against a fake daemon.

Rules for this module:

* The fake daemon is a thread serving a real Unix socket in ``tmp_path``; it frames and
  validates with ``pfcollector.protocol.ServerConnection`` and answers with
  ``pfcollector.protocol.encode``, so the client is checked against the real protocol code.
* The daemon's behaviour is set by plain attributes (``ack``, ``drop_after``, ...); every
  socket and thread it opens is closed and joined by the fixture.
* Timeouts are short (well under a second) and nothing sleeps longer than needed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pfclient
from pfclient import (
    Client,
    DaemonUnavailable,
    EventRejected,
    FlushTimeout,
    PfClientError,
    default_socket_path,
)
from pfcollector.protocol import (
    Ack,
    Control,
    EventMsg,
    Hello,
    MessageError,
    ProtocolError,
    Reply,
    ServerConnection,
    SessionError,
    Welcome,
    encode,
)

from .conftest import unix_listener


class FakeDaemon:
    """A threaded daemon good enough to exercise the client."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.ack = True  # send an ack after every event
        # close the first connection, which then acks nothing, after this many events
        self.drop_after: int | None = None
        self.refuse_hello = False
        self.events: list[tuple[int, EventMsg]] = []  # (connection number, event)
        self.hellos: list[Hello] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._connections = 0
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(16)
        self._listener.settimeout(0.02)
        self._spawn(self._accept_loop)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._connections += 1
                number = self._connections
                self._socks.append(sock)
            self._spawn(self._serve, sock, number)

    def _serve(self, sock: socket.socket, number: int) -> None:
        try:
            self._serve_one(sock, number)
        except OSError:
            return  # the test closed the fake daemon while it was answering

    def _serve_one(self, sock: socket.socket, number: int) -> None:
        conn = ServerConnection()
        seen = 0
        sock.settimeout(0.02)
        while not self._stop.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            conn.receive_data(data)
            while True:
                try:
                    msg = conn.next_message()
                except MessageError as exc:
                    sock.sendall(encode(exc.to_message()))
                    if exc.seq is not None and self.ack:
                        sock.sendall(encode(Ack(exc.seq)))
                    continue
                except ProtocolError as exc:
                    sock.sendall(encode(exc.to_message()))
                    sock.shutdown(socket.SHUT_RDWR)
                    return
                if msg is None:
                    break
                if isinstance(msg, Hello):
                    if self.refuse_hello:
                        err = SessionError("unsupported_version", "this daemon speaks 99")
                        sock.sendall(encode(err.to_message()))
                        sock.shutdown(socket.SHUT_RDWR)
                        return
                    self.hellos.append(msg)
                    sock.sendall(encode(Welcome(1, "pfcollector test", conn.max_frame)))
                elif isinstance(msg, EventMsg):
                    seen += 1
                    with self._lock:
                        self.events.append((number, msg))
                    if number == 1 and seen == self.drop_after:
                        sock.shutdown(socket.SHUT_RDWR)
                        return
                    if self.ack and not (number == 1 and self.drop_after is not None):
                        sock.sendall(encode(Ack(msg.seq)))
                elif isinstance(msg, Control):
                    result = {"events": len(self.events), "op": msg.op, "args": msg.args}
                    ok = msg.op != "fail"
                    sock.sendall(encode(Reply(msg.req, ok, result if ok else None,
                                              None if ok else "no such op")))  # fmt: skip
            if not data:
                return

    def ids(self, number: int | None = None) -> list[str | None]:
        return [m.id for n, m in self.events if number is None or n == number]

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=2)
        for sock in self._socks:
            sock.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    fake = FakeDaemon(tmp_path / "pfc.sock")
    yield fake
    fake.close()


@pytest.fixture
def client(daemon: FakeDaemon) -> Iterator[Client]:
    with Client(daemon.path, job_id="job-1", fuzzer="afl++", fail_open=False, timeout=2.0) as pf:
        yield pf


def test_exported_names() -> None:
    for name in pfclient.__all__:
        assert hasattr(pfclient, name), name


def test_client_does_not_import_the_daemon() -> None:
    code = "import sys, pfclient; assert not {'trio', 'pfcollector'} & set(sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(pfclient.__file__).parent.parent)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=30)


def test_hello_sent(daemon: FakeDaemon, client: Client) -> None:
    assert daemon.hellos == [Hello(1, "job-1", "afl++", os.getpid())]


def test_crash_waits_for_ack_and_returns_id(daemon: FakeDaemon, client: Client) -> None:
    event_id = client.crash("SIGSEGV", b"\x00\xffdata", signal=11, output="boom", ts=1.5)
    assert uuid.UUID(event_id).version == 4
    # crash() returned, so the daemon has it (it acks only after recording)
    [(_, msg)] = daemon.events
    assert msg.id == event_id
    assert msg.fields["input"] == b"\x00\xffdata"
    assert msg.fields["signal"] == 11
    assert msg.ts_ns == 1_500_000_000


def test_non_waiting_kinds_and_flush(daemon: FakeDaemon, client: Client) -> None:
    ids = [
        client.coverage(100, new_edges=3, job_id="job-2"),
        client.corpus(["id:000001", "id:000002"], total_size=20),
        client.stats(executions=10, exec_per_second=2.5),
        client.lifecycle("started", "hello"),
    ]
    client.flush(timeout=1.0)
    assert daemon.ids() == ids
    kinds = [m.kind.value for _, m in daemon.events]
    assert kinds == ["coverage", "corpus", "stats", "started"]
    assert daemon.events[0][1].job_id == "job-2"
    with pytest.raises(ValueError, match="lifecycle kind"):
        client.lifecycle("paused")


def test_crash_rejection_raises_event_rejected(daemon: FakeDaemon, client: Client) -> None:
    with pytest.raises(EventRejected) as info:
        client.crash("x" * 300, b"in")
    err = info.value
    assert (err.code, err.field, err.seq) == ("too_long", "type", 1)
    assert "crash event seq 1" in err.message
    assert err.event_id is not None
    client.flush(timeout=1.0)  # already reported by crash(): flush does not raise it again
    assert client.rejected == [err]


def test_flush_raises_first_rejection_and_keeps_all(client: Client) -> None:
    client.coverage(2**64 - 1)
    client.coverage(1)
    client.stats(cpu_usage=float("nan"))
    with pytest.raises(EventRejected) as info:
        client.flush(timeout=1.0)
    assert (info.value.code, info.value.field, info.value.seq) == ("out_of_range", "edges", 1)
    assert [r.field for r in client.rejected] == ["edges", "cpu_usage"]
    client.flush(timeout=1.0)  # reported once


def test_flush_timeout(daemon: FakeDaemon) -> None:
    daemon.ack = False
    with Client(daemon.path, job_id="j", fuzzer="f", fail_open=False, timeout=0.1) as pf:
        pf.coverage(1)
        with pytest.raises(FlushTimeout, match="1 events not acknowledged"):
            pf.flush(timeout=0.05)


def test_max_unacked_blocks_then_times_out(daemon: FakeDaemon) -> None:
    daemon.ack = False
    with Client(
        daemon.path, job_id="j", fuzzer="f", fail_open=False, timeout=0.1, max_unacked=2
    ) as pf:
        pf.coverage(1)
        pf.coverage(2)
        with pytest.raises(FlushTimeout, match="not keeping up"):
            pf.coverage(3)


def test_daemon_unavailable_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nobody-home.sock"
    with pytest.raises(DaemonUnavailable, match=r"nobody-home\.sock") as info:
        Client(path, job_id="j", fuzzer="f", fail_open=False, timeout=0.2)
    assert "No such file" in str(info.value)


def test_unsupported_version_raises_event_rejected(daemon: FakeDaemon) -> None:
    daemon.refuse_hello = True
    with pytest.raises(EventRejected) as info:
        Client(daemon.path, job_id="j", fuzzer="f", fail_open=False, timeout=1.0)
    assert info.value.code == "unsupported_version"
    assert info.value.fatal


def test_bad_hello_raises_event_rejected(daemon: FakeDaemon) -> None:
    with pytest.raises(EventRejected) as info:
        Client(daemon.path, job_id="", fuzzer="f", fail_open=False, timeout=1.0)
    assert (info.value.code, info.value.field) == ("out_of_range", "job_id")


def test_threads_share_one_client(daemon: FakeDaemon, client: Client) -> None:
    returned: list[str] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        ids = [client.stats(executions=i) for i in range(100)]
        ids.append(client.crash("T", bytes([n])))
        ids.append(client.coverage(n))
        with lock:
            returned.extend(ids)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.flush(timeout=2.0)
    assert sorted(returned) == sorted(i for i in daemon.ids() if i is not None)
    assert len(set(returned)) == 8 * 102
    seqs = [m.seq for _, m in daemon.events]
    assert seqs == list(range(1, len(seqs) + 1))


def test_reconnect_resends_unacked_with_same_ids(daemon: FakeDaemon, client: Client) -> None:
    daemon.drop_after = 3
    ids = [client.coverage(i) for i in range(3)]
    ids += [client.coverage(i) for i in range(3, 5)]  # the broken connection is noticed here
    client.flush(timeout=2.0)
    assert daemon.ids(1) == ids[:3]
    second = [m for n, m in daemon.events if n == 2]
    assert [m.id for m in second] == ids  # the unacked three first, same ids
    assert [m.seq for m in second] == [1, 2, 3, 4, 5]  # fresh seqs
    assert len(daemon.hellos) == 2


def test_waiting_call_reconnects(daemon: FakeDaemon, client: Client) -> None:
    daemon.drop_after = 1
    event_id = client.crash("SEGV", b"x")  # dropped unacked, resent on a new connection
    assert daemon.ids(2) == [event_id]


def test_reconnect_failure_is_daemon_unavailable(daemon: FakeDaemon, client: Client) -> None:
    daemon.ack = False
    daemon.drop_after = 1
    daemon.close()
    os.unlink(daemon.path)
    with pytest.raises(DaemonUnavailable, match=r"pfc\.sock"):
        client.crash("SEGV", b"x")
    with pytest.raises(DaemonUnavailable):
        client.flush(timeout=0.2)  # still queued, still nobody to take it


def test_status(daemon: FakeDaemon, client: Client) -> None:
    client.coverage(1)
    client.flush(timeout=1.0)
    assert client.status(timeout=1.0)["events"] == 1
    assert client.control("tune", {"batch": 5}, timeout=1.0)["args"] == {"batch": 5}
    with pytest.raises(PfClientError, match="no such op"):
        client.control("fail", timeout=1.0)
    assert pfclient.status(daemon.path, timeout=1.0) == {"events": 1, "op": "status", "args": {}}


def test_module_status_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnavailable, match=r"none\.sock"):
        pfclient.status(tmp_path / "none.sock", timeout=0.2)


def test_close_is_idempotent_and_final(daemon: FakeDaemon) -> None:
    pf = Client(daemon.path, job_id="j", fuzzer="f", fail_open=False, timeout=1.0)
    pf.coverage(1)
    pf.close()
    pf.close()
    assert len(daemon.events) == 1  # close() flushed
    with pytest.raises(PfClientError, match="closed"):
        pf.coverage(2)


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PFCOLLECTOR_SOCKET", "/x/y.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/7")
    assert default_socket_path() == "/x/y.sock"
    monkeypatch.delenv("PFCOLLECTOR_SOCKET")
    assert default_socket_path() == "/run/user/7/pfcollector.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_path() == f"/tmp/pfcollector-{os.getuid()}/pfcollector.sock"


# -- fail-open (the default) ------------------------------------------------------------------


def test_fail_open_queue_is_bounded_in_bytes_and_drops_oldest_stats(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    pf = Client(tmp_path / "none.sock", job_id="j", fuzzer="f", queue_bytes=4000, outbox=outbox)
    assert not pf.connected
    ids = [pf.stats(executions=n) for n in range(200)]
    pf.lifecycle("started", "campaign")
    assert pf.dropped["stats"] > 0 and pf.queued_bytes <= 4000
    kept = list(pf._session.unacked)
    assert kept[:-1] == ids[len(ids) - len(kept) + 1 :]  # the newest stats stayed
    pf.close()  # the lifecycle event is kept in the outbox, the stats are dropped
    assert len(list(outbox.glob("*.pfev"))) == 1


def test_fail_open_corpus_with_contents_goes_to_the_outbox(tmp_path: Path) -> None:
    with Client(tmp_path / "none.sock", job_id="j", fuzzer="f", outbox=tmp_path / "ob") as pf:
        event_id = pf.corpus(["q/1"], contents=[b"bytes only we hold"])
        assert pf.outboxed == 1
    assert (tmp_path / "ob" / f"{event_id}.pfev").exists()


def test_fail_open_resends_same_ids_when_the_daemon_appears(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    with Client(path, job_id="j", fuzzer="f", timeout=2.0) as pf:
        early = [pf.coverage(n) for n in range(5)]
        daemon = FakeDaemon(path)
        try:
            deadline = time.monotonic() + 10
            while not pf.connected and time.monotonic() < deadline:
                time.sleep(0.05)
                pf.stats(executions=1)  # later calls reconnect in their background
            pf.flush()
            assert daemon.ids()[:5] == early
        finally:
            daemon.close()


def test_fail_open_crash_waits_for_the_ack_when_the_daemon_is_up(daemon: FakeDaemon) -> None:
    with Client(daemon.path, job_id="j", fuzzer="f", timeout=2.0) as pf:
        event_id = pf.crash("SEGV", b"x", signal=11)
        assert pf.outboxed == 0
    assert daemon.ids() == [event_id]


def test_fail_open_bookkeeping_stays_bounded(daemon: FakeDaemon, tmp_path: Path) -> None:
    with Client(tmp_path / "none.sock", job_id="j", fuzzer="f", max_unacked=100) as away:
        for n in range(20_000):
            away.stats(executions=n)
        assert len(away._session.unacked) <= 100 and away.dropped["stats"] >= 19_900
        assert len(away._unsent) <= 2 * 100 + 65
        assert len(away._fallback._droppable) <= 2 * 100 + 65
    with Client(daemon.path, job_id="j", fuzzer="f", timeout=5.0, max_unacked=1000) as up:
        for n in range(5_000):
            up.stats(executions=n)
        up.flush()
        assert len(up._fallback._droppable) <= 2 * 1000 + 65  # acked ones are pruned


def test_fail_open_does_not_spin_on_a_daemon_that_drops_it(tmp_path: Path) -> None:
    """A daemon that welcomes and at once closes (draining, a fatal error) is retried after a
    growing backoff: a busy harness makes a handful of connections, not one per call."""
    path = str(tmp_path / "rude.sock")
    listener = unix_listener(path, 64, 0.05)
    accepted = 0
    stop = threading.Event()

    def rude() -> None:
        nonlocal accepted
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted += 1
            conn.sendall(encode(Welcome(1, "rude", 1 << 20)))
            conn.close()

    thread = threading.Thread(target=rude, daemon=True)
    thread.start()
    try:
        with Client(path, job_id="j", fuzzer="f", timeout=0.5) as pf:
            end = time.monotonic() + 1.0
            calls = 0
            while time.monotonic() < end:
                pf.stats(executions=calls)
                calls += 1
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert calls > 1000
    assert accepted < 20, f"{accepted} connections for {calls} calls"
