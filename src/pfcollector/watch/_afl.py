"""Follow an AFL++ output directory: crashes, new queue entries, ``fuzzer_stats``.

Every instance under the output directory is followed (``-M``/``-S`` instances, and the
single-instance ``default``): ``<out>/<instance>/{crashes,queue,fuzzer_stats}``. AFL++ numbers
the files of each directory in order (``id:000000,...``), so the state per directory is the
next number to send plus the directory's identity (``dev:inode``: a resumed AFL++ renames the
old ``crashes`` away and starts again at ``id:000000`` in a new one). Files younger than
``settle`` seconds are left for the next scan: AFL++ writes them in place.

Resource handling:
    A scan reads only what is new; crash inputs are read whole (at most 10 MiB + 1 byte).

Error handling:
    The daemon being away propagates from :class:`Sink` and the state is not advanced past
    what was acknowledged. A file that vanishes mid-scan is skipped.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal as _signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..events import CRASH_INPUT_MAX, INT64_MAX, INT64_MIN, SIGNAL_MAX
from ._files import DirWaiter, SafeTree
from ._reproduce import Reproducer
from ._sink import Sink, stable_id
from ._state import StateFile

__all__ = [
    "AflWatcher",
    "coverage_fields",
    "crash_fields",
    "find_instances",
    "parse_crash_name",
    "parse_fuzzer_stats",
    "signal_type",
    "stats_fields",
]

log = logging.getLogger("pfcollector.watch.afl")
_ID = re.compile(r"^id:(\d+)")
_SIG = re.compile(r"(?:^|,)sig:(\d+)(?:,|$)")
_FILES_PER_EVENT = 1024  # the protocol's limit for a corpus event's ``files``
_STATS_MAX = 1024 * 1024  # a fuzzer_stats file is a few KiB


def parse_crash_name(name: str) -> tuple[int, int] | None:
    """``(id number, signal)`` of an AFL++ crash file name, or None if it is not one.

    >>> parse_crash_name("id:000003,sig:11,src:000001,time:532,execs:2646,op:havoc,rep:2")
    (3, 11)
    """
    m = _ID.match(name)
    if m is None:
        return None
    sig = _SIG.search(name)
    return int(m.group(1)), int(sig.group(1)) if sig else 0


def crash_fields(instance: str, file_name: str, signum: int, data: bytes) -> dict[str, Any]:
    """The crash event's fields for an AFL++ crash file.

    The file name is the fuzzer's (a custom mutator or a renamed file can say ``sig:999``):
    a number that is no signal is not sent as one, since the daemon would refuse the crash;
    the type and ``signal`` fall back to ``crash`` and 0, and the output keeps the name.
    """
    valid = 0 <= signum <= SIGNAL_MAX
    return {
        "type": signal_type(signum) if valid else "crash",
        "signal": signum if valid else 0,
        "input": data,
        "output": f"AFL++ {instance}/crashes/{file_name}",
    }


def signal_type(signum: int) -> str:
    """The crash type for a signal number: ``"SIGSEGV"`` for 11, ``"SIG77"`` if unknown."""
    if signum <= 0:
        return "crash"
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


def parse_fuzzer_stats(text: str) -> dict[str, str]:
    """``key : value`` lines of a ``fuzzer_stats`` file as a dict of strings."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _num(raw: dict[str, str], *keys: str) -> float | None:
    """The first of ``keys`` holding a finite number, or None: AFL++ writes ``inf`` and
    ``nan`` (``execs_per_sec`` at its start), which the daemon rightly refuses."""
    for key in keys:
        value = raw.get(key, "").rstrip("%").strip()
        if value:
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                return number
    return None


def _int(raw: dict[str, str], *keys: str, scale: float = 1) -> int | None:
    number = _num(raw, *keys)
    if number is None:
        return None
    value = int(number * scale)
    return value if INT64_MIN <= value <= INT64_MAX else None


