"""pfcollector benchmarks: ``python benchmarks/run.py [--quick] [--out FILE.json]``.

Measures, side by side in one run (see ``docs/performance.md`` for what each figure means):

a. ingest: events/s accepted by the daemon from 8 client processes sending pre-encoded frames
   (stats, and a crash-heavy mix), next to a trivial read-and-decode trio server (the ceiling);
b. durable crashes (1 KiB inputs): crashes/s flat out, and p50/p99 send-to-ack latency at the
   target rate;
c. end to end: results/s delivered to the reference master, batch mode next to item mode;
d. memory: the daemon's peak RSS while events arrive with the master down, nothing lost;
   and under pressure (``memory_pressure.py``): 64 producers of 1 MiB and 10 MiB inputs
   against a stalled spool, peak RSS within ``memory_budget + 100 MiB``;
e. profile: py-spy's top frames of the daemon under ingest, durable crash load and the end to
   end crash path of g (skipped, with a note, when py-spy is not installed);
f. one producer's ``crash()`` round trip below saturation, beside this disk's fsync
   (``crash_latency.py``);
g. end to end: 16 producers' ``crash()`` delivered to the reference master, beside that
   master's own batch ceiling, at full speed and at the real master's cost (``e2e.py``);
h. crash storm: the same with 64 KiB stack traces and outputs (``e2e.py``);
i. fleet: N daemons at a real bot's rates against one master, batching and coalescing on and
   off (``fleet.py``);
j. typed decode: msgspec's typed MessagePack decoder beside ``msgpack.unpackb`` and the
   daemon's parser (which uses it first), message by message and in runs, on the stats frame
   (``typed_decode.py``).

Acceptance is always timed by the daemon's cumulative acks (and checked against its ``status``),
never by how fast clients write, so the figures stay meaningful whatever per-kind policy the
daemon applies. ``--quick`` (CI) runs everything small and asserts no threshold; any event not
acknowledged, refused, or missing where it must be fails the run (exit 1).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
from _profile import top_frames
from crash_latency import TARGET_P50_MS, TARGET_P99_MS, bench_crash_latency
from e2e import REAL_MASTER_COST, bench_storm, end_to_end
from e2e import bench_e2e as bench_e2e_master
from fleet import bench_fleet
from memory_pressure import bench_pressure
from typed_decode import bench_typed_decode

CLIENTS = 8
ALL = ("ingest", "durable", "e2e", "memory", "pressure", "profile", "latency", "e2e_master",
       "storm", "fleet", "typed_decode")  # fmt: skip
DURABLE = ("crash", "corpus")  # kinds the daemon must store, one row per event sent
TARGETS = {
    "ingest_vs_baseline": 1.0,
    "crashes_per_s": 20_000,
    "crash_p99_ms": 10.0,
    "peak_rss_mb": 200,
    "e2e_vs_ceiling": 0.9,
    "crash_rtt_p50_ms": TARGET_P50_MS,
    "crash_rtt_p99_ms": TARGET_P99_MS,
}

# Sizes per mode. "*_s": seconds a load is offered (then the clients wait for their acks);
# "*_cap": events per client process at most (frames are built before the clock starts).
SIZES = {
    "quick": {
        "ingest_s": 1.0, "ingest_cap": 12_000, "crashmix_cap": 2_000, "crash_s": 0.5,
        "crash_cap": 2_000, "e2e_batch": 300, "e2e_item": 60, "memory_total": 40_000,
        "profile_s": 0.5, "latency_rates": [200.0], "latency_count": 200,
    },
    "full": {
        "ingest_s": 5.0, "ingest_cap": 150_000, "crashmix_cap": 20_000, "crash_s": 5.0,
        "crash_cap": 20_000, "e2e_batch": 3_000, "e2e_item": 600, "memory_total": 1_000_000,
        "profile_s": 10.0, "latency_rates": [100.0, 400.0], "latency_count": 1500,
    },
}  # fmt: skip
#: Unacknowledged events per client for loads with crashes: 8 x 256 fill one group commit
#: (GROUP_MAX 2048) and bound the backlog a slow disk must clear after the offered time.
CRASH_WINDOW = 256
#: Bound on any one client run beyond its offered time (a slow daemon still ends).
ACK_WAIT_S = 120.0


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _spooled(status: dict[str, Any]) -> dict[str, int]:
    return {k: v.get("spooled", 0) for k, v in status["spool"]["kinds"].items()}


def _received(status: dict[str, Any]) -> int:
    return sum(v["received"] for v in status["events"].values())


def _sent_by_kind(run: h.ClientRun) -> Counter[str]:
    """How many events of each kind the clients sent (mirrors ``_load.MIXES``)."""
    from _load import MIXES

    out: Counter[str] = Counter()
    for r in run.results:
        makers = MIXES[r["mix"]]
        for i in range(r["sent"]):
            out[makers[i % len(makers)].__name__.lstrip("_")] += 1
    return out


def _check_durable(status: dict[str, Any], sent: Counter[str], what: str) -> None:
    spooled = _spooled(status)
    for kind in DURABLE:
        if sent[kind] and spooled.get(kind, 0) + _delivered(status, kind) != sent[kind]:
            raise h.BenchError(
                f"{what}: sent {sent[kind]} {kind} events, the spool has "
                f"{spooled.get(kind, 0)} (+{_delivered(status, kind)} delivered)"
            )


def _delivered(status: dict[str, Any], kind: str) -> int:
    return int(status["spool"]["kinds"].get(kind, {}).get("delivered", 0))


def _daemon_load(
    root: Path, name: str, mixes: list[str], count: int, **kw: Any
) -> tuple[h.ClientRun, dict[str, Any], int]:
    """Start a local-mode daemon, run the clients, check nothing was lost, stop it."""
    daemon = h.start_daemon(root, name)
    try:
        run = h.run_clients(daemon.socket_path, root / f"{name}-clients", mixes, count, **kw)
        run.check_complete(name)
        status = daemon.status()
        if _received(status) < run.sent:
            raise h.BenchError(f"{name}: acked {run.acked} but status counts {_received(status)}")
        _check_durable(status, _sent_by_kind(run), name)
        rss = daemon.vmhwm_kib()
    finally:
        daemon.stop()
    return run, status, rss


def bench_ingest(root: Path, size: dict[str, Any]) -> dict[str, Any]:
    """a. events/s accepted, next to the read-and-decode baseline."""
    out: dict[str, Any] = {"load": h.load_now(), "clients": CLIENTS}
    bounds = {"duration": size["ingest_s"], "max_seconds": size["ingest_s"] + ACK_WAIT_S}
    for mix, count, window in (("stats", size["ingest_cap"], 4096),
                               ("crashmix", size["crashmix_cap"], CRASH_WINDOW)):  # fmt: skip
        proc, sock = h.start_baseline(root / f"baseline-{mix}")
        try:
            base = h.run_clients(sock, root / f"baseline-{mix}-clients", [mix] * CLIENTS, count,
                                 window=window, **bounds)  # fmt: skip
            base.check_complete(f"baseline {mix}")
        finally:
            h.stop_proc(proc)
        run, _status, _rss = _daemon_load(root, f"ingest-{mix}", [mix] * CLIENTS, count,
                                          window=window, **bounds)  # fmt: skip
        frame = sum(r["bytes"] for r in run.results) / run.sent
        out[mix] = {
            "events": run.sent,
            "frame_bytes": round(frame, 1),
            "daemon_per_s": round(run.sent / run.elapsed),
            "baseline_per_s": round(base.sent / base.elapsed),
            "ratio": round((run.sent / run.elapsed) / (base.sent / base.elapsed), 4),
            "daemon_s": round(run.elapsed, 3),
            "baseline_s": round(base.elapsed, 3),
        }
    return out


def bench_durable(root: Path, size: dict[str, Any]) -> dict[str, Any]:
    """b. crashes with 1 KiB inputs: flat out, then paced at the target with latencies."""
    out: dict[str, Any] = {"load": h.load_now(), "clients": CLIENTS, "input_bytes": 1024}
    bounds = {"duration": size["crash_s"], "max_seconds": size["crash_s"] + ACK_WAIT_S}
    run, _status, _ = _daemon_load(root, "crash-max", ["crash"] * CLIENTS, size["crash_cap"],
                                   window=CRASH_WINDOW, latency=True, **bounds)  # fmt: skip
    lat = list(run.latencies)
    out["max"] = {
        "events": run.sent,
        "per_s": round(run.sent / run.elapsed),
        "p50_ms": round(_pct(lat, 0.5) * 1e3, 2),
        "p99_ms": round(_pct(lat, 0.99) * 1e3, 2),
        "window_per_client": CRASH_WINDOW,
    }
    # At the target rate, then at 80% of what the daemon just managed (issue 13's bar: p99 at
    # 80% of saturation; the latency there is the group commit's own more than the queue's).
    offered = (("paced", TARGETS["crashes_per_s"]), ("at_80pct", out["max"]["per_s"] * 4 // 5))
    for name, total_rate in offered:
        rate = max(total_rate, CLIENTS) / CLIENTS
        count = min(size["crash_cap"], int(rate * size["crash_s"]) + 1)
        run, _status, _ = _daemon_load(root, f"crash-{name}", ["crash"] * CLIENTS, count,
                                       window=CRASH_WINDOW, rate=rate, latency=True,
                                       **bounds)  # fmt: skip
        lat = list(run.latencies)
        out[name] = {
            "offered_per_s": round(rate * CLIENTS),
            "events": run.sent,
            "achieved_per_s": round(run.sent / run.elapsed),
            "p50_ms": round(_pct(lat, 0.5) * 1e3, 2),
            "p99_ms": round(_pct(lat, 0.99) * 1e3, 2),
            "max_ms": round(max(lat) * 1e3, 2) if lat else None,
        }
    return out


def _master_counts(url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{url}/_dev/stats", timeout=30) as resp:  # 127.0.0.1 only
        counts: dict[str, int] = json.load(resp)["counts"]
    return counts


def bench_e2e(root: Path, size: dict[str, Any], quick: bool) -> dict[str, Any]:
    """c. results/s delivered to the reference master (its own process), batch vs item.

    The spool is filled first by a local-mode daemon (so crash-input fsyncs on ingest do not
    bound the figure), then a daemon on the same data directory delivers it to a fresh master:
    timed from that daemon answering ``status`` to the last result delivered.
    """
    out: dict[str, Any] = {"load": h.load_now(), "clients": CLIENTS, "mix": "results"}
    for mode in ("batch", "item"):
        count = size[f"e2e_{mode}"]
        name = f"e2e-{mode}"
        mixes = ["results"] * CLIENTS
        run, _status, _rss = _daemon_load(root, name, mixes, count, max_seconds=ACK_WAIT_S)
        sent = _sent_by_kind(run)
        master, url = h.start_master(root / f"master-{mode}")
        try:
            flags = ["--master", url, "--bot-id", "bench", "--delivery-mode", mode,
                     "--flush-interval", "0.2"]  # fmt: skip
            daemon = h.start_daemon(root, name, flags, reuse=True)
            t0 = time.monotonic()
            try:
                deadline = t0 + (30 if quick else 120)
                delivered, durable = 0, sum(sent[k] for k in DURABLE)
                while time.monotonic() < deadline:
                    status = daemon.status()
                    delivered = sum(_delivered(status, k) for k in sent)
                    # Durable kinds arrive one for one; coverage may have been coalesced on
                    # ingest: done when every durable result is delivered and the spool is empty.
                    if (
                        sum(_delivered(status, k) for k in DURABLE) >= durable
                        and status["spool"]["events"] == 0
                    ):
                        break
                    time.sleep(0.05)
                t_done = time.monotonic()
                counts = _master_counts(url)
            finally:
                daemon.stop()
        finally:
            h.stop_proc(master)
        lost = {k: (n, counts.get(k, 0)) for k, n in sent.items() if k in DURABLE and
                counts.get(k, 0) != n}  # fmt: skip
        if (
            lost
            or status["spool"]["events"]
            or not 0 < counts.get("coverage", 0) <= sent["coverage"]
        ):
            raise h.BenchError(f"e2e {mode}: sent {dict(sent)}, daemon delivered {delivered}, "
                               f"master has {counts}, spool still holds "
                               f"{status['spool']['events']}")  # fmt: skip
        out[mode] = {
            "sent": dict(sent),
            "results": delivered,
            "at_master": {k: counts.get(k, 0) for k in sent},
            "per_s": round(delivered / (t_done - t0)),
            "seconds": round(t_done - t0, 3),
        }
    out["batch_size"] = 100
    out["senders"] = 4
    return out


def bench_memory(root: Path, size: dict[str, Any]) -> dict[str, Any]:
    """d. peak RSS while events arrive with the master down; durable kinds all in the spool."""
    out: dict[str, Any] = {"load": h.load_now(), "clients": CLIENTS}
    mixes = ["stats"] * (CLIENTS // 2) + ["corpus"] * (CLIENTS // 2)
    count = size["memory_total"] // CLIENTS
    closed = h.free_port()
    flags = ["--master", f"http://127.0.0.1:{closed}", "--bot-id", "bench",
             "--drain-deadline", "0"]  # fmt: skip
    daemon = h.start_daemon(root, "memory", flags)
    try:
        rss_start = daemon.vmhwm_kib()
        run = h.run_clients(daemon.socket_path, root / "memory-clients", mixes, count,
                            max_seconds=3 * ACK_WAIT_S)  # fmt: skip
        run.check_complete("memory")
        status = daemon.status()
        sent = _sent_by_kind(run)
        _check_durable(status, sent, "memory")
        rss = daemon.vmhwm_kib()
    finally:
        daemon.stop()
    spooled = _spooled(status)
    out.update(
        events=run.sent,
        sent_by_kind=dict(sent),
        spooled_by_kind={k: spooled.get(k, 0) for k in sent},
        received=_received(status),
        peak_rss_mb=round(rss / 1024, 1),
        rss_at_start_mb=round(rss_start / 1024, 1),
        per_s=round(run.sent / run.elapsed),
    )
    return out


def bench_profile(root: Path, size: dict[str, Any]) -> dict[str, Any]:
    """e. py-spy's view of the daemon under stats ingest and under durable crash load."""
    spy = Path(h.PY).parent / "py-spy"
    if not spy.exists() and not shutil.which("py-spy"):
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    out: dict[str, Any] = {"load": h.load_now(), "rate_hz": 250}
    caps = {"stats": size["ingest_cap"], "crash": size["crash_cap"]}
    windows = {"stats": 4096, "crash": CRASH_WINDOW}
    for name, mix in (("ingest_stats", "stats"), ("durable_crash", "crash")):
        raw = root / f"profile-{name}.txt"
        daemon = h.start_daemon(root, f"profile-{name}", profile=raw)
        try:
            run = h.run_clients(daemon.socket_path, root / f"profile-{name}-clients",
                                [mix] * CLIENTS, caps[mix], window=windows[mix],
                                duration=size["profile_s"],
                                max_seconds=size["profile_s"] + ACK_WAIT_S)  # fmt: skip
            run.check_complete(f"profile {name}")
        finally:
            daemon.stop()
        out[name] = {"events": run.sent, "per_s_under_profiler": round(run.sent / run.elapsed)}
        out[name].update(top_frames(raw.read_text()))
    # End to end: 16 producers' crash() delivered to a master at the real one's cost.
    raw = root / "profile-e2e.txt"
    e2e_size = {"cap": size["crash_cap"]}
    run_e2e = end_to_end(root, "profile-e2e", REAL_MASTER_COST, e2e_size, 16,
                             seconds=size["profile_s"], profile=raw)  # fmt: skip
    out["e2e_crash"] = {"events": run_e2e["crashes"], "per_s_under_profiler": run_e2e["per_s"]}
    out["e2e_crash"].update(top_frames(raw.read_text()))
    return out


