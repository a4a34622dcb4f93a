"""Stack frames of sanitizer reports, and which of them say where a bug is. Pure.

One frame line of ASan, MSan, LSan, UBSan or TSan (``#0 0x55 in f /src/a.c:17:3``,
``#1 0x7f (/lib/libc.so.6+0x2a1ca) (BuildId: 93ac)``, ``#0 bump /src/t.c:6:59 (t+0xd01b8)``)
becomes a :class:`Frame`. :func:`crash_state` picks the frames that identify a bug: the top ones
once sanitizer, runtime, libc, allocator and libFuzzer frames are dropped, following
ClusterFuzz's crash-state rules (see ``docs/pipeline.md``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LINE_CAP", "Frame", "bare_function", "crash_state", "is_entry", "is_runtime"]

#: Longest function name kept in a crash state (ClusterFuzz's LINE_LENGTH_CAP).
LINE_CAP = 80

_FRAME = re.compile(r"#(\d{1,5})\s+(?:0x[0-9a-fA-F]{1,16}\s+)?(?:in\s+)?(.*)")
_LOCATION = re.compile(r"(.+?):(\d{1,9})(?::\d{1,9})?")


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame: function (``""`` when not symbolised), source file and line, module."""

    function: str = ""
    file: str = ""
    line: int = 0
    module: str = ""

    def __str__(self) -> str:
        where = f" {self.file}:{self.line}" if self.file else ""
        module = f" ({self.module})" if self.module else ""
        return f"{self.function or '??'}{where}{module}"


def parse_frame(line: str) -> Frame | None:
    """A frame from one stripped report line, or None when the line is not a frame."""
    match = _FRAME.match(line)
    if match is None:
        return None
    rest = match.group(2)
    # str methods, not regexes anchored at the end: those backtrack on a line of spaces.
    if rest.endswith(")") and " (BuildId: " in rest:
        rest = rest[: rest.rfind(" (BuildId: ")].rstrip()
    module = ""
    if rest.endswith(")"):
        opening = rest.rfind("(")
        inner = rest[opening + 1 : -1]
        if "+0x" in inner and not any(c.isspace() or c in "()" for c in inner):
            module = inner[: inner.rfind("+0x")].rsplit("/", 1)[-1]
            rest = rest[:opening].strip()
    file, number = "", 0
    head, _, last = rest.rpartition(" ")
    if last == "<null>":
        rest = head.strip()
    else:
        location = _LOCATION.fullmatch(last)
        if location is not None and "(" not in last:
            file, number = location.group(1), int(location.group(2))
            rest = head.strip()
    return Frame(rest, file, number, module)


@functools.lru_cache(maxsize=4096)  # frames repeat (a stack overflow: 250 of one function)
def bare_function(name: str) -> str:
    """A function name without its parameters, qualifiers or return type, at most LINE_CAP.

    >>> bare_function("fuzzer::Fuzzer::ExecuteCallback(unsigned char const*, unsigned long)")
    'fuzzer::Fuzzer::ExecuteCallback'
    >>> bare_function("void check_magic(const unsigned char *)")
    'check_magic'
    """
    if not any(c in name for c in " (<"):
        return name.lstrip("*&")[:LINE_CAP]  # a plain C name: most frames
    name = name.replace("(anonymous namespace)", "{anonymous}")
    depth, cut, start = 0, len(name), 0
    operator = name.find("operator")  # its symbol is no template bracket, its space no type
    symbol_end = operator + 8 + (name[operator + 8 : operator + 9] == " ") if operator >= 0 else -1
    for i, char in enumerate(name):
        if operator >= 0 and operator <= i < symbol_end + 2 and char in "<>( ":
            if char == "(" and i >= symbol_end + (name[symbol_end : symbol_end + 2] == "()") * 2:
                cut = i
                break
            continue
        if char == "<":
            depth += 1
        elif char == ">" and depth:
            depth -= 1
        elif char == "(" and depth == 0 and i > 0:
            cut = i
            break
        elif char == " " and depth == 0:
            start = i + 1  # what came before was a return type or a qualifier
    bare = name[start:cut].strip().lstrip("*&")
    return bare.replace("{anonymous}", "(anonymous namespace)")[:LINE_CAP]


