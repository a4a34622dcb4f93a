"""The human views of a status reply: ``pfcollector status`` and ``status --watch``.

Plain functions of the ``status --json`` document (docs/status.md), so they are tested without
a daemon. Every text in the document may come from outside (the master's error text, a
client's job and fuzzer names): :func:`printable` escapes what a terminal would act on before
anything is shown (``--json`` is safe as it is: JSON escapes every control character and, with
ASCII output, every non-ASCII one).
"""

from __future__ import annotations

import time
from typing import Any

from .bugview import format_bugs
from .textsafe import printable, printable_tree

__all__ = [
    "ALERT_KINDS",
    "format_bytes",
    "format_status",
    "format_watch",
    "printable",
    "printable_tree",
    "refusal_lines",
]

#: Kinds whose refusal is an alert: results the master would lose.
ALERT_KINDS = ("crash", "corpus")


def format_status(s: dict[str, Any]) -> str:
    """The human view of a status reply: a few readable tables."""
    top_bugs = (s.get("policies") or {}).get("crash", {}).get("top_bugs")  # none: scoped
    s = printable_tree(s)
    cfg, conns, spool = s["config"], s["connections"], s["spool"]
    where = "local mode (no master)" if s["mode"] == "local" else f"master {cfg['master_url']}"
    lines = [
        f"pfcollector {s['version']}  pid {s['pid']}  up {s['uptime_s']:.0f}s  {where}",
        f"connections: {conns['current']} now, {conns['total']} total (max {conns['max']})",
        f"queue: {s['queue']['depth']}/{s['queue']['capacity']}   "
        f"spool: {spool['events']} events, {format_bytes(spool['bytes'])} of "
        f"{format_bytes(spool['max_bytes'])}  ({spool['path']})",
        f"batch size {cfg['batch_size']}, flush every {cfg['flush_interval']}s, "
        f"data dir {cfg['data_dir']}",
        *_drain_lines(s.get("drain")),
        *_input_writer_lines(spool),
        _outbox_line(s.get("outbox")),
        "",
        f"{'':<9}{'---- since start ----':^30}{'-------- now --------':^26}"
        f"{'-- since the spool was created --':^29}",
        f"{'kind':<9}{'received':>10}{'accepted':>10}{'refused':>10}{'spooled':>10}"
        f"{'oldest':>9}{'dead':>7}{'delivered':>11}{'retried':>9}{'dropped':>9}",
    ]
    for kind, ev in s["events"].items():
        sp = spool["kinds"].get(kind, {})
        age = sp.get("oldest_age_s")
        lines.append(
            f"{kind:<9}{ev['received']:>10}{ev['accepted']:>10}{_refused(ev):>10}"
            f"{sp.get('spooled', 0):>10}{'-' if age is None else f'{age:.0f}s':>9}"
            f"{sp.get('dead_letters', 0):>7}{sp.get('delivered', 0):>11}"
            f"{sp.get('retried', 0):>9}{sp.get('dropped', 0):>9}"
        )
    lines += refusal_lines(s)
    delivery = s.get("delivery")
    if delivery:
        br, snd = delivery["breaker"], delivery["sender"]
        lines += ["", f"bot {delivery['bot_id']} ({delivery['mode']} mode), breaker {br['state']}"]
        lines.append(f"last success: {_when(snd['last_success']['wall'])}")
        err = snd["last_error"]
        lines.append(f"last error:   {_when(err['wall'])}  {err['text'] or ''}".rstrip())
    if top_bugs:  # the most hit bugs of each job (bugview.py escapes its own lines)
        lines += ["", *format_bugs(top_bugs)]
    if conns["live"]:
        lines += ["", f"{'conn':>5} {'pid':>8} {'uid':>6}  {'events':>8}  job / fuzzer"]
        for c in conns["live"]:
            lines.append(
                f"{c['id']:>5} {c['pid']:>8} {c['uid']:>6}  {c['events']:>8}  "
                # No hello: a control connection (this very status request, for one).
                + (f"{c['job_id']} / {c['fuzzer']}" if c["job_id"] else "(control)")
            )
    return "\n".join(lines)


def _drain_lines(drain: dict[str, Any] | None) -> list[str]:
    """What a stopping daemon still has to do (nothing when it is not stopping)."""
    if not drain:
        return []
    left = drain.get("deadline_in_s")
    line = f"DRAINING ({drain['phase']}): {drain['events_left']} event(s) left to deliver"
    if left is not None:
        line += f", deadline in {left:.0f}s"
    if drain.get("ended"):
        line += f"; ended early: {drain['ended']} (the rest stays in the spool)"
    return [line]


def _input_writer_lines(spool: dict[str, Any]) -> list[str]:
    """A line only when the crash input files' writer is not as it should be."""
    writer = spool.get("input_writer")
    pending = spool.get("inputs_pending") or 0
    if not writer:
        return []
    if writer.get("in_thread"):
        state = "written by a worker thread (the input writer process failed to start)"
    elif writer.get("starts", 1) > 1:
        state = f"input writer process started {writer['starts']} times (see the log)"
    else:
        return []
    return [f"input files: {state}; {pending} input(s) waiting in the spool"]


