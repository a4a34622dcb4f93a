"""End to end at the master's speed: producers' ``crash()`` to rows at the reference master,
beside that master's own batch ceiling measured in the same run (issue 13, items 1 and 5).

``python benchmarks/e2e.py [--quick] [--producers 16] [--cost 0.00023]``

For each master setting (full speed, and ``--cost-per-item`` as slow as the PandaFuzz master):

1. ceiling: a fresh reference master (its own process, file database) takes ready-made batches
   of crashes from ``WORKERS`` plain HTTP client threads (keep-alive ``http.client``), for a
   fixed time: crashes stored per second is what that master can take;
2. end to end: a fresh master, a daemon delivering to it (batch mode), and ``producers``
   processes each calling ``pfclient.Client.crash()`` back to back, every call waiting for its
   durable ack, for a fixed time; timed from ``go`` to the last crash stored at the master.
   The daemon's CPU seconds (``/proc/<pid>/stat``) over the same span, per 1,000 crashes.

``storm`` is the same with 64 KiB stack traces and 64 KiB outputs: the ceiling then posts as
many such crashes per batch as fit in the master's 1 MiB body limit, and the figure checks the
largest body the master saw (``/_dev/stats`` ``max_body_bytes``) stayed under that limit.

Nothing may be lost: every crash acked must be at the master, else the run fails.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
from _producer import text_of

__all__ = ["REAL_MASTER_COST", "bench_e2e", "bench_storm", "ceiling", "end_to_end", "run_producers"]

#: The PandaFuzz master's cost per crash inside a batch (23 ms per 100, pandafuzz-master-api.md).
REAL_MASTER_COST = 0.00023
#: HTTP client threads of the ceiling measurement, as in issue 13.
WORKERS = 4
#: Crashes per ready-made batch of the ceiling (the daemon's default batch size).
BATCH = 100
#: The master's body limit for the batch endpoint.
BODY_LIMIT = 1 << 20
#: The daemon's settings for these runs: every crash is delivered (no dedupe: the worst case
#: for delivery), and a partial batch waits at most 0.2 s at the end of the run.
DAEMON_FLAGS = ["--bot-id", "bench", "--delivery-mode", "batch", "--crash-dedupe", "off",
                "--flush-interval", "0.2"]  # fmt: skip

SIZES = {
    "quick": {"ceiling_s": 1.0, "producer_s": 1.5, "cap": 2_000, "storm_s": 1.0},
    "full": {"ceiling_s": 5.0, "producer_s": 8.0, "cap": 20_000, "storm_s": 5.0},
}


def _crash_item(i: int, trace: str = "", output: str = "") -> dict[str, Any]:
    """A CrashResult as pfcollector sends it (every field, Go types)."""
    return {
        "id": str(uuid.uuid4()), "job_id": "bench-job", "bot_id": "ceiling",
        "hash": f"{i:064x}", "file_path": f"/var/lib/pfcollector/inputs/{i:064x}",
        "type": "SEGV", "signal": 11, "exit_code": 0,
        "timestamp": "2026-11-30T12:00:00.123456789Z", "size": 1024, "is_unique": False,
        "output": output, "stack_trace": trace,
    }  # fmt: skip


def _batch_bodies(n_batches: int, per_batch: int, trace: str, output: str) -> list[bytes]:
    bodies = []
    for b in range(n_batches):
        items = [_crash_item(b * per_batch + i, trace, output) for i in range(per_batch)]
        body = {"bot_id": "ceiling", "job_id": "bench-job", "crashes": items, "coverage": [],
                "corpus": []}  # fmt: skip
        bodies.append(json.dumps(body, separators=(",", ":")).encode())
    return bodies


def ceiling(
    url: str, seconds: float, per_batch: int = BATCH, trace: str = "", output: str = ""
) -> dict[str, Any]:
    """Crashes/s the master at ``url`` stores from ``WORKERS`` threads posting ready-made
    batches of ``per_batch`` for ``seconds`` (bodies built before the clock starts)."""
    host, port = url.removeprefix("http://").split(":")
    # enough distinct bodies for the time (ids must differ: INSERT OR REPLACE would not grow)
    per_worker = max(4, int(seconds * 40_000 / per_batch / WORKERS) + 2)
    if len(trace) > 4096:
        per_worker = max(4, int(seconds * 4_000 / per_batch / WORKERS) + 2)
    bodies = [_batch_bodies(per_worker, per_batch, trace, output) for _ in range(WORKERS)]
    done = [0] * WORKERS
    errors: list[str] = []
    start = threading.Barrier(WORKERS + 1)
    stop_at = [0.0]

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        headers = {"Content-Type": "application/json", "User-Agent": "pfbench-ceiling"}
        try:
            start.wait()
            for body in bodies[k]:
                if time.monotonic() >= stop_at[0]:
                    break
                conn.request("POST", "/api/v1/results/batch", body, headers)
                resp = conn.getresponse()
                answer = resp.read()
                if resp.status != 200:
                    errors.append(f"{resp.status} {answer[:200]!r}")
                    return
                done[k] += per_batch
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(WORKERS)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + seconds
    t0 = time.monotonic()
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    if errors:
        raise h.BenchError(f"ceiling: the master answered {errors[0]}")
    if all(len(b) * per_batch <= d for b, d in zip(bodies, done, strict=True)):
        raise h.BenchError("ceiling: ran out of ready-made batches before the time was up")
    return {
        "crashes": sum(done),
        "per_s": round(sum(done) / elapsed),
        "seconds": round(elapsed, 3),
        "per_batch": per_batch,
        "body_bytes": len(bodies[0][0]),
        "workers": WORKERS,
    }


def _stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_dev/stats", timeout=30) as resp:  # 127.0.0.1 only
        out: dict[str, Any] = json.load(resp)
    return out


def run_producers(
    socket_path: Path,
    work: Path,
    n: int,
    *,
    count: int,
    duration: float = 0.0,
    rate: float = 0.0,
    trace_bytes: int = 64,
    output_bytes: int = 0,
    latency: bool = False,
) -> tuple[list[dict[str, Any]], float, list[float]]:
    """``n`` ``_producer.py`` processes; returns their results, the ``go`` time, latencies."""
    work.mkdir(parents=True, exist_ok=True)
    cmds = []
    for i in range(n):
        cmd = [h.PY, str(h.HERE / "_producer.py"), "--socket", str(socket_path),
               "--index", str(i), "--count", str(count), "--duration", str(duration),
               "--rate", str(rate), "--trace-bytes", str(trace_bytes),
               "--output-bytes", str(output_bytes), "--out", str(work / f"p{i}.json")]  # fmt: skip
        if latency:
            cmd += ["--latency-out", str(work / f"p{i}.lat")]
        cmds.append(cmd)
    t_go = h.run_together(cmds, "producer", duration + _extra_wait(count, rate))
    results = [json.loads((work / f"p{i}.json").read_text()) for i in range(n)]
    lat: list[float] = []
    if latency:
        from array import array

        for i in range(n):
            a = array("d")
            a.frombytes((work / f"p{i}.lat").read_bytes())
            lat.extend(a)
    return results, t_go, lat


def _extra_wait(count: int, rate: float) -> float:
    """A bound on how long a producer may take beyond its offered time."""
    return 180.0 + (count / rate if rate > 0 else 0.0)


def end_to_end(
    root: Path,
    name: str,
    cost: float,
    size: dict[str, Any],
    producers: int,
    *,
    trace_bytes: int = 64,
    output_bytes: int = 0,
    seconds: float,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Producers -> daemon -> a fresh master; every crash acked must arrive."""
    master, url = h.start_master(root / f"{name}-master", cost)
    try:
        daemon = h.start_daemon(root, name, ["--master", url, *DAEMON_FLAGS], profile=profile)
        try:
            cpu0 = h.cpu_seconds(daemon.pid)
            mcpu0 = h.cpu_seconds(master.pid)
            results, t_go, _ = run_producers(
                daemon.socket_path, root / f"{name}-producers", producers, count=size["cap"],
                duration=seconds, trace_bytes=trace_bytes, output_bytes=output_bytes,
            )  # fmt: skip
            acked = sum(r["sent"] for r in results)
            t_acked = max(r["t_last_ack"] for r in results)
            deadline = time.monotonic() + 120
            stored = 0
            while time.monotonic() < deadline:
                stats = _stats(url)
                stored = stats["counts"]["crash"]
                if stored >= acked:
                    break
                time.sleep(0.02)
            t_done = time.monotonic()
            cpu = h.cpu_seconds(daemon.pid) - cpu0
            mcpu = h.cpu_seconds(master.pid) - mcpu0
            status = daemon.status()
        finally:
            daemon.stop()
    finally:
        h.stop_proc(master)
    if stored != acked:
        raise h.BenchError(f"{name}: {acked} crashes acked, the master has {stored}")
    elapsed = t_done - t_go
    pcpu = sum(r.get("cpu_s", 0.0) for r in results)
    return {
        "producers": producers,
        "crashes": acked,
        "per_s": round(acked / elapsed),
        "acked_per_s": round(acked / (t_acked - t_go)),
        "elapsed_s": round(elapsed, 3),  # go -> last crash stored at the master
        "daemon_cpu_s": round(cpu, 3),
        "daemon_cpu_s_per_1000": round(cpu / acked * 1000, 3) if acked else None,
        "master_cpu_s_per_1000": round(mcpu / acked * 1000, 3) if acked else None,
        "producers_cpu_s_per_1000": round(pcpu / acked * 1000, 3) if acked else None,
        "requests": stats["requests_seen"],
        "crashes_per_request": round(acked / max(1, stats["requests_seen"]), 1),
        "max_body_bytes": stats["max_body_bytes"],
        "dead_letters": status["spool"].get("dead_letters", {}),
    }


