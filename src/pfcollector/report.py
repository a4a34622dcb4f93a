"""Sanitizer and fuzzer crash reports: crash type, frames, and the bug signature. Pure.

:func:`parse` reads a crash's ``output`` and ``stack_trace`` (text a fuzzer wrote: hostile,
possibly huge, possibly not a report at all) and recognises AddressSanitizer, LeakSanitizer,
MemorySanitizer, ThreadSanitizer and UndefinedBehaviorSanitizer reports, libFuzzer's own
errors (deadly signal, timeout, out-of-memory) and glibc's aborts (assertion failures, malloc
errors, stack smashing). It returns a :class:`Report`: the crash type
(``heap-buffer-overflow READ 4``), the frames of the crash stack, and the *crash state*: the
top :data:`STATE_FRAMES` functions once sanitizer, runtime, libc and libFuzzer frames are
dropped. Crash type plus state is the bug signature that buckets crashes
(``docs/pipeline.md`` states the rules; they follow ClusterFuzz's crash-state conventions).

Error handling:
    Never raises on any text: what is not recognised gives an empty crash type and no
    signature. Time is bounded: at most :data:`MAX_TEXT` characters of each field and
    :data:`MAX_LINE` characters of a line are looked at, with regular expressions that do not
    backtrack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._frames import Frame, bare_function, crash_state, is_runtime, parse_frame

__all__ = ["MAX_LINE", "MAX_TEXT", "STATE_FRAMES", "Frame", "Report", "parse"]

#: Characters of each of ``output`` and ``stack_trace`` that are read (the tail is ignored).
MAX_TEXT = 1024 * 1024
#: Characters of one line that are matched; the rest of a longer line is ignored.
MAX_LINE = 2048
#: Functions in a crash state (ClusterFuzz's MAX_CRASH_STATE_FRAMES).
STATE_FRAMES = 3
#: Frames kept in a report: enough for any state, bounded for a 10,000-deep stack overflow.
MAX_FRAMES = 256


@dataclass(frozen=True, slots=True)
class Report:
    """What a crash report says. ``crash_type`` is ``""`` when nothing was recognised."""

    #: ``AddressSanitizer``, ``UndefinedBehaviorSanitizer``, ..., ``libFuzzer``, ``glibc``.
    tool: str = ""
    crash_type: str = ""
    #: The crash stack, top first (for a leak: the first leak's allocation stack).
    frames: tuple[Frame, ...] = ()
    #: The top functions that identify the bug (see the module docstring).
    state: tuple[str, ...] = ()

    @property
    def signature(self) -> str | None:
        """Crash type and state, one per line; None without both (a bucket of every crash of
        one type would hide distinct bugs: such a crash is deduplicated by input instead)."""
        if not self.crash_type or not self.state:
            return None
        return "\n".join((self.crash_type, *self.state))


_SANITIZER = re.compile(
    r"(?:ERROR|WARNING): (AddressSanitizer|LeakSanitizer|MemorySanitizer|ThreadSanitizer"
    r"|HWAddressSanitizer|UndefinedBehaviorSanitizer): ?(.*)"
)
_LIBFUZZER = re.compile(r"ERROR: libFuzzer: ([\w -]{1,40})")
_HEX = re.compile(r"0x[0-9a-fA-F]{1,16}")
_SMASHING = re.compile(r"\*\*\* (stack smashing|buffer overflow) detected \*\*\*")
_ACCESS = re.compile(r"(READ|WRITE) of size (\d+)")
_SIGNAL_ACCESS = re.compile(r"The signal is caused by a (READ|WRITE) memory access")
_ADDRESS = re.compile(r"unknown address (?:0x)?([0-9a-fA-F]{1,16})")
_WORD = re.compile(r"[A-Za-z][\w-]*")
#: glibc's malloc_printerr messages and fatal errors (printed, then abort()): exact openings,
#: so that a target's own "corrupted input" line is not taken for one.
_GLIBC_START = (
    "free(): ",
    "malloc(): ",
    "realloc(): ",
    "calloc(): ",
    "munmap_chunk(): ",
    "malloc_consolidate(): ",
    "_int_free(): ",
    "_int_malloc(): ",
    "double free or corruption (",
    "corrupted size vs. prev_size",
    "corrupted double-linked list",
    "Fatal glibc error: ",
    "*** Error in `",
)

#: UBSan's messages (``runtime error: ...``) to a crash type; first match wins.
_UBSAN_TYPES: tuple[tuple[str, str], ...] = (
    ("signed integer overflow", "signed-integer-overflow"),
    ("unsigned integer overflow", "unsigned-integer-overflow"),
    ("negation of", "signed-integer-overflow"),
    ("division by zero", "divide-by-zero"),
    ("out of bounds for type", "index-out-of-bounds"),
    ("shift exponent", "undefined-shift"),
    ("left shift of", "undefined-shift"),
    ("misaligned address", "misaligned-address"),
    ("load of null pointer", "null-dereference READ"),
    ("store to null pointer", "null-dereference WRITE"),
    ("null pointer of type", "null-dereference"),
    ("member access within null pointer", "null-dereference"),
    ("member call on null pointer", "null-dereference"),
    ("null pointer passed as argument", "invalid-null-argument"),
    ("null pointer returned from function", "invalid-null-return"),
    ("applying non-zero offset", "pointer-overflow"),
    ("applying zero offset to null", "pointer-overflow"),
    ("pointer index expression", "pointer-overflow"),
    ("addition of unsigned offset", "pointer-overflow"),
    ("subtraction of unsigned offset", "pointer-overflow"),
    ("not a valid value for type 'bool'", "invalid-bool-value"),
    ("not a valid value for type", "invalid-enum-value"),
    ("is outside the range of representable values", "float-cast-overflow"),
    ("unreachable program point", "unreachable-code"),
    ("through pointer to incorrect function type", "incorrect-function-pointer-type"),
    ("variable length array bound", "non-positive-vla-bound-value"),
    ("reached the end of a value-returning function", "no-return-value"),
    ("implicit conversion", "implicit-conversion"),
    ("object has invalid vptr", "bad-vptr"),
    ("passing zero to", "invalid-builtin-use"),
)

#: Access sizes kept in the crash type; any other is ``{*}`` (one bug, many memcpy lengths).
_PLAIN_SIZES = frozenset({"1", "2", "4", "8", "16"})


@dataclass(slots=True)
class _Header:
    rank: int  # lower wins: a sanitizer's report over an abort message over libFuzzer's line
    line: int
    tool: str
    crash_type: str
    #: Frames start after this line (a leak's stack follows "Direct leak of").
    stack_from: int
    #: For an assertion: the state comes from the message, not from frames.
    state: tuple[str, ...] = ()
    #: The source location the header names (UBSan's ``file.c:58``): the state without frames.
    where: tuple[str, ...] = ()


def parse(output: str, stack_trace: str = "") -> Report:
    """The crash type, frames and state of a report; an empty :class:`Report` if none."""
    lines = _lines(output) + _lines(stack_trace)
    header = _find_header(lines)
    if header is None:
        return Report()
    frames = _frames_after(lines, header.stack_from)
    if not frames and header.stack_from > 0:
        frames = _frames_after(lines, 0)  # e.g. the report in output, the frames elsewhere
    crash_type = header.crash_type
    if frames and crash_type[-1:].isdigit() and _in_runtime(frames[0]):
        # memcpy/memset/strcpy...: the size is the caller's length, which the input sets.
        crash_type = crash_type.rpartition(" ")[0] + " {*}"
    state = header.state or crash_state(
        frames, STATE_FRAMES, distinct=header.crash_type.startswith("stack-overflow")
    )
    if not state:  # no usable frame: where the report says it happened, if it says
        state = _summary_function(lines, header.line) or header.where
    return Report(header.tool, crash_type, tuple(frames), state)


def _in_runtime(frame: Frame) -> bool:
    return is_runtime(frame, bare_function(frame.function[:320]))


def _summary_function(lines: list[str], start: int) -> tuple[str, ...]:
    """``(function,)`` from the report's ``SUMMARY: ... in function`` line, if it names one."""
    for line in lines[start : start + MAX_FRAMES * 2]:
        if line.startswith("SUMMARY: ") and " in " in line:
            function = bare_function(line.rpartition(" in ")[2].strip())
            return (function,) if function and not is_runtime(Frame(function), function) else ()
    return ()


