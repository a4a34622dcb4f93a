"""Follow libFuzzer: artifacts become crashes, the log's status lines become stats and coverage.

Artifacts are the files libFuzzer writes to ``-artifact_prefix``: ``crash-<sha1>``,
``leak-<sha1>``, ``timeout-<sha1>``, ``oom-<sha1>``; the crash type is the prefix. The log is
libFuzzer's stderr redirected to a file; its status lines look like
``#12345  NEW    cov: 120 ft: 200 corp: 30/1234b lim: 4 exec/s: 5000 rss: 40Mb L: 3/3 MS: ...``
(also ``INITED``, ``REDUCE``, ``pulse``, ``DONE``, ``RELOAD``). A scan sends one stats event
and, when ``cov`` changed, one coverage event, from the last status line it read.

A crash's report is in the log too: libFuzzer prints the sanitizer's (or its own) report, then
``Test unit written to <prefix>crash-<sha1>``. The lines before that line, since the previous
status line or artifact, go with that artifact's crash: ``output`` (after the artifact's name)
and ``stack_trace`` (from the report's first line), which the daemon parses to bucket the crash
by bug. The log is read before the artifacts in each scan, so the report is there when its
artifact is sent; an artifact whose line never comes (another log, a killed fuzzer) is sent
without one.

State: the names of the artifacts sent (their names hold a content hash), the reports read and
not yet sent (at most :data:`REPORTS_KEPT`), and the log's identity and byte offset (only whole
lines are consumed; a truncated or replaced log is read again from its start).

Error handling:
    As for AFL++: the daemon being away propagates and nothing is committed that was not acked.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..events import CRASH_INPUT_MAX, INT64_MAX
from ._files import DirWaiter, SafeTree
from ._reproduce import ATTACHED_MAX, report_start
from ._sink import Sink, stable_id
from ._state import StateFile

__all__ = ["ARTIFACT_PREFIXES", "REPORTS_KEPT", "LibFuzzerWatcher", "StatusLine",
           "artifact_type", "parse_status_line"]  # fmt: skip

log = logging.getLogger("pfcollector.watch.libfuzzer")
ARTIFACT_PREFIXES = ("crash", "leak", "timeout", "oom")
_ARTIFACT = re.compile(r"^(crash|leak|timeout|oom)-[0-9A-Za-z]+$")
_STATUS = re.compile(r"^#(\d+)\s+([A-Za-z]+)\s+(.*)$")
_COV = re.compile(r"\bcov: (\d+)")
_FT = re.compile(r"\bft: (\d+)")
_CORP = re.compile(r"\bcorp: (\d+)/(\d+)(b|Kb|Mb)")
_EXECS = re.compile(r"\bexec/s: (\d+)")
_RSS = re.compile(r"\brss: (\d+)Mb")
_UNITS = {"b": 1, "Kb": 1024, "Mb": 1024 * 1024}
_LOG_CHUNK = 4 * 1024 * 1024  # at most this much log per scan
_LOG_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITTEN = re.compile(r"Test unit written to (\S+)")
#: Reports read from the log whose artifact was not sent yet, kept in the state at most.
REPORTS_KEPT = 16


def artifact_type(name: str) -> str | None:
    """``"crash"``, ``"leak"``, ``"timeout"`` or ``"oom"`` for an artifact name, else None."""
    m = _ARTIFACT.match(name)
    return m.group(1) if m else None


@dataclass(frozen=True, slots=True)
class StatusLine:
    """One parsed libFuzzer status line."""

    executions: int
    event: str  # NEW, pulse, DONE, INITED, REDUCE, RELOAD...
    cov: int | None
    features: int | None
    corpus_count: int | None
    corpus_bytes: int | None
    exec_per_second: int | None
    rss_mb: int | None


def parse_status_line(line: str) -> StatusLine | None:
    """Parse ``#N EVENT cov: .. ft: .. corp: n/size exec/s: .. rss: ..Mb``; None otherwise."""
    m = _STATUS.match(line.strip())
    if m is None:
        return None
    rest = m.group(3)

    def grab(rx: re.Pattern[str]) -> int | None:
        found = rx.search(rest)
        return _bounded(int(found.group(1))) if found else None

    corp = _CORP.search(rest)
    executions = _bounded(int(m.group(1)))
    if executions is None:
        return None
    return StatusLine(
        executions=executions,
        event=m.group(2),
        cov=grab(_COV),
        features=grab(_FT),
        corpus_count=_bounded(int(corp.group(1))) if corp else None,
        corpus_bytes=_bounded(int(corp.group(2)) * _UNITS[corp.group(3)]) if corp else None,
        exec_per_second=grab(_EXECS),
        rss_mb=grab(_RSS),
    )


def _bounded(value: int) -> int | None:
    """``value`` if it fits the daemon's int64 fields, else None (left out, not sent)."""
    return value if 0 <= value <= INT64_MAX else None


