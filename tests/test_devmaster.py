"""Tests of the reference master (:mod:`pfcollector.devmaster`) over real TCP on 127.0.0.1.

Rules of this module:

* Every test talks to a real :class:`DevMaster` through a real socket, with a sync
  ``httpx.Client`` (these tests are synchronous; the server runs in background threads).
* Every client, socket and subprocess is closed or waited for (``filterwarnings = error`` turns a
  leaked one into a failure).
* Waits are bounded and short: the whole module runs in a few seconds. Fault timings use
  tenths of a second, never more than one second.
* Expected answers come from ``shared/pandafuzz-master-api.md`` and the master's Go handlers;
  a test that changes an expected status or message must say why.
"""

from __future__ import annotations

import gzip
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import pfcollector.devmaster as devmaster
from pfcollector.devmaster import DevMaster

TS = "2024-05-01T12:00:00.123456789Z"
CRASH = "/api/v1/results/crash"
COVERAGE = "/api/v1/results/coverage"
CORPUS = "/api/v1/results/corpus"
STATUS = "/api/v1/results/status"
BATCH = "/api/v1/results/batch"
REGISTER = "/api/v1/bots/register"


def crash(item_id: str = "c1", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": item_id, "job_id": "job", "bot_id": "bot", "hash": "ab" * 32,
        "file_path": "/tmp/crash-1", "type": "SIGSEGV", "signal": 11, "exit_code": -11,
        "timestamp": TS, "size": 12, "is_unique": False, "output": "out", "stack_trace": "st",
    }  # fmt: skip
    body.update(over)
    return body


def coverage(item_id: str = "v1", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": item_id, "job_id": "job", "bot_id": "bot", "edges": 100, "new_edges": 3,
        "timestamp": TS, "exec_count": 5000,
    }  # fmt: skip
    body.update(over)
    return body


def corpus(item_id: str = "k1", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": item_id, "job_id": "job", "bot_id": "bot", "files": ["a", "b"],
        "timestamp": TS, "total_size": 64,
    }  # fmt: skip
    body.update(over)
    return body


def batch(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"bot_id": "bot", "job_id": "job", "crashes": [], "coverage": [],
                            "corpus": []}  # fmt: skip
    body.update(over)
    return body


def raw(client: httpx.Client, path: str, content: bytes, **headers: str) -> httpx.Response:
    return client.post(path, content=content, headers=headers)


@pytest.fixture
def master() -> Iterator[DevMaster]:
    with DevMaster() as m:
        yield m


@pytest.fixture
def client(master: DevMaster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=master.url, timeout=5.0) as c:
        yield c