def _lines(text: str) -> list[str]:
    if not isinstance(text, str) or not text:
        return []
    return [line[:MAX_LINE].strip() for line in text[:MAX_TEXT].split("\n")]


def _find_header(lines: list[str]) -> _Header | None:
    best: _Header | None = None
    for i, line in enumerate(lines):
        if best is not None and best.rank == 0:
            break
        found = _header(lines, i, line)
        if found is not None and (best is None or found.rank < best.rank):
            best = found
    return best


def _header(lines: list[str], i: int, line: str) -> _Header | None:
    if "Sanitizer" in line:
        match = _SANITIZER.search(line)
        if match:
            return _sanitizer_header(lines, i, match.group(1), match.group(2))
    if ": runtime error: " in line:  # UBSan's "file:line:col: runtime error: message" only
        location, _, message = line.partition(": runtime error: ")
        parts = location.rsplit(":", 2)  # not an interpreter's own "runtime error:" line
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            place = (f"{parts[0].rpartition('/')[2]}:{parts[1]}"[:80],)
            return _Header(0, i, "UndefinedBehaviorSanitizer", _ubsan_type(message), i, (), place)
    if "libFuzzer: " in line:
        match = _LIBFUZZER.search(line)
        if match:
            return _libfuzzer_header(i, match.group(1))
    if ": Assertion `" in line and line.endswith("' failed."):
        # "prog: file.c:62: void f(int): Assertion `x == 1' failed." (str methods: no regex
        # over a hostile line full of colons)
        where, _, expression = line.partition(": Assertion `")
        parts = where.split(": ", 2)
        function = bare_function(parts[2]) if len(parts) == 3 else ""
        state = (function, f"Assertion `{expression[:-9][:120]}' failed")
        return _Header(1, i, "glibc", "assertion-failure", i, state)
    if "***" in line and _SMASHING.search(line):
        return _Header(1, i, "glibc", "stack-smashing", i)
    if line.startswith(_GLIBC_START):  # malloc_printerr and friends, then abort()
        message = line.split("': ", 1)[-1] if line.startswith("*** Error in `") else line
        message = _HEX.sub("", message[:200]).strip(" *:")[:120]
        return _Header(1, i, "glibc", "abort", i, (message,))
    return None


