"""Opening the spool file at start and checking it from outside: corruption is moved aside.

:func:`open_spool` is how the daemon opens its spool (checked, a corrupt one replaced);
:func:`check_spool` is ``pfcollector check``'s read-only report, safe beside a running daemon.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from .spool import Spool, SpoolCorrupt

__all__ = ["check_spool", "open_spool"]

log = logging.getLogger(__name__)


def open_spool(path: Path, max_bytes: int) -> Spool:
    """Open the daemon's spool, checked; a corrupt one is moved aside for a fresh one.

    SQLite's ``quick_check`` runs at every start (it reads the whole file: seconds for a
    spool of gigabytes). A database that fails it, or cannot be opened at all, is renamed with
    its WAL to ``<name>.corrupt-<time>`` (kept for ``sqlite3 .recover`` by an operator) and
    the daemon starts on an empty spool: refusing to start would lose every event from now on.
    """
    try:
        spool = Spool(path, max_bytes=max_bytes)
        problem = spool.check()
        if problem == "ok":
            return spool
        spool._db.close()
    except SpoolCorrupt as exc:
        problem = str(exc)
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        source = path.with_name(path.name + suffix)
        if source.exists():
            source.rename(aside.with_name(aside.name + suffix))
    log.error("spool %s is corrupt (%s): moved aside to %s; starting on a fresh spool",
              path, problem, aside)  # fmt: skip
    return Spool(path, max_bytes=max_bytes)


def check_spool(path: Path) -> dict[str, Any]:
    """Report on a spool without changing it (safe beside a running daemon).

    Returns ``{"path", "exists", "ok", "integrity", "file_bytes", "kinds": {kind: {"events",
    "bytes", "oldest_received_ns"}}, "dead_letters": {kind: n}}``; ``ok`` is False when the
    file cannot be read or SQLite's ``quick_check`` finds a problem (named in ``integrity``).
    """
    report: dict[str, Any] = {"path": str(path), "exists": path.exists(), "ok": False}
    if not path.exists():
        report["integrity"] = "no spool file (the daemon has not run with this data directory)"
        return report
    report["file_bytes"] = sum(
        p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists()
    )
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            integrity = "; ".join(str(r[0]) for r in db.execute("PRAGMA quick_check(20)"))
            kinds = db.execute(
                "SELECT kind, COUNT(*), COALESCE(SUM(size), 0), MIN(received_ns) "
                "FROM events GROUP BY kind"
            ).fetchall()
            dead = db.execute("SELECT kind, COUNT(*) FROM dead_letters GROUP BY kind").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        report["integrity"] = f"cannot be read: {exc}"
        return report
    report["integrity"] = integrity
    report["ok"] = integrity == "ok"
    report["kinds"] = {
        kind: {"events": n, "bytes": b, "oldest_received_ns": oldest}
        for kind, n, b, oldest in kinds
    }
    report["dead_letters"] = dict(dead)
    return report