def assert_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert body["status"] == status
    assert isinstance(body["error"], str)
    assert body["error"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", body["timestamp"])
    assert set(body) <= {"error", "details", "status", "timestamp"}
    return body


# -- exported API -------------------------------------------------------------------------


def test_exported_members() -> None:
    assert set(devmaster.__all__) == {"DevMaster", "Faults", "main", "serve"}
    for name in devmaster.__all__:
        assert getattr(devmaster, name).__module__.startswith("pfcollector.devmaster")


# -- per-item endpoints -------------------------------------------------------------------


def test_per_item_endpoints_store_and_answer(master: DevMaster, client: httpx.Client) -> None:
    r = client.post(CRASH, json=crash())
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["status"] == "processed"
    assert body["crash_id"] == "c1"
    assert body["is_unique"] is True  # the master's dedup is a stub
    assert client.post(COVERAGE, json=coverage()).json()["coverage_id"] == "v1"
    assert client.post(CORPUS, json=corpus()).json()["corpus_id"] == "k1"
    (row,) = master.rows("crash")
    assert row["signal"] == 11
    assert row["exit_code"] == -11
    assert row["timestamp"] == TS
    assert master.rows("corpus")[0]["files"] == ["a", "b"]
    assert master.ids("coverage") == {"v1"}
    assert master.count("crash") == master.count("coverage") == master.count("corpus") == 1


def test_status_is_received_and_kept(master: DevMaster, client: httpx.Client) -> None:
    stats = {"type": "fuzzer_stats", "executions": 10, "exec_per_second": 1.5, "extra": [1]}
    r = client.post(STATUS, json=stats)
    assert r.status_code == 200
    assert r.json()["status"] == "received"
    assert master.count("status") == 1
    assert master.rows("status")[0]["body"] == stats
    assert_error(client.post(STATUS, json=[1, 2]), 400)


def test_per_item_is_lenient(master: DevMaster, client: httpx.Client) -> None:
    body = json.dumps(crash(unknown_field={"x": 1}, input="AAAA")).encode()
    r = raw(client, CRASH, body, **{"Content-Type": "text/plain"})
    assert r.status_code == 200, r.text
    # Go matches keys case-insensitively and leaves absent fields at zero; no timestamp is now.
    r = client.post(COVERAGE, json={"ID": "v9", "Job_Id": "job", "bot_id": "bot"})
    assert r.status_code == 200, r.text
    assert master.rows("coverage")[0]["edges"] == 0
    assert master.rows("coverage")[0]["timestamp"].endswith("Z")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CRASH, crash(job_id="")),
        (CRASH, {k: v for k, v in crash().items() if k != "bot_id"}),
        (CRASH, crash(signal=11.0)),
        (CRASH, crash(signal=True)),
        (CRASH, crash(signal="11")),
        (CRASH, crash(size=2**63)),
        (CRASH, crash(is_unique=1)),
        (CRASH, crash(hash=123)),
        (COVERAGE, coverage(edges=1e3)),
        (CORPUS, corpus(total_size=1.5)),
        (CORPUS, corpus(files=["a", 1])),
        (COVERAGE, coverage(timestamp="2024-05-01 12:00:00Z")),
        (COVERAGE, coverage(timestamp="2024-13-01T12:00:00Z")),
        (COVERAGE, coverage(timestamp="2024-02-30T12:00:00Z")),
        (COVERAGE, coverage(timestamp="2024-05-01T12:00:60Z")),
        (COVERAGE, coverage(timestamp="2024-05-01t12:00:00z")),
        (COVERAGE, coverage(timestamp="")),
        (COVERAGE, coverage(timestamp=1714564800)),
        (COVERAGE, [coverage()]),
    ],
)
def test_per_item_400(client: httpx.Client, master: DevMaster, path: str, body: Any) -> None:
    assert_error(client.post(path, json=body), 400)
    assert master.count("crash") + master.count("coverage") + master.count("corpus") == 0


@pytest.mark.parametrize("content", [b"", b"{", b"not json", b'{"signal": NaN}'])
def test_per_item_400_on_bad_json(client: httpx.Client, content: bytes) -> None:
    assert_error(raw(client, CRASH, content), 400)


@pytest.mark.parametrize(
    "ts", [TS, "2024-05-01T12:00:00Z", "2024-05-01T14:00:00.5+02:00", "2024-02-29T00:00:00-23:59"]
)
def test_rfc3339_accepted(client: httpx.Client, ts: str) -> None:
    assert client.post(COVERAGE, json=coverage(timestamp=ts)).status_code == 200


def test_gzip_body_is_400(client: httpx.Client, master: DevMaster) -> None:
    content = gzip.compress(json.dumps(crash()).encode())
    assert_error(raw(client, CRASH, content, **{"Content-Encoding": "gzip"}), 400)
    assert master.count("crash") == 0


@pytest.mark.parametrize("files", ["null", "missing"])
def test_corpus_without_files_is_500(client: httpx.Client, master: DevMaster, files: str) -> None:
    body = corpus(files=None)
    if files == "missing":
        del body["files"]
    err = assert_error(client.post(CORPUS, json=body), 500)
    assert err["details"] == "NOT NULL constraint failed: corpus_updates.files"
    assert master.count("corpus") == 0
    assert client.post(CORPUS, json=corpus(files=[])).status_code == 200


def test_body_limits_413(client: httpx.Client, master: DevMaster) -> None:
    big = crash(output="x" * (10 * 1024 * 1024))
    assert_error(client.post(CRASH, json=big), 413)
    assert_error(client.post(COVERAGE, json=coverage(pad="x" * (1024 * 1024))), 413)
    assert_error(client.post(STATUS, json={"pad": "x" * (1024 * 1024)}), 413)
    # Under the corpus limit (100 MiB), 2 MiB is fine; the connection is still usable after.
    assert client.post(CORPUS, json=corpus(files=["f" * 1000] * 2000)).status_code == 200
    assert client.post(CRASH, json=crash(output="x" * (2 * 1024 * 1024))).status_code == 200
    assert master.count("crash") == 1