def stats_fields(raw: dict[str, str]) -> dict[str, Any]:
    """The ``stats`` event fields for a parsed ``fuzzer_stats`` (AFL++ 4 and older names).

    A value that is missing, unparsable, not finite or out of range is left out (the daemon
    then takes the field's default, 0), never sent as it is.
    """
    unique = _int(raw, "saved_crashes", "unique_crashes")
    total = _int(raw, "total_crashes")
    fields = {
        "executions": _int(raw, "execs_done"),
        "exec_per_second": _num(raw, "execs_per_sec"),
        "total_edges": _int(raw, "total_edges"),
        "covered_edges": _int(raw, "edges_found"),
        "coverage_percent": _num(raw, "bitmap_cvg"),
        "unique_crashes": unique,
        "total_crashes": max(unique or 0, total or 0) if unique is not None or total is not None
        else None,
        "corpus_size": _int(raw, "corpus_count", "paths_total"),
        "memory_usage": _int(raw, "peak_rss_mb", scale=1024 * 1024),  # bytes
    }
    return {k: v for k, v in fields.items() if v is not None}


def coverage_fields(raw: dict[str, str], previous_edges: int) -> dict[str, Any]:
    """The ``coverage`` event fields: edges, growth since ``previous_edges``, executions."""
    edges = _int(raw, "edges_found") or 0
    return {"edges": edges, "new_edges": max(0, edges - previous_edges),
            "exec_count": _int(raw, "execs_done") or 0}  # fmt: skip


def find_instances(output_dir: Path) -> list[tuple[str, Path]]:
    """``(name, directory)`` of every AFL++ instance under ``output_dir``, sorted by name.

    ``output_dir`` itself counts as an instance (named after it) when it holds ``queue`` or
    ``fuzzer_stats`` directly (AFL before ``default/``). Symlinks below ``output_dir`` are
    never followed: a symlinked instance, ``queue`` or ``crashes`` is not one.
    """

    def is_instance(d: Path) -> bool:
        return _real_dir(d / "queue") or _real_dir(d / "crashes") or _real_file(d / "fuzzer_stats")

    if is_instance(output_dir):
        return [(output_dir.resolve().name, output_dir)]
    try:
        with os.scandir(output_dir) as it:
            subdirs = sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [(name, output_dir / name) for name in subdirs if is_instance(output_dir / name)]


def _real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.lstat().st_mode)
    except OSError:
        return False


def _real_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class _Entry:
    number: int
    name: str
    size: int


def _new_entries(tree: SafeTree, parts: tuple[str, ...], cursor: dict[str, Any],
                 settle: float) -> list[_Entry]:  # fmt: skip
    """Settled ``id:*`` regular files of ``parts`` numbered at least ``cursor["next"]``, in
    order; resets the cursor when the directory is not the one it was made for."""
    with tree.directory(*parts) as fd:
        if fd is None:
            return []
        st = os.fstat(fd)
        identity = f"{st.st_dev}:{st.st_ino}"
        if cursor.get("dir") != identity:
            cursor.clear()
            cursor.update({"dir": identity, "next": 0})
        found: list[tuple[int, str, os.stat_result]] = []
        where = "/".join(parts)
        with os.scandir(fd) as it:
            for entry in it:
                m = _ID.match(entry.name)
                if m is None or int(m.group(1)) < cursor["next"]:
                    continue
                try:
                    est = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(est.st_mode):
                    tree.refuse(f"{tree.root}/{where}/{entry.name}", "not a regular file")
                    continue
                found.append((int(m.group(1)), entry.name, est))
    out: list[_Entry] = []
    now = time.time()
    for number, name, est in sorted(found, key=lambda f: f[0]):
        if now - est.st_mtime < settle:
            break  # still being written (or the next one is): keep the order, try again later
        out.append(_Entry(number, name, est.st_size))
    return out