class LibFuzzerWatcher:
    """One pass of :meth:`scan` sends new artifacts and the log's latest status, then commits."""

    def __init__(self, artifact_dir: Path, sink: Sink, state: StateFile, log_path: Path | None,
                 fuzzer: str = "libfuzzer", settle: float = 1.0) -> None:  # fmt: skip
        self.artifact_dir = artifact_dir
        self.sink = sink
        self.state = state
        self.log_path = log_path
        self.fuzzer = fuzzer
        self.settle = settle
        self._where = str(artifact_dir.resolve())
        self.tree = SafeTree(artifact_dir)
        self.waiter = DirWaiter(artifact_dir, "libFuzzer artifact directory")
        self._lines: list[str] = []  # log lines since the last status line or artifact

    def scan(self) -> int:
        """Send what is new; return how many events were sent."""
        try:
            status = self._read_log()  # first: the reports of the artifacts below
            sent = self._artifacts() if self.waiter.ready() else 0
            return sent + self._send_status(status)
        finally:
            self.state.save()

    def _artifacts(self) -> int:
        done: list[str] = self.state.data.setdefault("artifacts", [])
        reports: dict[str, str] = self.state.data.setdefault("reports", {})
        seen, sent, now = set(done), 0, time.time()
        tree = self.tree
        with tree.directory() as fd:
            if fd is None:
                return 0
            for name in sorted(os.listdir(fd)):
                kind = artifact_type(name)
                if kind is None or name in seen:
                    continue
                where = str(self.artifact_dir / name)
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    tree.refuse(where, "a symlink or not a regular file")
                    continue
                if now - st.st_mtime < self.settle:
                    continue
                data = tree.read(fd, name, CRASH_INPUT_MAX, where)
                if data is None:
                    continue
                event_id = stable_id("lf", self._where, self.sink.job_id, name)
                fields = {"type": kind, "input": data, "output": f"libFuzzer artifact {name}"}
                report = reports.get(name)
                if report:  # the log's report of this artifact: the daemon buckets by it
                    fields["output"] = f"{fields['output']}\n{report}"[:ATTACHED_MAX]
                    start = report_start(report)
                    fields["stack_trace"] = report[start : start + ATTACHED_MAX]
                self.sink.send(self.fuzzer, "crash", fields, event_id)  # daemon or outbox
                done.append(name)
                seen.add(name)
                reports.pop(name, None)
                sent += 1
                log.info("artifact %s sent as %s", name, event_id)
        return sent

    def _read_log(self) -> tuple[StatusLine | None, int, list[str]] | None:
        """Read the log's new whole lines: keep the reports they hold, return the last status
        line, where the read ended and the lines a report may go on from (None when there is
        nothing new)."""
        if self.log_path is None:
            return None
        cursor: dict[str, Any] = self.state.data.setdefault("log", {})
        try:
            fd = os.open(self.log_path, _LOG_FLAGS)  # a FIFO or a symlink planted there: no
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.tree.refuse(str(self.log_path), exc.strerror or str(exc))
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                self.tree.refuse(str(self.log_path), "not a regular file")
                return None
            identity = f"{st.st_dev}:{st.st_ino}"
            if cursor.get("file") != identity or st.st_size < cursor.get("offset", 0):
                cursor.clear()
                cursor.update({"file": identity, "offset": 0, "cov": 0})
                self._lines = []
            f.seek(cursor["offset"])
            chunk = f.read(_LOG_CHUNK)
        end = chunk.rfind(b"\n") + 1
        if end == 0:
            return None
        last: StatusLine | None = None
        reports: dict[str, str] = self.state.data.setdefault("reports", {})
        lines = deque(self._lines)  # committed with the cursor (_send_status): a failed scan
        size = sum(map(len, lines))  # reads the same lines again, not twice
        for raw in chunk[:end].decode("utf-8", "replace").splitlines():
            parsed = parse_status_line(raw)
            if parsed is not None:
                lines.clear()  # a report never spans a status line
                size = 0
                if parsed.cov is not None:
                    last = parsed
                continue
            written = _WRITTEN.search(raw)
            if written is None:
                lines.append(raw)
                size += len(raw)
                while len(lines) > 1 and size > ATTACHED_MAX:
                    size -= len(lines.popleft())
                continue
            name = os.path.basename(written.group(1))
            text = "\n".join(lines).strip()
            lines.clear()
            size = 0
            if artifact_type(name) is not None and text:
                reports[name] = text[-ATTACHED_MAX:]
                while len(reports) > REPORTS_KEPT:
                    del reports[next(iter(reports))]
        return last, end, list(lines)

    def _send_status(self, read: tuple[StatusLine | None, int, list[str]] | None) -> int:
        """Stats (and coverage when it changed) from the last status line read; then the log
        cursor moves past what was read."""
        if read is None:
            return 0
        last, end, lines = read
        cursor: dict[str, Any] = self.state.data["log"]
        sent, new_cov = 0, cursor.get("cov", 0)
        if last is not None:
            stats = {"executions": last.executions,
                     "exec_per_second": float(last.exec_per_second or 0),
                     "covered_edges": last.cov or 0, "corpus_size": last.corpus_count or 0,
                     "unique_crashes": len(self.state.data.get("artifacts", [])),
                     "total_crashes": len(self.state.data.get("artifacts", [])),
                     "memory_usage": min((last.rss_mb or 0) * 1024 * 1024, INT64_MAX)}  # fmt: skip
            self.sink.send(self.fuzzer, "stats", stats)
            sent += 1
            if last.cov != cursor.get("cov"):
                new_cov = last.cov or 0
                self.sink.send(self.fuzzer, "coverage", {
                    "edges": new_cov, "new_edges": max(0, new_cov - cursor.get("cov", 0)),
                    "exec_count": last.executions})  # fmt: skip
                sent += 1
        self.sink.flush()
        cursor["offset"] += end
        cursor["cov"] = new_cov
        self._lines = lines
        return sent