def test_insert_or_replace_by_id(client: httpx.Client, master: DevMaster) -> None:
    assert client.post(COVERAGE, json=coverage("same", edges=1)).status_code == 200
    assert client.post(COVERAGE, json=coverage("same", edges=2)).status_code == 200
    assert master.count("coverage") == 1
    assert master.rows("coverage")[0]["edges"] == 2  # last write wins
    assert master.submissions() == {"same": 2}


def test_empty_id_gets_a_uuid_each_time(client: httpx.Client, master: DevMaster) -> None:
    first = client.post(CRASH, json=crash("")).json()["crash_id"]
    second = client.post(CRASH, json=crash("")).json()["crash_id"]
    assert first != second
    assert len(first) == 36
    assert master.ids("crash") == {first, second}


# -- batch --------------------------------------------------------------------------------


def test_batch_happy_path(client: httpx.Client, master: DevMaster) -> None:
    body = batch(
        bot_id="bot-top", job_id="job-top",
        crashes=[crash("c1", bot_id="other"), crash("c2")],
        coverage=[coverage("v1")], corpus=[corpus("k1")],
    )  # fmt: skip
    r = client.post(BATCH, json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] == "processed"
    assert answer["processed"] == {"crashes": 2, "coverage": 1, "corpus": 1}
    assert "errors" not in answer
    assert "partial_success" not in answer
    assert {row["bot_id"] for row in master.rows("crash")} == {"bot-top"}  # top level wins
    assert {row["job_id"] for row in master.rows("corpus")} == {"job-top"}
    assert client.post(BATCH, json={"bot_id": "b", "job_id": "j"}).status_code == 200
    assert client.post(BATCH, json=batch(crashes=None)).status_code == 200


def test_batch_partial_success_like_the_master(client: httpx.Client, master: DevMaster) -> None:
    body = batch(coverage=[coverage("v1")], corpus=[corpus("k1", files=None)])
    r = client.post(BATCH, json=body)
    assert r.status_code == 200
    answer = r.json()
    assert answer["errors"] == ["corpus 0: NOT NULL constraint failed: corpus_updates.files"]
    assert answer["partial_success"] is True
    assert answer["processed"] == {"corpus": 0, "coverage": 1, "crashes": 0}
    assert master.ids("coverage") == {"v1"}
    assert master.count("corpus") == 0


