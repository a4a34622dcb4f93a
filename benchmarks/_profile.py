"""Top frames out of ``py-spy record --format raw`` output (collapsed stacks).

Each line of the raw format is ``frame;frame;...;frame COUNT``, outermost first, each frame
``function (path/to/file.py:line)``. Frames are folded by function and file (line numbers
dropped, paths shortened to ``package/file.py``); ``self_lines`` keeps the line of the leaf.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

__all__ = ["top_frames"]

_OWN = ("pfcollector/", "sqlite", "msgpack", "inputs.py")
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<path>[^()]*?)(?P<line>:\d+)?\)$")


def _fold(frame: str, keep_line: bool = False) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    parts = m["path"].split("/")
    line = m["line"] if keep_line and m["line"] else ""
    return f"{m['func']} ({'/'.join(parts[-2:])}{line})"


def top_frames(raw: str, n_self: int = 15, n_incl: int = 25) -> dict[str, Any]:
    """Shares of samples per frame: ``self`` (leaf) and ``inclusive`` (anywhere on the stack)."""
    leaf: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        count = int(m["count"])
        frames = [_fold(f) for f in m["stack"].split(";") if f]
        if not frames:
            continue
        total += count
        leaf[frames[-1]] += count
        lines[_fold(m["stack"].split(";")[-1], keep_line=True)] += count
        for frame in set(frames):
            incl[frame] += count
    share = (lambda c: round(c / total, 4)) if total else (lambda c: 0.0)
    return {
        "samples": total,
        "self": [(f, share(c)) for f, c in leaf.most_common(n_self)],
        "self_lines": [(f, share(c)) for f, c in lines.most_common(n_self)],
        # Generic frames (runpy, typer, trio's run loop, threading) are on most stacks and say
        # nothing: the inclusive view keeps the daemon's own and its storage libraries'.
        "inclusive": [(f, share(c)) for f, c in incl.most_common() if any(k in f for k in _OWN)][
            :n_incl
        ],
    }