def _table(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    ing = results.get("ingest", {})
    for mix in ("stats", "crashmix"):
        if mix in ing:
            r = ing[mix]
            target = f">= {TARGETS['ingest_vs_baseline']:.0%} of baseline" if mix == "stats" else ""
            rows.append((f"a. ingest {mix} ({r['frame_bytes']:.0f} B frames), events/s",
                         f"{r['daemon_per_s']:,}", f"baseline {r['baseline_per_s']:,} "
                         f"({r['ratio']:.1%})", target))  # fmt: skip
    dur = results.get("durable", {})
    if "max" in dur:
        r = dur["max"]
        rows.append(("b. crashes 1 KiB flat out, /s", f"{r['per_s']:,}",
                     f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms",
                     f">= {TARGETS['crashes_per_s']:,}/s"))  # fmt: skip
        for name in ("paced", "at_80pct"):
            r = dur[name]
            rows.append((f"b. crashes offered at {r['offered_per_s']:,}/s: achieved",
                         f"{r['achieved_per_s']:,}/s",
                         f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms",
                         f"p99 <= {TARGETS['crash_p99_ms']} ms"))  # fmt: skip
    e2e = results.get("e2e", {})
    for mode in ("batch", "item"):
        if mode in e2e:
            r = e2e[mode]
            rows.append((f"c. end to end, {mode} mode, results/s", f"{r['per_s']:,}",
                         f"{r['results']} results in {r['seconds']} s "
                         f"(sent {sum(r['sent'].values())})", ""))  # fmt: skip
    rows.extend(_table_issue13(results))
    mem = results.get("memory", {})
    if "peak_rss_mb" in mem:
        rows.append((f"d. peak RSS, {mem['events']:,} events, master down",
                     f"{mem['peak_rss_mb']} MB", f"spooled {mem['spooled_by_kind']}",
                     f"<= {TARGETS['peak_rss_mb']} MB"))  # fmt: skip
    pressure = results.get("pressure", {})
    for name in ("crash1m", "crash10m"):
        if name in pressure:
            r = pressure[name]
            rows.append((f"d. peak RSS under pressure, {r['connections']} x "
                         f"{r['crash_bytes'] // 1048576} MiB inputs, spool stalled",
                         f"{r['peak_rss_mib']} MiB",
                         f"memory_budget {r['memory_budget_mib']} MiB, sent {r['sent_mib']} MiB",
                         f"<= {r['bound_mib']} MiB"))  # fmt: skip
    return rows


def _table_issue13(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Rows of figures f to j."""
    rows: list[tuple[str, str, str, str]] = []
    lat = results.get("latency", {})
    for key, r in lat.items():
        if key.endswith("/s") and isinstance(r, dict):
            rows.append((f"f. one producer crash() at {key}, round trip",
                         f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms",
                         f"fsync p50 {lat['fsync']['p50_ms']} ms, p99 {lat['fsync']['p99_ms']} ms;"
                         f" commit p50 {lat['sqlite_commit']['p50_ms']} ms; no-disk round trip"
                         f" p50 {lat['ipc_stats_flush']['p50_ms']} ms",
                         f"p50 <= {TARGETS['crash_rtt_p50_ms']} ms, "
                         f"p99 <= {TARGETS['crash_rtt_p99_ms']} ms"))  # fmt: skip
    e2e = results.get("e2e_master", {})
    for label in ("full_speed", "real_cost"):
        if label in e2e:
            r = e2e[label]
            bar = f">= {TARGETS['e2e_vs_ceiling']}x" if label == "real_cost" else ""
            ceil = f"ceiling {r['ceiling']['per_s']:,} ({r['ratio']:.2f}x)"
            rows.append((f"g. e2e {r['producers']} producers, master {label.replace('_', ' ')}, "
                         "crashes/s", f"{r['per_s']:,} ({r['daemon_cpu_s_per_1000']} CPU s/1k)",
                         ceil, bar))  # fmt: skip
    st = results.get("storm", {})
    if "per_s" in st:
        rows.append(("h. storm 64 KiB traces+outputs, crashes/s",
                     f"{st['per_s']:,} (max body {st['max_body_bytes'] // 1024} KiB)",
                     f"ceiling {st['ceiling']['per_s']:,} ({st['ratio']:.2f}x, "
                     f"{st['ceiling']['per_batch']}/batch)",
                     "< 1 MiB; ceiling the limit"))  # fmt: skip
    fl = results.get("fleet", {})
    for name in ("batched", "unbatched"):
        if name in fl:
            r = fl[name]
            rows.append((f"i. fleet {r['bots']} bots, {name}, per bot at the master",
                         f"{r['requests_per_s_per_bot']} req/s, {r['rows_per_s_per_bot']} rows/s",
                         f"{r['events_per_s_per_bot']} events/s sent per bot "
                         f"(flush {fl['flush_s']} s)", ""))  # fmt: skip
    td = results.get("typed_decode", {})
    if "skipped" in td:
        rows.append(("j. stats frame typed decode (msgspec)", "skipped", td["skipped"], ""))
    if "msgspec_per_s" in td:
        rows.append(("j. stats frame typed decode (msgspec), /s", f"{td['msgspec_per_s']:,}",
                     f"msgpack.unpackb {td['unpackb_per_s']:,} ({td['ratio']:.2f}x); daemon "
                     f"parser {td['daemon_parser_per_s']:,}"
                     + (f", in runs {td['daemon_runs_per_s']:,}" if "daemon_runs_per_s" in td
                        else ""), ""))  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run every benchmark, print the table, write the JSON; exit 1 if anything broke."""
    p = argparse.ArgumentParser(description="pfcollector benchmarks")
    p.add_argument("--quick", action="store_true", help="small sizes (CI); no thresholds")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument(
        "--only",
        default=",".join(ALL),
        help=f"comma-separated subset of {','.join(ALL)}",
    )
    p.add_argument(
        "--src",
        type=Path,
        default=None,
        help="run the daemon from this source tree (its src/ on PYTHONPATH)",
    )
    p.add_argument(
        "--tmp",
        type=Path,
        default=None,
        help="where data directories go (default: the system temp dir)",
    )
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    size = SIZES[mode]
    if args.src is not None:
        h.DAEMON_ENV["PYTHONPATH"] = str((args.src / "src").resolve())
    root = Path(tempfile.mkdtemp(prefix="pfbench-", dir=args.tmp))
    report: dict[str, Any] = {
        "mode": mode,
        "command": " ".join(["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": h.machine_info(root),
        "daemon_src": str(args.src or "installed pfcollector"),
        "targets": TARGETS,
        "load_before": h.load_now(),
        "results": {},
    }
    benches = {
        "ingest": lambda: bench_ingest(root, size),
        "durable": lambda: bench_durable(root, size),
        "e2e": lambda: bench_e2e(root, size, args.quick),
        "memory": lambda: bench_memory(root, size),
        "pressure": lambda: bench_pressure(root, args.quick),
        "profile": lambda: bench_profile(root, size),
        "latency": lambda: bench_crash_latency(root, size["latency_rates"],
                                               size["latency_count"]),
        "e2e_master": lambda: bench_e2e_master(root, args.quick),
        "storm": lambda: bench_storm(root, args.quick),
        "fleet": lambda: bench_fleet(root, args.quick),
        "typed_decode": lambda: bench_typed_decode(args.quick),
    }  # fmt: skip
    failed = None
    t0 = time.monotonic()
    try:
        for name in args.only.split(","):
            started = time.monotonic()
            print(f"== {name} ...", flush=True)
            report["results"][name] = benches[name]()
            report["results"][name]["seconds"] = round(time.monotonic() - started, 1)
    except h.BenchError as exc:
        failed = str(exc)
        report["failed"] = failed
    finally:
        h.kill_all()
        shutil.rmtree(root, ignore_errors=True)
    report["load_after"] = h.load_now()
    report["seconds"] = round(time.monotonic() - t0, 1)
    rows = _table(report["results"])
    report["table"] = [dict(zip(("figure", "measured", "beside", "target"), r, strict=True))
                       for r in rows]  # fmt: skip
    widths = [max(len(r[i]) for r in [("figure", "measured", "beside", "target"), *rows])
              for i in range(4)]  # fmt: skip
    for r in [("figure", "measured", "beside", "target"), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    prof = report["results"].get("profile", {})
    for name in ("ingest_stats", "durable_crash", "e2e_crash"):
        if name in prof:
            print(f"-- profile {name}: top self frames")
            for frame, share in prof[name]["self"][:8]:
                print(f"   {share:6.1%}  {frame}")
    if "skipped" in prof:
        print(f"-- profile skipped: {prof['skipped']}")
    print(f"load: before {report['load_before']['uptime']}; after {report['load_after']['uptime']}")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    if failed:
        print(f"BENCHMARK FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