@pytest.mark.parametrize(
    "body",
    [
        batch(stats={"executions": 1}),
        batch(crashes=[crash(extra=1)]),
        batch(coverage=[coverage(edges=1.0)]),
        batch(crashes=[crash("ok"), crash("bad", signal=11.5)]),
        batch(corpus=[corpus(timestamp="yesterday")]),
        batch(crashes={"id": "c"}),
        batch(bot_id=""),
        {k: v for k, v in batch().items() if k != "job_id"},
    ],
)
def test_batch_400_fails_whole_batch(client: httpx.Client, master: DevMaster, body: Any) -> None:
    body["coverage"] = [*(body.get("coverage") or []), coverage("innocent")]
    assert_error(client.post(BATCH, json=body), 400)
    assert master.count("crash") + master.count("coverage") + master.count("corpus") == 0


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "text/plain", "application/JSON", None]
)
def test_batch_415(client: httpx.Client, master: DevMaster, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = client.post(BATCH, content=json.dumps(batch(crashes=[crash()])).encode(), headers=headers)
    assert_error(r, 415)
    assert master.count("crash") == 0


def test_batch_limit_and_gzip(client: httpx.Client) -> None:
    huge = batch(crashes=[crash(f"c{i}", output="x" * 10_000) for i in range(110)])
    assert_error(client.post(BATCH, json=huge), 413)
    content = gzip.compress(json.dumps(batch()).encode())
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    assert_error(client.post(BATCH, content=content, headers=headers), 400)


# -- bots ---------------------------------------------------------------------------------


def registration(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"hostname": "host1", "name": "bot one",
                            "capabilities": ["afl", "libfuzzer"],
                            "api_endpoint": "http://10.0.0.1:9000"}  # fmt: skip
    body.update(over)
    return body


def test_register_and_heartbeat(client: httpx.Client, master: DevMaster) -> None:
    r = client.post(REGISTER, json=registration())
    assert r.status_code == 201
    assert r.headers["content-type"].startswith("text/plain")  # as the master, wrongly
    answer = json.loads(r.text)
    assert answer["status"] == "registered"
    assert answer["bot_id"]
    beat = {"status": "busy", "current_job": "job", "last_activity": TS}
    r = client.post(f"/api/v1/bots/{answer['bot_id']}/heartbeat", json=beat)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert master.bots()[0]["status"] == "busy"
    assert_error(client.post("/api/v1/bots/nobody/heartbeat", json=beat), 404)
    bad = dict(beat, status="sleeping")
    assert_error(client.post(f"/api/v1/bots/{answer['bot_id']}/heartbeat", json=bad), 400)


@pytest.mark.parametrize(
    "body",
    [
        registration(capabilities=["afl++"]),
        registration(capabilities=[]),
        registration(capabilities=[f"c{i}" for i in range(11)]),
        registration(api_endpoint="ftp://x"),
        registration(hostname=""),
        registration(extra=True),
    ],
)
def test_register_400(client: httpx.Client, body: dict[str, Any]) -> None:
    assert_error(client.post(REGISTER, json=body), 400)


def test_register_415(client: httpx.Client) -> None:
    content = json.dumps(registration()).encode()
    assert_error(raw(client, REGISTER, content, **{"Content-Type": "text/plain"}), 415)


# -- faults -------------------------------------------------------------------------------


def test_fail_next_with_retry_after(client: httpx.Client, master: DevMaster) -> None:
    master.faults.fail_next(2, status=503, retry_after=2)
    for _ in range(2):
        r = client.post(CRASH, json=crash())
        assert_error(r, 503)
        assert r.headers["retry-after"] == "2"
    assert client.post(CRASH, json=crash()).status_code == 200
    assert master.requests_seen() == 3
    assert master.submissions() == {"c1": 1}
    master.faults.fail_next(1, status=429, retry_after=0.25)
    r = client.post(BATCH, json=batch())
    assert r.status_code == 429
    assert r.headers["retry-after"] == "0.25"
    master.faults.fail_next(1, status=500)
    assert "retry-after" not in client.post(STATUS, json={}).headers


def test_down_for_refuses_then_returns_on_same_port(
    client: httpx.Client, master: DevMaster
) -> None:
    port = master.port
    assert client.post(CRASH, json=crash("before")).status_code == 200  # pooled connection
    master.faults.down_for(0.3)
    with pytest.raises(httpx.ConnectError):
        client.post(CRASH, json=crash("during"))
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
    deadline = time.monotonic() + 2.0
    while True:
        try:
            r = client.post(CRASH, json=crash("after"))
            break
        except httpx.ConnectError:
            assert time.monotonic() < deadline, "never came back"
            time.sleep(0.02)
    assert r.status_code == 200
    assert master.port == port
    assert master.ids("crash") == {"before", "after"}


def test_down_and_up(client: httpx.Client, master: DevMaster) -> None:
    master.faults.down()
    with pytest.raises(httpx.ConnectError):
        client.get("/health")
    master.faults.up()
    assert client.get("/health").status_code == 200


def test_reset_next_gives_a_connection_error(client: httpx.Client, master: DevMaster) -> None:
    master.faults.reset_next(1)
    with pytest.raises(httpx.TransportError):
        client.post(BATCH, json=batch(crashes=[crash(f"c{i}") for i in range(50)]))
    assert master.count("crash") == 0
    assert client.post(CRASH, json=crash()).status_code == 200


def test_reject_ids(client: httpx.Client, master: DevMaster) -> None:
    master.faults.reject_ids(["poison"])
    assert_error(client.post(CRASH, json=crash("poison")), 400)
    body = batch(crashes=[crash("fine"), crash("poison")], coverage=[coverage()])
    assert_error(client.post(BATCH, json=body), 400)
    assert master.count("crash") == master.count("coverage") == 0
    master.faults.reject_ids(["gone"], status=409)
    assert_error(client.post(CORPUS, json=corpus("gone")), 409)
    assert client.post(CRASH, json=crash("fine")).status_code == 200


def test_partial_fail_ids(client: httpx.Client, master: DevMaster) -> None:
    master.faults.partial_fail_ids(["c2", "k1"])
    body = batch(crashes=[crash("c1"), crash("c2")], corpus=[corpus("k1")])
    answer = client.post(BATCH, json=body).json()
    assert answer["partial_success"] is True
    assert answer["processed"] == {"crashes": 1, "coverage": 0, "corpus": 0}
    assert answer["errors"] == [
        "crash 1: injected storage failure for id c2",
        "corpus 0: injected storage failure for id k1",
    ]
    assert_error(client.post(CRASH, json=crash("c2")), 500)
    assert master.ids("crash") == {"c1"}


def test_slow(client: httpx.Client, master: DevMaster) -> None:
    master.faults.slow(0.2, n=1)
    t0 = time.monotonic()
    assert client.post(CRASH, json=crash()).status_code == 200
    assert time.monotonic() - t0 >= 0.2
    t0 = time.monotonic()
    assert client.post(CRASH, json=crash()).status_code == 200
    assert time.monotonic() - t0 < 0.2
    master.faults.slow(0.15)
    master.faults.fail_next(1)
    t0 = time.monotonic()
    assert client.post(CRASH, json=crash()).status_code == 503  # slow applies to faults too
    assert time.monotonic() - t0 >= 0.15
    master.faults.clear()
    t0 = time.monotonic()
    assert client.post(CRASH, json=crash()).status_code == 200
    assert time.monotonic() - t0 < 0.15


def test_admin_endpoints(client: httpx.Client, master: DevMaster) -> None:
    assert client.post("/_dev/fail_next", json={"n": 1, "status": 502}).status_code == 200
    assert client.post(CRASH, json=crash()).status_code == 502
    assert client.post("/_dev/reject_ids", json={"ids": ["x"]}).status_code == 200
    assert client.post(CRASH, json=crash("x")).status_code == 400
    assert client.post("/_dev/clear").status_code == 200
    assert client.post(CRASH, json=crash("x")).status_code == 200
    stats = client.get("/_dev/stats").json()
    assert stats["counts"]["crash"] == 1
    assert stats["submissions"] == {"x": 1}
    assert stats["requests_seen"] == master.requests_seen() == 3
    assert client.get("/_dev/rows", params={"kind": "crash"}).json()["rows"][0]["id"] == "x"
    assert_error(client.post("/_dev/fail_next", json={"status": 503}), 400)
    assert_error(client.post("/_dev/fail_next", json={"n": 1, "status": 200}), 400)
    assert_error(client.post("/_dev/nonsense", json={}), 404)
    assert client.post("/_dev/down_for", json={"seconds": 0.2}).status_code == 200
    with pytest.raises(httpx.ConnectError):
        client.get("/health")


def test_unknown_routes(client: httpx.Client) -> None:
    assert_error(client.post("/api/v1/results/stats", json={}), 404)
    assert_error(client.get(CRASH), 405)
    assert_error(client.post("/nope", json={}), 404)


# -- server behaviour ---------------------------------------------------------------------


def test_keep_alive_and_concurrency(master: DevMaster) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with httpx.Client(base_url=master.url) as c:
                for i in range(25):
                    r = c.post(CRASH, json=crash(f"w{n}-{i}"))
                    assert r.status_code == 200
                    assert r.http_version == "HTTP/1.1"
                    assert "close" not in r.headers.get("connection", "")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert master.count("crash") == 200


def test_file_database_survives_restart(tmp_path: Path) -> None:
    db = tmp_path / "master.db"
    with DevMaster(db_path=db) as m, httpx.Client(base_url=m.url) as c:
        assert c.post(CRASH, json=crash("kept")).status_code == 200
    with DevMaster(db_path=db) as m:
        assert m.ids("crash") == {"kept"}
        assert m.submissions() == {"kept": 1}


def test_inspection_refuses_unknown_kind(master: DevMaster) -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        master.count("crashes")


@pytest.mark.slow
def test_module_entry_point_subprocess(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pfcollector.devmaster", "--port", "0", "--db",
         str(tmp_path / "m.db")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, line
        url = match.group(0)
        with httpx.Client(base_url=url) as c:
            assert c.post(CRASH, json=crash()).status_code == 200
            assert c.post("/_dev/down_for", json={"seconds": 0.3}).status_code == 200
            with pytest.raises(httpx.ConnectError):
                c.get("/health")
            time.sleep(0.5)
            assert c.get("/_dev/stats").json()["counts"]["crash"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_main_reports_a_busy_port(capsys: pytest.CaptureFixture[str]) -> None:
    with DevMaster() as m:
        assert devmaster.main(["--port", str(m.port)]) == 1
    assert "cannot listen" in capsys.readouterr().err


# -- cost setting and body sizes (for benchmarks) -----------------------------------------


def test_cost_per_item_is_spent_per_stored_item(monkeypatch: pytest.MonkeyPatch) -> None:
    from pfcollector.devmaster import _store

    slept: list[float] = []
    monkeypatch.setattr(_store.time, "sleep", slept.append)
    with DevMaster(cost_per_item=0.00023) as m, httpx.Client(base_url=m.url) as c:
        body = batch(crashes=[crash(f"c{i}") for i in range(100)], coverage=[coverage()])
        assert c.post(BATCH, json=body).status_code == 200
        assert c.post(CRASH, json=crash("one")).status_code == 200
        assert c.post(STATUS, json={"type": "fuzzer_stats"}).status_code == 200
        assert m.count("crash") == 101
    # one sleep per non-empty store, as long as its items cost; stats posts cost nothing
    assert slept == pytest.approx([100 * 0.00023, 0.00023, 0.00023])


def test_cost_per_item_is_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from pfcollector.devmaster import _store

    slept: list[float] = []
    monkeypatch.setattr(_store.time, "sleep", slept.append)
    with DevMaster() as m, httpx.Client(base_url=m.url) as c:
        assert c.post(BATCH, json=batch(crashes=[crash()])).status_code == 200
    assert slept == []


@pytest.mark.parametrize("bad", [-0.001, float("nan")])
def test_cost_per_item_refuses_bad_values(bad: float) -> None:
    with pytest.raises(ValueError, match="cost_per_item must be >= 0"):
        DevMaster(cost_per_item=bad)


@pytest.mark.parametrize("bad", ["-1", "soon", "11"])
def test_cost_per_item_command_line_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        devmaster.main(["--port", "0", "--cost-per-item", bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--cost-per-item" in err
    assert "Traceback" not in err


def test_stats_report_the_largest_result_body(client: httpx.Client) -> None:
    assert client.get("/_dev/stats").json()["max_body_bytes"] == 0
    big = json.dumps(batch(crashes=[crash(stack_trace="x" * 5000)])).encode()
    assert raw(client, BATCH, big, **{"Content-Type": "application/json"}).status_code == 200
    assert client.post(CRASH, json=crash("small")).status_code == 200
    assert client.get("/_dev/stats").json()["max_body_bytes"] == len(big)


@pytest.mark.parametrize("bad", ["-1", "nan", "soon"])
def test_cli_dev_master_refuses_a_bad_cost(bad: str) -> None:
    from typer.testing import CliRunner

    from pfcollector.cli import app

    result = CliRunner().invoke(app, ["dev-master", "--port", "0", "--cost-per-item", bad])
    assert result.exit_code == 2
    assert "--cost-per-item" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_request_log_one_line_per_request() -> None:
    lines: list[str] = []
    with DevMaster(request_log=lines.append) as m, httpx.Client(base_url=m.url) as c:
        assert c.post(BATCH, json=batch(crashes=[crash()], coverage=[coverage()])).is_success
        assert c.post(CRASH, json=crash("c2")).status_code == 200
        assert c.post("/_dev/fail_next", json={"n": 1}).status_code == 200
        assert c.post(STATUS, json={"type": "fuzzer_stats"}).status_code == 503
        assert c.get("/_dev/stats").status_code == 200
        with socket.create_connection(("127.0.0.1", m.port), timeout=5) as raw_sock:
            raw_sock.sendall(b"GET /nope\x1b[2J HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert b" 404 " in raw_sock.recv(4096).split(b"\r\n")[0] + b" "
    assert lines == [
        f"POST {BATCH} 200 items=2",
        f"POST {CRASH} 200 items=1",
        "POST /_dev/fail_next 200",
        f"POST {STATUS} 503",
        "GET /_dev/stats 200",
        "GET /nope\\x1b[2J 404",  # a terminal escape from the network, shown escaped
    ]


def test_quiet_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    with DevMaster() as m, httpx.Client(base_url=m.url) as c:
        c.get("/health")
    assert capsys.readouterr() == ("", "")
