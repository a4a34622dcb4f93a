"""Text from outside made safe to show on a terminal.

The master's error texts, clients' job and fuzzer names, crash types and stack frames are
shown by ``status``, ``status --watch``, ``dead-letters list`` and the bug views: whatever a
terminal would act on (C0 controls, tab and newline included, DEL, C1, and the bidirectional
controls U+061C, U+200E/F, U+202A-E, U+2066-9) is written as an escape (``\\x1b``,
``\\u202e``). ``--json`` output needs none of this: JSON escapes every control character.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar, cast

__all__ = ["printable", "printable_tree"]

_T = TypeVar("_T")

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on written as an escape: ``\\x1b``,
    ``\\x9b``, ``\\u202e``."""
    return _UNSAFE.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable_tree(value: _T) -> _T:
    """A copy of a JSON-like document with :func:`printable` applied to every string."""
    return cast(_T, _printable_tree(value))


def _printable_tree(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {k: _printable_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable_tree(v) for v in value]
    return value