class AflWatcher:
    """One pass of :meth:`scan` sends everything new under ``output_dir`` and commits state."""

    def __init__(self, output_dir: Path, sink: Sink, state: StateFile, settle: float = 1.0,
                 reproducer: Reproducer | None = None) -> None:  # fmt: skip
        self.output_dir = output_dir
        self.reproducer = reproducer
        self.sink = sink
        self.state = state
        self.settle = settle
        self._where = str(output_dir.resolve())
        self.tree = SafeTree(output_dir)
        self.waiter = DirWaiter(output_dir, "AFL++ output directory")

    def scan(self) -> int:
        """Send what is new in every instance; return how many events were sent."""
        instances: dict[str, Any] = self.state.data.setdefault("instances", {})
        sent = 0
        if not self.waiter.ready():
            return 0
        for name, directory in find_instances(self.output_dir):
            inst = instances.setdefault(name, {})
            try:
                sent += self._scan_instance(name, directory, inst)
            finally:
                self.state.save()
        return sent

    def _scan_instance(self, name: str, directory: Path, inst: dict[str, Any]) -> int:
        fuzzer, sent = f"afl++/{name}", 0
        base = () if directory == self.output_dir else (directory.name,)
        crashes = inst.setdefault("crashes", {})
        for entry in _new_entries(self.tree, (*base, "crashes"), crashes, self.settle):
            parsed = parse_crash_name(entry.name)
            assert parsed is not None
            data = self._read((*base, "crashes"), entry.name, CRASH_INPUT_MAX)
            if data is None:  # refused (logged once) or gone: never sent, not waited for
                crashes["next"] = entry.number + 1
                continue
            event_id = stable_id("afl", self._where, self.sink.job_id, name, entry.name)
            fields = crash_fields(name, entry.name, parsed[1], data)
            if self.reproducer is not None:  # --reproduce: the target's report (_reproduce.py)
                found = self.reproducer.run(directory, directory / "crashes" / entry.name, data)
                fields["output"] = f"{fields['output']}\n{found['output']}"
                fields["stack_trace"] = found["stack_trace"]
            self.sink.send(fuzzer, "crash", fields, event_id)  # durable: daemon or outbox
            crashes["next"] = entry.number + 1
            sent += 1
            log.info("crash %s/crashes/%s sent as %s", name, entry.name, event_id)

        queue = inst.setdefault("queue", {})
        new_queue = _new_entries(self.tree, (*base, "queue"), queue, self.settle)
        for start in range(0, len(new_queue), _FILES_PER_EVENT):
            chunk = new_queue[start : start + _FILES_PER_EVENT]
            files = [f"{name}/queue/{e.name}" for e in chunk]
            event_id = stable_id("aflq", self._where, self.sink.job_id, *files)
            self.sink.send(fuzzer, "corpus",
                           {"files": files, "total_size": sum(e.size for e in chunk)},
                           event_id)  # fmt: skip
            sent += 1

        pending: dict[str, Any] = {}
        text = self._read(base, "fuzzer_stats", _STATS_MAX)
        raw = parse_fuzzer_stats(text.decode(errors="replace")) if text is not None else {}
        if raw and raw.get("last_update") != inst.get("stats_update"):
            self.sink.send(fuzzer, "stats", stats_fields(raw))
            pending["stats_update"] = raw.get("last_update")
            sent += 1
        if _int(raw, "edges_found") is not None and _int(raw, "edges_found") != inst.get("edges"):
            cov = coverage_fields(raw, int(inst.get("edges", 0)))
            self.sink.send(fuzzer, "coverage", cov)
            pending["edges"] = cov["edges"]
            sent += 1

        self.sink.flush()
        if new_queue:
            queue["next"] = new_queue[-1].number + 1
        inst.update(pending)
        return sent

    def _read(self, parts: tuple[str, ...], name: str, limit: int) -> bytes | None:
        with self.tree.directory(*parts) as fd:
            if fd is None:
                return None
            return self.tree.read(fd, name, limit, str(self.output_dir.joinpath(*parts, name)))