def _sanitizer_header(lines: list[str], i: int, tool: str, rest: str) -> _Header:
    word = _WORD.match(rest)
    name = word.group(0) if word else "unknown-crash"
    if tool == "LeakSanitizer" or rest.startswith("detected memory leaks"):
        return _leak_header(lines, i)
    if tool == "ThreadSanitizer":
        kind = rest.split(" (pid=", 1)[0].strip() or "unknown"
        return _Header(0, i, tool, re.sub(r"\s+", "-", kind)[:64], i)
    if rest.startswith("attempting double-free"):
        return _Header(0, i, tool, "double-free", i)
    if rest.startswith("attempting free on address which was not malloc"):
        return _Header(0, i, tool, "bad-free", i)
    if rest.startswith("requested allocation size"):
        return _Header(0, i, tool, "allocation-size-too-big", i)
    if rest.startswith("allocator is out of memory") or rest.startswith("out of memory"):
        return _Header(0, i, tool, "out-of-memory", i)
    crash_type = name
    nearby = lines[i + 1 : i + 4]
    if name in ("SEGV", "BUS", "FPE", "ILL", "ABRT"):
        address = _ADDRESS.search(rest)
        crash_type = {"ABRT": "abort"}.get(name, name)
        if name == "SEGV":
            null = address is not None and int(address.group(1), 16) < 4096
            crash_type = "null-dereference" if null else "SEGV on unknown address"
        for near in nearby:
            access = _SIGNAL_ACCESS.search(near)
            if access:
                crash_type += f" {access.group(1)}"
                break
    else:
        for near in nearby:
            access = _ACCESS.match(near)
            if access:
                size = access.group(2) if access.group(2) in _PLAIN_SIZES else "{*}"
                crash_type += f" {access.group(1)} {size}"
                break
    # An abort's report comes after the message that says why (an assertion): that one wins.
    return _Header(1 if name == "ABRT" else 0, i, tool, crash_type, i)


def _leak_header(lines: list[str], i: int) -> _Header:
    for j in range(i + 1, min(len(lines), i + 50)):
        if lines[j].startswith("Direct leak of"):
            return _Header(0, i, "LeakSanitizer", "direct-leak", j)
        if lines[j].startswith("Indirect leak of"):
            return _Header(0, i, "LeakSanitizer", "indirect-leak", j)
    return _Header(0, i, "LeakSanitizer", "memory-leak", i)


def _libfuzzer_header(i: int, what: str) -> _Header:
    what = what.strip()
    if what.startswith("timeout"):
        crash_type = "timeout"
    elif what.startswith("out-of-memory"):
        crash_type = "out-of-memory"
    elif what.startswith("deadly signal"):
        crash_type = "deadly-signal"
    else:
        crash_type = re.sub(r"[^\w-]+", "-", what.strip()).strip("-") or "libfuzzer-error"
    return _Header(2, i, "libFuzzer", crash_type, i)


def _ubsan_type(message: str) -> str:
    for needle, crash_type in _UBSAN_TYPES:
        if needle in message:
            return crash_type
    return "undefined-behavior"


def _frames_after(lines: list[str], start: int) -> list[Frame]:
    """The first run of ``#N`` frames at or after ``start`` (it ends at the first other line)."""
    frames: list[Frame] = []
    for line in lines[start:]:
        frame = parse_frame(line) if line.startswith("#") else None
        if frame is None:
            if frames:
                break
            continue
        frames.append(frame)
        if len(frames) == MAX_FRAMES:
            break
    return frames
