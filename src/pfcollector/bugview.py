"""``pfcollector bugs``: the crash buckets of each job, and the bug table of ``status``.

Reads the spool file read-only (like ``spool check``), so it works beside a running daemon and
without one. The same table, limited to the top bugs per job, is part of ``pfcollector status``
(``policies.crash.top_bugs`` in ``--json``).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from .textsafe import printable

__all__ = ["bugs_command", "format_bugs", "register_bugs"]


def format_bugs(rows: Sequence[Mapping[str, Any]], *, now_ns: int | None = None) -> list[str]:
    """A table of bugs: job, bug id, hits, first and last seen, crash type, top frames."""
    if not rows:
        return []
    now = time.time_ns() if now_ns is None else now_ns
    lines = [f"{'job':<16} {'bug':<12} {'hits':>7} {'first':>8} {'last':>8}  type / frames"]
    for row in rows:
        frames = row["signature"].split("\n")[1:]
        lines.append(
            f"{_cut(row['job_id'], 16):<16} {row['bug']:<12} {row['hits']:>7} "
            f"{_ago(now, row['first_ns']):>8} {_ago(now, row['last_ns']):>8}  {row['type']}"
            + (f"  in {' < '.join(frames)}" if frames else "")
        )
    return [printable(line) for line in lines]  # types and frames are the target's text


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _ago(now_ns: int, then_ns: int) -> str:
    seconds = max(0, now_ns - then_ns) / 1e9
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def bugs_command(
    job: Annotated[str | None, typer.Option("--job", help="Only this job's bugs")] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Data directory [default: as serve: $PFCOLLECTOR_DATA_DIR, ...]"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Most bugs listed, most hit first")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """List the bugs crashes were bucketed into (crash_dedupe = bug): signature, type, first
    id sent, hits, first and last seen. Read-only; safe while the daemon runs."""
    from .bugs import read_bugs
    from .config import ConfigError, default_data_dir, load

    try:  # the data directory as serve resolves it: flag, env, settings file, default
        resolved = load({"data_dir": data_dir}).config.data_dir
    except ConfigError:
        resolved = data_dir or default_data_dir()
    spool = resolved / "spool.db"
    if not spool.exists():
        typer.echo(f"error: no spool at {spool} (the daemon has not run with this data dir)",
                   err=True)  # fmt: skip
        raise typer.Exit(1)
    try:
        rows = read_bugs(spool, job, limit)
    except sqlite3.Error as exc:
        typer.echo(f"error: cannot read {spool}: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    if not rows:
        scope = f"job {job!r}" if job else "any job"
        typer.echo(f"no bugs recorded for {scope} in {spool}")
        return
    typer.echo("\n".join(format_bugs(rows)))
    typer.echo("\nfull signatures and first ids: pfcollector bugs --json")


def register_bugs(app: typer.Typer) -> None:
    """Add ``bugs`` to the ``pfcollector`` app."""
    app.command("bugs")(bugs_command)
