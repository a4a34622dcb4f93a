"""The master's API as pure functions: bodies, splitting, answer classification, bot endpoints.

Rules of this module: no I/O and no event loop; expected bodies are written out from the
master's field list (``shared/pandafuzz-master-api.md``), not from the code under test.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfcollector.botapi import (
    RegisterError,
    heartbeat_body,
    parse_register,
    register_body,
    sanitize_capabilities,
)
from pfcollector.events import Event, Kind, to_master
from pfcollector.master import (
    BATCH_BODY_LIMIT,
    BATCH_PATH,
    STATUS_PATH,
    Delivered,
    EncodeError,
    Partial,
    Poison,
    Transient,
    classify,
    compact_json,
    encode_batches,
    item_request,
    parse_retry_after,
)

TS = 1_700_000_000_123_456_789
TS_TEXT = "2023-11-14T22:13:20.123456789Z"
CRASH_FIELDS = {
    "id",
    "job_id",
    "bot_id",
    "hash",
    "file_path",
    "type",
    "signal",
    "exit_code",
    "timestamp",
    "size",
    "is_unique",
    "output",
    "stack_trace",
}
COVERAGE_FIELDS = {"id", "job_id", "bot_id", "edges", "new_edges", "timestamp", "exec_count"}
CORPUS_FIELDS = {"id", "job_id", "bot_id", "files", "timestamp", "total_size"}


def crash(i: int, output: str = "", job: str = "job-1") -> Event:
    return Event(
        id=f"c{i}",
        kind=Kind.CRASH,
        job_id=job,
        fuzzer="afl",
        timestamp_ns=TS,
        fields={"type": "SEGV", "signal": 11, "hash": "ab" * 32, "size": 3, "output": output},
    )


def coverage(i: int) -> Event:
    return Event(f"v{i}", Kind.COVERAGE, "job-1", "afl", TS, {"edges": 100 + i, "new_edges": 1})


def corpus(i: int, files: list[str] | None = None) -> Event:
    return Event(f"p{i}", Kind.CORPUS, "job-1", "afl", TS, {"files": files})


def stats(i: int) -> Event:
    return Event(f"s{i}", Kind.STATS, "job-1", "afl", TS, {"executions": 5, "cpu_usage": 1})


# -- bodies --------------------------------------------------------------------------------


def test_batch_body_is_exactly_what_the_master_wants() -> None:
    [(events, body, per_item)] = encode_batches(Kind.CRASH, "job-1", "bot-9", [crash(0)])
    assert not per_item
    assert events == [crash(0)]
    assert b" " not in body.replace(b'"SEGV"', b"")  # compact separators
    doc = json.loads(body)
    assert set(doc) == {"bot_id", "job_id", "crashes", "coverage", "corpus"}
    assert (doc["bot_id"], doc["job_id"], doc["coverage"], doc["corpus"]) == (
        "bot-9",
        "job-1",
        [],
        [],
    )
    [item] = doc["crashes"]
    assert set(item) == CRASH_FIELDS
    assert item["signal"] == 11
    assert type(item["signal"]) is int
    assert type(item["exit_code"]) is int
    assert type(item["size"]) is int
    assert item["timestamp"] == TS_TEXT
    assert item["bot_id"] == "bot-9"
    assert b'"signal":11,' in body  # an int, never 11.0


@pytest.mark.parametrize(
    ("kind", "make", "list_name", "fields"),
    [
        (Kind.COVERAGE, coverage, "coverage", COVERAGE_FIELDS),
        (Kind.CORPUS, corpus, "corpus", CORPUS_FIELDS),
    ],
)
def test_batch_bodies_of_other_kinds(kind: Kind, make: Any, list_name: str, fields: Any) -> None:
    [(_, body, _)] = encode_batches(kind, "job-1", "bot", [make(0), make(1)])
    doc = json.loads(body)
    assert [len(doc[n]) for n in ("crashes", "coverage", "corpus")] == [
        2 if n == list_name else 0 for n in ("crashes", "coverage", "corpus")
    ]
    assert all(set(item) == fields for item in doc[list_name])


def test_corpus_files_never_null() -> None:
    [(_, body, _)] = encode_batches(Kind.CORPUS, "job-1", "bot", [corpus(0, None)])
    assert json.loads(body)["corpus"][0]["files"] == []
    assert b"null" not in body


def test_non_ascii_is_counted_in_utf8_bytes() -> None:
    events = [crash(i, output="é€😀" * 50) for i in range(3)]
    [(_, body, _)] = encode_batches(Kind.CRASH, "job-1", "bot", events)
    assert json.loads(body)["crashes"][2]["output"] == "é€😀" * 50


_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)  # lone surrogates too


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from([Kind.CRASH, Kind.COVERAGE, Kind.CORPUS]),
    text=_TEXT,
    number=st.integers(min_value=-(2**70), max_value=2**70),
    flag=st.booleans(),
    files=st.lists(_TEXT, max_size=4),
    bot_id=_TEXT,
)
def test_batch_items_are_the_bytes_json_dumps_writes(
    kind: Kind, text: str, number: int, flag: bool, files: list[str], bot_id: str
) -> None:
    """The fast encoder (msgspec) writes each item byte for byte as ``compact_json``."""
    fields: dict[str, Any] = {
        Kind.CRASH: {"type": text, "signal": number, "output": text, "stack_trace": text,
                     "is_unique": flag, "size": number, "hash": text},
        Kind.COVERAGE: {"edges": number, "new_edges": number, "exec_count": number},
        Kind.CORPUS: {"files": files, "total_size": number},
    }[kind]  # fmt: skip
    event = Event(f"e-{text}", kind, f"job-{text}", "afl", TS, fields)
    body = encode_batches(kind, event.job_id, bot_id, [event])[0].body
    expected = compact_json(to_master(event, bot_id))
    assert expected in body  # the item, inside its batch frame
    assert json.loads(body)  # and the whole body is JSON


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=40),
    limit=st.integers(min_value=700, max_value=8000),
)
def test_every_body_fits_and_nothing_is_lost(sizes: list[int], limit: int) -> None:
    events = [crash(i, output="x" * size) for i, size in enumerate(sizes)]
    batches = encode_batches(Kind.CRASH, "job-1", "bot", events, limit=limit)
    seen: list[str] = []
    for group, body, per_item in batches:
        seen.extend(e.id for e in group)
        if per_item:
            assert len(group) == 1
            assert body == b""
            # flagged only if it really could not fit on its own
            alone = encode_batches(Kind.CRASH, "job-1", "bot", group, limit=10 * limit)
            assert len(alone[0].body) > limit
            continue
        assert len(body) <= limit
        doc = json.loads(body)
        assert [c["id"] for c in doc["crashes"]] == [e.id for e in group]
    assert seen == [e.id for e in events]


def test_splitting_packs_greedily_to_the_byte() -> None:
    events = [coverage(i) for i in range(10)]
    [(_, whole, _)] = encode_batches(Kind.COVERAGE, "job-1", "bot", events)
    exact = encode_batches(Kind.COVERAGE, "job-1", "bot", events, limit=len(whole))
    assert len(exact) == 1
    split = encode_batches(Kind.COVERAGE, "job-1", "bot", events, limit=len(whole) - 1)
    assert [len(b.events) for b in split] == [9, 1]


def test_max_items_splits_too() -> None:
    batches = encode_batches(
        Kind.COVERAGE, "job-1", "bot", [coverage(i) for i in range(7)], max_items=3
    )
    assert [len(b.events) for b in batches] == [3, 3, 1]


def test_default_limit_leaves_a_margin_under_one_mib() -> None:
    events = [crash(i, output="y" * 60_000) for i in range(40)]
    batches = encode_batches(Kind.CRASH, "job-1", "bot", events)
    assert len(batches) > 1
    assert all(len(b.body) <= BATCH_BODY_LIMIT - 4096 for b in batches)


def test_oversize_item_is_flagged_for_the_item_endpoint() -> None:
    big = crash(1, output="z" * 5000)
    batches = encode_batches(Kind.CRASH, "job-1", "bot", [crash(0), big, crash(2)], limit=4000)
    assert [(ids(b.events), b.per_item) for b in batches] == [
        (["c0"], False),
        (["c1"], True),
        (["c2"], False),
    ]
    path, body = item_request(big, "bot")
    assert path == "/api/v1/results/crash"
    assert set(json.loads(body)) == CRASH_FIELDS


def test_unencodable_item_is_flagged_and_refused_by_item_request() -> None:
    bad = Event("c9", Kind.CRASH, "job-1", "afl", TS, {"type": "x", "signal": "eleven"})
    [batch] = encode_batches(Kind.CRASH, "job-1", "bot", [bad])
    assert batch.per_item
    with pytest.raises(EncodeError):
        item_request(bad, "bot")


def test_mixed_job_or_kind_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="not crash/job-2"):
        encode_batches(Kind.CRASH, "job-2", "bot", [crash(0)])
    with pytest.raises(ValueError, match="batch endpoint"):
        encode_batches(Kind.STATS, "job-1", "bot", [stats(0)])


def test_item_requests() -> None:
    assert item_request(coverage(0), "b")[0] == "/api/v1/results/coverage"
    assert item_request(corpus(0), "b")[0] == "/api/v1/results/corpus"
    path, body = item_request(stats(0), "b")
    assert path == STATUS_PATH
    doc = json.loads(body)
    assert doc["type"] == "fuzzer_stats"
    assert type(doc["executions"]) is int
    assert type(doc["cpu_usage"]) is float
    started = Event("l1", Kind.STARTED, "job-1", "afl", TS, {"message": "go"})
    assert item_request(started, "b")[0] == STATUS_PATH
    nan = Event("s2", Kind.STATS, "job-1", "afl", TS, {"cpu_usage": float("nan")})
    with pytest.raises(EncodeError):
        item_request(nan, "b")


def ids(events: list[Event]) -> list[str]:
    return [e.id for e in events]


# -- answers -------------------------------------------------------------------------------

SENT = [corpus(0), coverage(0)]  # classify only reads ids and positions
CORPUS_SENT = [corpus(0, ["a"]), corpus(1, None), corpus(2, ["b"])]


def answer(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def test_200_is_delivered() -> None:
    body = answer({"status": "processed", "processed": {"crashes": 0, "coverage": 2}})
    assert classify(200, {}, body, Kind.COVERAGE, SENT) == Delivered(("p0", "v0"))
    assert classify(200, {}, b"not json", Kind.CRASH, SENT) == Delivered(("p0", "v0"))


def test_partial_success_maps_errors_to_items() -> None:
    body = answer(
        {
            "status": "processed",
            "processed": {"crashes": 0, "coverage": 0, "corpus": 2},
            "errors": ["corpus 1: NOT NULL constraint failed: corpus_updates.files"],
            "partial_success": True,
        }
    )
    outcome = classify(200, {}, body, Kind.CORPUS, CORPUS_SENT)
    assert outcome == Partial(
        ("p0", "p2"), {"p1": "corpus 1: NOT NULL constraint failed: corpus_updates.files"}
    )


def test_partial_success_with_a_passing_error_is_retryable() -> None:
    body = answer(
        {"partial_success": True, "errors": ["corpus 2: database is locked", "corpus 0: bad"]}
    )
    outcome = classify(200, {}, body, Kind.CORPUS, CORPUS_SENT)
    assert isinstance(outcome, Partial)
    assert outcome.delivered == ("p1",)
    assert outcome.failed == {"p0": "corpus 0: bad"}
    assert outcome.retryable == {"p2": "corpus 2: database is locked"}


def test_partial_success_crash_errors_use_the_singular() -> None:
    sent = [crash(0), crash(1)]
    body = answer({"partial_success": True, "errors": ["crash 1: UNIQUE constraint: x"]})
    assert classify(200, {}, body, Kind.CRASH, sent) == Partial(
        ("c0",), {"c1": "crash 1: UNIQUE constraint: x"}
    )


def test_partial_success_unmapped_errors_poison_all_only_if_nothing_is_named() -> None:
    some = answer(
        {"partial_success": True, "errors": ["corpus 0: x", "weird thing", "corpus 9: y"]}
    )
    assert classify(200, {}, some, Kind.CORPUS, CORPUS_SENT) == Partial(
        ("p1", "p2"), {"p0": "corpus 0: x"}
    )
    none = answer({"partial_success": True, "errors": ["weird thing"]})
    assert classify(200, {}, none, Kind.CORPUS, CORPUS_SENT) == Partial(
        (), {"p0": "weird thing", "p1": "weird thing", "p2": "weird thing"}
    )


@pytest.mark.parametrize("status", [400, 413, 415, 422])
def test_4xx_is_poison_with_the_masters_words(status: int) -> None:
    body = answer({"error": "Invalid batch", "details": 'json: unknown field "x"', "status": 400})
    assert classify(status, {}, body, Kind.CRASH, SENT) == Poison(
        status, 'Invalid batch: json: unknown field "x"'
    )


def test_poison_raw_text_is_truncated() -> None:
    outcome = classify(400, {}, b"<html>" + b"x" * 5000, Kind.CRASH, SENT)
    assert isinstance(outcome, Poison)
    assert outcome.error_text.startswith("<html>")
    assert len(outcome.error_text) == 1024


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_transient_statuses(status: int) -> None:
    outcome = classify(status, {}, answer({"error": "db"}), Kind.CRASH, SENT)
    assert isinstance(outcome, Transient)
    assert outcome.reason == f"HTTP {status}: db"
    assert outcome.retry_after is None


@pytest.mark.parametrize("status", [401, 403, 404, 407])
def test_access_problems_are_not_poison(status: int) -> None:
    assert isinstance(classify(status, {}, b"", Kind.CRASH, SENT), Transient)


def test_retry_after_seconds() -> None:
    outcome = classify(429, {"retry-after": "7"}, b"", Kind.CRASH, SENT)
    assert outcome == Transient("HTTP 429: (empty answer)", 7.0)


def test_retry_after_http_date_against_the_date_header() -> None:
    headers = {
        "Retry-After": "Wed, 21 Oct 2015 07:28:30 GMT",
        "Date": "Wed, 21 Oct 2015 07:28:00 GMT",
    }
    outcome = classify(503, headers, b"", Kind.CRASH, SENT, wall_now=0.0)
    assert isinstance(outcome, Transient)
    assert outcome.retry_after == 30.0


def test_retry_after_http_date_against_the_wall_clock() -> None:
    when = "Wed, 21 Oct 2015 07:28:30 GMT"
    assert parse_retry_after(when, wall_now=1445412490.0) == 20.0
    assert parse_retry_after(when, wall_now=1445412999.0) == 0.0  # in the past
    assert parse_retry_after(when) is None  # nothing to measure it against
    assert parse_retry_after("soon", wall_now=0.0) is None
    assert parse_retry_after("-5", wall_now=0.0) == 0.0


# -- bots ----------------------------------------------------------------------------------


def test_capabilities_are_sanitized() -> None:
    assert sanitize_capabilities(["afl++", "libfuzzer", "afl++", "7zip", "a.b", ""]) == [
        "aflpp",
        "libfuzzer",
        "_7zip",
        "a_b",
    ]
    assert sanitize_capabilities([]) == ["fuzzer"]
    assert len(sanitize_capabilities(f"f{i}" for i in range(20))) == 10


def test_register_body() -> None:
    body = register_body("host-1", "bot one", ["afl++", "honggfuzz"], "http://10.0.0.2:9000")
    assert json.loads(body) == {
        "hostname": "host-1",
        "name": "bot one",
        "capabilities": ["aflpp", "honggfuzz"],
        "api_endpoint": "http://10.0.0.2:9000",
    }
    with pytest.raises(ValueError, match="api_endpoint"):
        register_body("h", "n", ["afl"], "10.0.0.2:9000")
    with pytest.raises(ValueError, match="hostname"):
        register_body("", "n", ["afl"], "http://x")


def test_parse_register_reads_json_sent_as_text() -> None:
    body = b'{"bot_id":"b-123","status":"registered","timestamp":"x","timeout":"y"}\n'
    assert parse_register(201, body) == "b-123"
    with pytest.raises(RegisterError, match="HTTP 400"):
        parse_register(400, answer({"error": "Invalid request body"}))
    with pytest.raises(RegisterError, match="no bot_id"):
        parse_register(201, b"registered")


def test_heartbeat_body() -> None:
    assert json.loads(heartbeat_body("busy", "job-1", TS)) == {
        "status": "busy",
        "current_job": "job-1",
        "last_activity": TS_TEXT,
    }
    assert json.loads(heartbeat_body("idle", None, TS))["current_job"] is None
    with pytest.raises(ValueError, match="unknown bot status"):
        heartbeat_body("sleeping", None, TS)


def test_paths() -> None:
    assert BATCH_PATH == "/api/v1/results/batch"
