"""A small fleet on one machine: N daemons (each its own data dir and socket, its own bot id)
at a real bot's low rates, delivering to one reference master (issue 13, item 6).

``python benchmarks/fleet.py [--quick] [--bots 10]``

Each bot runs ``FUZZERS`` fuzzers (``pfclient.Client`` connections, all driven from this
process by one scheduling loop): every fuzzer sends stats at ``STATS_HZ``, coverage at
``COVERAGE_HZ``, a corpus entry at ``CORPUS_HZ``; each bot a crash at ``CRASH_HZ`` (waiting for
its ack, as a harness does). Measured at the master over a window after a warm-up of one flush
interval or so: HTTP requests per second and rows stored per second (crashes + coverage + corpus +
status posts), per bot, with batching and coalescing on (the defaults: batch mode,
``--coalesce``) and off (``--delivery-mode item --no-coalesce``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

from pfclient import Client

__all__ = ["RATES", "bench_fleet"]

FUZZERS = 4
#: Events per second: per fuzzer for stats/coverage/corpus, per bot for crashes.
RATES = {"stats": 2.0, "coverage": 0.5, "corpus": 0.2, "crash": 0.05}
SIZES = {
    "quick": {"bots": 10, "flush_s": 1.0, "warmup_s": 1.0, "window_s": 2.5},
    "full": {"bots": 12, "flush_s": 10.0, "warmup_s": 15.0, "window_s": 60.0},
}
CONFIGS = {
    "batched": ["--delivery-mode", "batch", "--coalesce"],
    "unbatched": ["--delivery-mode", "item", "--no-coalesce"],
}
_ROWS = ("crash", "coverage", "corpus", "status")


def _stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_dev/stats", timeout=30) as resp:  # 127.0.0.1 only
        out: dict[str, Any] = json.load(resp)
    return out


def _drive(clients: list[list[Client]], until: float, sent: dict[str, int]) -> None:
    """Send every bot's events on schedule until ``until`` (monotonic)."""
    now = time.monotonic()
    queue: list[tuple[float, int, int, str]] = []
    for b, fuzzers in enumerate(clients):
        for f in range(len(fuzzers)):
            for kind in ("stats", "coverage", "corpus"):
                # spread the first events over one period, so the bots are not in step
                phase = ((b * 31 + f * 7) % 97) / 97 / RATES[kind]
                queue.append((now + phase, b, f, kind))
        queue.append((now + ((b * 13) % 97) / 97 / RATES["crash"], b, 0, "crash"))
    heapq.heapify(queue)
    n = 0
    while queue:
        due, b, f, kind = heapq.heappop(queue)
        if due >= until:
            break
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        c = clients[b][f]
        n += 1
        if kind == "stats":
            c.stats(executions=1_000_000 + n * 977, exec_per_second=8_500.0, corpus_size=n)
        elif kind == "coverage":
            c.coverage(5_000 + n, new_edges=n % 3, exec_count=n * 1000)
        elif kind == "corpus":
            c.corpus([f"queue/id:{n:06d}"], total_size=2048 + n)
        else:
            c.crash("SEGV", os.urandom(1024), signal=11, stack_trace=f"#0 0x{n:x} in f a.c:1")
        sent[kind] += 1
        per = RATES[kind] if kind != "crash" else RATES["crash"]
        heapq.heappush(queue, (due + 1.0 / per, b, f, kind))


def _one(root: Path, name: str, flags: list[str], size: dict[str, Any]) -> dict[str, Any]:
    bots = size["bots"]
    master, url = h.start_master(root / f"{name}-master")
    daemons: list[h.DaemonProc] = []
    clients: list[list[Client]] = []
    try:
        for b in range(bots):  # spawned together, then waited for: a faster start
            daemons.append(h.spawn_daemon(root, f"{name}-bot{b}", [
                "--master", url, "--bot-id", f"bot-{b}", "--flush-interval",
                str(size["flush_s"]), *flags]))  # fmt: skip
        for d in daemons:
            h.wait_daemon(d)
        for b, d in enumerate(daemons):
            clients.append([Client(str(d.socket_path), job_id=f"job-{b % 3}",
                                   fuzzer=f"fuzz{f}") for f in range(FUZZERS)])  # fmt: skip
        sent = dict.fromkeys(RATES, 0)
        t_start = time.monotonic()
        _drive(clients, t_start + size["warmup_s"], sent)  # warm-up
        before, sent_before = _stats(url), dict(sent)
        cpu0 = sum(h.cpu_seconds(d.pid) for d in daemons)
        t0 = time.monotonic()
        _drive(clients, t0 + size["window_s"], sent)
        after = _stats(url)
        window = time.monotonic() - t0
        cpu = sum(h.cpu_seconds(d.pid) for d in daemons) - cpu0
    finally:
        for fuzzers in clients:
            for c in fuzzers:
                c.close()
        for d in daemons:  # all told to stop first, so that they drain in parallel
            if d.pid and d.proc.poll() is None:
                os.kill(d.pid, signal.SIGTERM)
        for d in daemons:
            d.stop()
        h.stop_proc(master)
    requests = after["requests_seen"] - before["requests_seen"]
    rows = {k: after["counts"][k] - before["counts"][k] for k in _ROWS}
    events = {k: sent[k] - sent_before[k] for k in sent}
    per_bot = window * bots
    return {
        "bots": bots,
        "fuzzers_per_bot": FUZZERS,
        "window_s": round(window, 2),
        "flags": flags,
        "events_per_s_per_bot": round(sum(events.values()) / per_bot, 2),
        "requests_per_s_per_bot": round(requests / per_bot, 3),
        "rows_per_s_per_bot": round(sum(rows.values()) / per_bot, 3),
        "rows_by_kind_per_s_per_bot": {k: round(v / per_bot, 3) for k, v in rows.items()},
        "events_in_window": events,
        # one daemon's CPU use, as a share of one core, over the window
        "daemon_cpu_share": round(cpu / window / bots, 4),
        "at_1000_bots": {"requests_per_s": round(requests / window / bots * 1000),
                         "rows_per_s": round(sum(rows.values()) / window / bots * 1000)},
    }  # fmt: skip


def bench_fleet(root: Path, quick: bool, bots: int | None = None) -> dict[str, Any]:
    """Both configurations, same fleet, same load."""
    size = dict(SIZES["quick" if quick else "full"])
    if bots:
        size["bots"] = bots
    out: dict[str, Any] = {"load": h.load_now(), "rates": RATES, "flush_s": size["flush_s"]}
    for name, flags in CONFIGS.items():
        out[name] = _one(root, f"fleet-{name}", flags, size)
    b, u = out["batched"], out["unbatched"]
    out["request_reduction"] = round(u["requests_per_s_per_bot"]
                                     / max(1e-9, b["requests_per_s_per_bot"]), 1)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--bots", type=int, default=None)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="pffleet-"))
    try:
        print(json.dumps(bench_fleet(root, args.quick, args.bots), indent=2))
    finally:
        h.kill_all()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
