"""Request-body compression, against the reference master with decoding switched on.

Rules of this module: delivery tests use the real :class:`DevMaster` on 127.0.0.1 (never a
mock transport), a fresh master per test; zstd tests are skipped where the optional
zstandard package is not installed; the default (``none``) is checked to stay off.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os

import httpx
import pytest

from pfcollector.breaker import CircuitBreaker
from pfcollector.config import Config, ConfigError
from pfcollector.devmaster import DevMaster
from pfcollector.events import Event, Kind
from pfcollector.sender import Batch, RetryPolicy, Sender, compress_body

TS = 1_700_000_000_000_000_000
HAVE_ZSTD = importlib.util.find_spec("zstandard") is not None


def crashes(n: int) -> list[Event]:
    fields = {"type": "SEGV", "signal": 11, "stack_trace": "frame\n" * 200, "hash": "ab" * 32}
    return [Event(f"c{i}", Kind.CRASH, "job-1", "afl", TS, fields) for i in range(n)]


def test_compress_body_threshold_and_round_trip() -> None:
    small = b'{"a": 1}'
    assert compress_body(small, "gzip", 1024) == (small, None)
    big = json.dumps({"x": ["same text"] * 500}).encode()
    packed, encoding = compress_body(big, "gzip", 1024)
    assert encoding == "gzip" and len(packed) < len(big) // 5
    assert gzip.decompress(packed) == big
    assert compress_body(big, "none", 0) == (big, None)
    noise = os.urandom(4096)  # does not shrink: sent as it is
    assert compress_body(noise, "gzip", 0) == (noise, None)


def test_zstd_needs_the_package() -> None:
    if HAVE_ZSTD:
        assert Config(compression="zstd").compression == "zstd"
    else:
        with pytest.raises(ConfigError, match="compression: zstd needs the zstandard package"):
            Config(compression="zstd")
    with pytest.raises(ConfigError, match="compression: must be one of 'none', 'gzip', 'zstd'"):
        Config(compression="brotli")  # type: ignore[arg-type]
    assert Config().compression == "none" and Config().compression_threshold == 1024


async def deliver(
    master: DevMaster, compression: str, events: list[Event]
) -> tuple[Sender, list[str], list[str]]:
    async with httpx.AsyncClient(base_url=master.url, timeout=5.0) as client:
        sender = Sender(
            client,
            bot_id="bot-z",
            breaker=CircuitBreaker(),
            retry=RetryPolicy(attempts=1),
            compression=compression,  # type: ignore[arg-type]
            compression_threshold=1024,
        )
        result = await sender.deliver(Batch(Kind.CRASH, "job-1", events))
    return sender, result.delivered, [p[0] for p in result.poisoned]


@pytest.mark.parametrize(
    "method",
    ["gzip", pytest.param("zstd", marks=pytest.mark.skipif(not HAVE_ZSTD, reason="no zstandard"))],
)
async def test_compressed_batches_reach_a_master_that_decodes_them(method: str) -> None:
    with DevMaster(accept_compression=True) as master:
        _, delivered, poisoned = await deliver(master, method, crashes(20))
        assert sorted(delivered) == sorted(f"c{i}" for i in range(20)) and poisoned == []
        assert master.count("crash") == 20
        assert master.rows("crash")[0]["stack_trace"] == "frame\n" * 200


async def test_the_pandafuzz_master_refuses_compressed_bodies() -> None:
    """What the default protects against: the real master answers 400 (poison) to gzip."""
    with DevMaster() as master:
        _, delivered, poisoned = await deliver(master, "gzip", crashes(3))
        assert delivered == [] and sorted(poisoned) == ["c0", "c1", "c2"]
        assert master.count("crash") == 0
        _, delivered, _ = await deliver(master, "none", crashes(3))
        assert len(delivered) == 3


async def test_small_bodies_go_uncompressed_even_when_switched_on() -> None:
    with DevMaster() as master:  # refuses any Content-Encoding: so nothing small is encoded
        small = [Event("s1", Kind.CRASH, "job-1", "afl", TS, {"type": "SEGV", "signal": 11})]
        _, delivered, poisoned = await deliver(master, "gzip", small)
        assert delivered == ["s1"] and poisoned == []


def test_devmaster_bounds_what_it_decompresses() -> None:
    bomb = gzip.compress(b"{" + b" " * (2 * 1024 * 1024) + b"}")
    with DevMaster(accept_compression=True) as master:
        response = httpx.post(
            f"{master.url}/api/v1/results/coverage",
            content=bomb,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
        assert response.status_code == 413
        response = httpx.post(
            f"{master.url}/api/v1/results/coverage",
            content=b"not gzip",
            headers={"Content-Encoding": "gzip"},
        )
        assert response.status_code == 400 and "cannot decode gzip" in response.text