# Dropped from a crash state: they are where every bug is reported, not where one is.
_RUNTIME_EXACT = frozenset(
    {
        "abort", "raise", "exit", "_exit", "gsignal", "pthread_kill", "tgkill", "pthread_create",
        "malloc", "calloc", "realloc", "free", "valloc", "pvalloc", "memalign",
        "posix_memalign", "aligned_alloc", "reallocarray", "<null>", "??",
    }
)  # fmt: skip
_RUNTIME_PREFIX = (
    "__asan", "__lsan", "__msan", "__tsan", "__ubsan", "__hwasan", "__sanitizer",
    "__interceptor_", "___interceptor_", "_asan_", "_lsan_", "_msan_", "_tsan_", "_ubsan_",
    "asan_", "__libc_", "__GI_", "_start", "__cxa_", "__assert_", "__pthread_kill",
    "__run_exit_handlers", "__gxx_personality", "_Unwind_", "fuzzer::", "std::__terminate",
    "std::terminate", "operator new", "operator delete", "__cxxabiv1::",
)  # fmt: skip
_MEMORY_FUNCTIONS = re.compile(
    r"(?:__)?(?:mem(?:cpy|move|set|cmp|chr)|str(?:n?cpy|n?cmp|n?cat|len|dup|chr|rchr|str)"
    r"|wcs\w*|bcmp|bzero)(?:_\w+)?"
)
_RUNTIME_MODULES = (
    "libc.so", "libc-", "libc++", "libstdc++", "libpthread", "ld-linux", "libm.so",
    "libclang_rt", "libgcc_s", "libasan", "libubsan", "libtsan", "libmsan", "liblsan",
)  # fmt: skip
_RUNTIME_PATHS = (
    "/sanitizer_common/", "/compiler-rt/", "/glibc-", "csu/", "sysdeps/", "nptl/",
    "/libc/", "/libcxx/", "/libcxxabi/", "/libFuzzer/", "/fuzzer/Fuzzer",
)  # fmt: skip
#: Entry points: dropped too, unless nothing else is left (then they are the state).
_ENTRY = frozenset({"main", "LLVMFuzzerTestOneInput", "TestOneProtoInput", "__libc_start_main"})


def is_runtime(frame: Frame, function: str) -> bool:
    """A sanitizer, libc, allocator, C++ runtime or libFuzzer frame (or one not symbolised)."""
    if not function or function in _RUNTIME_EXACT or function.startswith(_RUNTIME_PREFIX):
        return True
    if _MEMORY_FUNCTIONS.fullmatch(function):
        return True
    if frame.module.startswith(_RUNTIME_MODULES):
        return True
    return any(part in frame.file for part in _RUNTIME_PATHS) if frame.file else False


def is_entry(function: str) -> bool:
    """``main`` or a fuzz target's entry point."""
    return function in _ENTRY


def crash_state(frames: Sequence[Frame], limit: int, *, distinct: bool = False) -> tuple[str, ...]:
    """The top ``limit`` functions of ``frames`` that are not runtime or entry frames.

    ``distinct`` keeps each function once (a stack overflow repeats one cycle hundreds of
    times: its state is the functions of the cycle, not three copies of one). With nothing
    left, the first entry frame (``main``, ``LLVMFuzzerTestOneInput``) is the state.
    """
    state: list[str] = []
    entries: list[str] = []
    for frame in frames:
        function = bare_function(frame.function[: LINE_CAP * 4])  # bounded cache keys
        if is_runtime(frame, function):
            continue
        if is_entry(function):
            if not entries:  # only the first: libFuzzer's own main follows the target's
                entries.append(function)
            continue
        if distinct and function in state:
            continue
        state.append(function)
        if len(state) == limit:
            break
    return tuple(state or entries)