def _outbox_line(outbox: dict[str, Any] | None) -> str:
    if not outbox:
        return "outbox: disabled"
    return (f"outbox: {outbox['imported']} imported, {outbox['rejected']} rejected "
            f"({outbox['path']})")  # fmt: skip


def _refused(ev: dict[str, Any]) -> int:
    return sum(ev.get("refused", {}).values()) if "refused" in ev else int(ev.get("rejected", 0))


def refusal_lines(s: dict[str, Any]) -> list[str]:
    """Refusals since start by kind and code, and an alert line per refused crash/corpus kind.

    A refused crash or corpus event is a result the master will not get unless the fuzzer
    sends it again: the one thing in this view to act on at once.
    """
    lines: list[str] = []
    refused = {k: ev.get("refused") or {} for k, ev in s["events"].items()}
    for kind in ALERT_KINDS:
        codes = refused.get(kind, {})
        if codes:
            detail = ", ".join(f"{code} {n}" for code, n in sorted(codes.items()))
            lines.append(
                f"!! ALERT: {sum(codes.values())} {kind} event(s) refused since start ({detail}): "
                "lost unless sent again"
            )
    detail = "; ".join(
        f"{kind} " + ", ".join(f"{code} {n}" for code, n in sorted(codes.items()))
        for kind, codes in refused.items()
        if codes
    )
    if detail:
        lines.append(f"refused since start: {detail}")
    return ["", *lines] if lines else []


def _when(wall: float | None) -> str:
    if wall is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))
    return f"{stamp} ({max(0.0, time.time() - wall):.0f}s ago)"


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def format_watch(
    prev: dict[str, Any] | None, cur: dict[str, Any], problem: str | None = None
) -> str:
    """One frame of ``status --watch``: per-kind rates since ``prev``, spool, breaker, errors.

    Rates are counter deltas over the daemon's own uptime delta (blank on the first frame).
    """
    cur = printable_tree(cur)
    problem = printable(problem) if problem else problem
    dt = cur["uptime_s"] - prev["uptime_s"] if prev is not None else 0.0
    spool, conns = cur["spool"], cur["connections"]
    where = "local mode" if cur["mode"] == "local" else f"master {cur['config']['master_url']}"
    lines = [
        f"pfcollector {cur['version']}  pid {cur['pid']}  up {_duration(cur['uptime_s'])}  "
        f"{where}  {time.strftime('%H:%M:%S')}",
        *_drain_lines(cur.get("drain")),
        "",
        f"{'kind':<10}{'in/s':>9}{'out/s':>9}{'spooled':>10}{'oldest':>9}{'dead':>7}"
        f"{'dropped':>9}{'received':>11}",
    ]

    def rate(new: float, old: float) -> str:
        return f"{max(0.0, new - old) / dt:.1f}" if dt > 0 else "-"

    for kind, ev in cur["events"].items():
        sp = spool["kinds"].get(kind, {})
        old_ev = prev["events"].get(kind, {}) if prev else {}
        old_sp = prev["spool"]["kinds"].get(kind, {}) if prev else {}
        age = sp.get("oldest_age_s")
        lines.append(
            f"{kind:<10}{rate(ev['received'], old_ev.get('received', 0)):>9}"
            f"{rate(sp.get('delivered', 0), old_sp.get('delivered', 0)):>9}"
            f"{sp.get('spooled', 0):>10}{'-' if age is None else _duration(age):>9}"
            f"{sp.get('dead_letters', 0):>7}{sp.get('dropped', 0):>9}{ev['received']:>11}"
        )
    used = spool["bytes"] / spool["max_bytes"] * 100 if spool["max_bytes"] else 0.0
    lines += [
        "",
        f"spool  {spool['events']} events, {format_bytes(spool['bytes'])} of "
        f"{format_bytes(spool['max_bytes'])} ({used:.1f}%)   queue {cur['queue']['depth']}/"
        f"{cur['queue']['capacity']}   connections {conns['current']}",
    ]
    delivery = cur.get("delivery")
    if delivery:
        br, snd = delivery["breaker"], delivery["sender"]
        retry = f" (probe in {br['retry_in']:.0f}s)" if br.get("retry_in") is not None else ""
        lines.append(
            f"breaker {br['state'].upper()}{retry}   requests {snd['requests']}  "
            f"retries {snd['retries']}   last success {_when(snd['last_success']['wall'])}"
        )
        err = snd["last_error"]
        lines.append(f"last error  {_when(err['wall'])}  {err['text'] or ''}".rstrip())
    else:
        lines.append("breaker -  (local mode: nothing is sent)")
    lines += refusal_lines(cur)
    if problem:
        lines += ["", f"!! {problem}"]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