def bench_e2e(
    root: Path, quick: bool, producers: int = 16, cost: float = REAL_MASTER_COST
) -> dict[str, Any]:
    """Item 1: end to end beside the ceiling, at full speed and at the real master's cost."""
    size = SIZES["quick" if quick else "full"]
    out: dict[str, Any] = {"load": h.load_now(), "producers": producers, "input_bytes": 1024}
    for label, c in (("full_speed", 0.0), ("real_cost", cost)):
        master, url = h.start_master(root / f"ceiling-{label}", c)
        try:
            ceil = ceiling(url, size["ceiling_s"])
        finally:
            h.stop_proc(master)
        run = end_to_end(root, f"e2e-{label}", c, size, producers, seconds=size["producer_s"])
        run["ceiling"] = ceil
        run["ratio"] = round(run["per_s"] / ceil["per_s"], 3)
        run["cost_per_item"] = c
        out[label] = run
    return out


def bench_storm(
    root: Path, quick: bool, producers: int = 16, cost: float = REAL_MASTER_COST
) -> dict[str, Any]:
    """Item 5: 64 KiB stack traces and outputs, at the real master's cost."""
    size = SIZES["quick" if quick else "full"]
    big = 64 * 1024
    trace, output = text_of(big, 1), text_of(big, 2)
    one = len(json.dumps(_crash_item(0, trace, output), separators=(",", ":")))
    per_batch = max(1, (BODY_LIMIT - 200) // (one + 1))
    master, url = h.start_master(root / "ceiling-storm", cost)
    try:
        ceil = ceiling(url, size["storm_s"], per_batch, trace, output)
    finally:
        h.stop_proc(master)
    run = end_to_end(root, "storm", cost, size, producers, trace_bytes=big, output_bytes=big,
                      seconds=size["storm_s"])  # fmt: skip
    if run["max_body_bytes"] > BODY_LIMIT:
        raise h.BenchError(f"storm: a {run['max_body_bytes']} B body reached the master "
                           f"(limit {BODY_LIMIT})")  # fmt: skip
    run.update(ceiling=ceil, ratio=round(run["per_s"] / ceil["per_s"], 3), cost_per_item=cost,
               item_json_bytes=one, load=h.load_now())  # fmt: skip
    return run


def main(argv: list[str] | None = None) -> int:
    """Run both benchmarks standalone and print their figures as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--producers", type=int, default=16)
    p.add_argument("--cost", type=float, default=REAL_MASTER_COST)
    p.add_argument("--only", default="e2e,storm")
    p.add_argument("--src", type=Path, default=None, help="run the daemon from this tree")
    args = p.parse_args(argv)
    if args.src is not None:  # compare two trees with the same benchmark
        h.DAEMON_ENV["PYTHONPATH"] = str((args.src / "src").resolve())
    root = Path(tempfile.mkdtemp(prefix="pfe2e-"))
    out: dict[str, Any] = {}
    try:
        if "e2e" in args.only:
            out["e2e"] = bench_e2e(root, args.quick, args.producers, args.cost)
        if "storm" in args.only:
            out["storm"] = bench_storm(root, args.quick, args.producers, args.cost)
    finally:
        h.kill_all()
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
