"""Build the small buggy C targets of ``tests/targets/`` and capture their sanitizer reports.

The parser's fixtures (``tests/data/reports/*.txt``) are real output of these programs, not
hand-written text: ``python -m tests.sanitizer_targets`` rebuilds them with clang and rewrites
the fixtures, and ``test_report.py`` checks (when clang is present) that fresh reports still
parse to the stored signatures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

TARGETS = Path(__file__).parent / "targets"
REPORTS = Path(__file__).parent / "data" / "reports"
#: Fixture name -> the signature it must parse to.
EXPECTED = REPORTS / "expected.json"

_COMMON = ["-g", "-O0", "-fno-omit-frame-pointer"]
#: binary name -> (source, clang flags)
BUILDS: dict[str, tuple[str, list[str]]] = {
    "asan": ("bugs.c", ["-fsanitize=address,undefined", *_COMMON]),
    "plain": ("bugs.c", _COMMON),
    "fuzzer": ("bugs.c", ["-DFUZZER", "-fsanitize=fuzzer,address,undefined", *_COMMON]),
    "fuzzer-nosan": ("bugs.c", ["-DFUZZER", "-fsanitize=fuzzer", *_COMMON]),
    "msan": ("msan.c", ["-fsanitize=memory", *_COMMON]),
    "tsan": ("tsan.c", ["-fsanitize=thread", *_COMMON]),
}


@dataclass(frozen=True)
class Case:
    """One report: which binary, what input, which extra arguments."""

    name: str
    binary: str
    input: bytes = b""
    args: tuple[str, ...] = ()
    #: Extra sanitizer options (``ASAN_OPTIONS`` suffix).
    asan: str = ""


CASES = (
    Case("asan-heap-buffer-overflow", "asan", b"hx"),
    Case("asan-stack-buffer-overflow", "asan", b"s" + b"A" * 15),
    Case("asan-global-buffer-overflow", "asan", b"gx"),
    Case("asan-heap-use-after-free", "asan", b"ux"),
    Case("asan-double-free", "asan", b"dx"),
    Case("asan-segv", "asan", b"nx"),
    Case("asan-stack-overflow", "asan", b"rx"),
    Case("ubsan-signed-integer-overflow", "asan", b"ix"),
    Case("asan-leak", "asan", b"lx"),
    Case("glibc-assertion", "plain", b"ax"),
    Case("asan-assertion-handle-abort", "asan", b"ax", asan="handle_abort=1"),
    Case("msan-uninitialized", "msan"),
    Case("tsan-data-race", "tsan"),
    Case("libfuzzer-deadly-signal", "fuzzer", b"kx"),
    Case("libfuzzer-nosan-deadly-signal", "fuzzer-nosan", b"bx"),
    Case("libfuzzer-nosan-assertion", "fuzzer-nosan", b"ax"),
    Case("libfuzzer-heap-buffer-overflow", "fuzzer", b"hx"),
    Case("libfuzzer-timeout", "fuzzer", b"tx", ("-timeout=1",)),
    Case("libfuzzer-oom", "fuzzer", b"ox", ("-rss_limit_mb=1024", "-malloc_limit_mb=1024")),
)

SANITIZER_ENV = {
    "ASAN_OPTIONS": "symbolize=1:detect_leaks=1:abort_on_error=0:handle_abort=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:symbolize=1",
    "MSAN_OPTIONS": "symbolize=1",
    "TSAN_OPTIONS": "symbolize=1:halt_on_error=1",
}


def clang() -> str | None:
    """The clang to build with, or None when it is not installed."""
    return shutil.which("clang")


def build(out_dir: Path, names: tuple[str, ...] = tuple(BUILDS)) -> dict[str, Path]:
    """Compile targets into ``out_dir``; returns binary name -> path. Needs clang."""
    cc = clang()
    if cc is None:
        raise RuntimeError("clang is not installed")
    built = {}
    for name in names:
        source, flags = BUILDS[name]
        binary = out_dir / name
        # Compiled from tests/targets with a relative source name, so reports say "bugs.c".
        subprocess.run([cc, *flags, source, "-o", str(binary)], cwd=TARGETS, check=True)
        built[name] = binary
    return built


def run_case(case: Case, built: dict[str, Path], work: Path) -> str:
    """Run one case and return what it wrote (stdout then stderr), as a fuzzer would see it."""
    env = {**os.environ, **SANITIZER_ENV}
    if case.asan:
        env["ASAN_OPTIONS"] += f":{case.asan}"
    symbolizer = shutil.which("llvm-symbolizer")
    if symbolizer:
        env["ASAN_SYMBOLIZER_PATH"] = env["MSAN_SYMBOLIZER_PATH"] = symbolizer
    argv = [str(built[case.binary])]
    stdin = None
    if case.binary.startswith("fuzzer"):
        crash = work / f"{case.name}.in"
        crash.write_bytes(case.input)
        argv += [*case.args, str(crash)]
    elif case.input:
        crash = work / f"{case.name}.in"
        crash.write_bytes(case.input)
        argv.append(str(crash))
    proc = subprocess.run(
        argv, stdin=stdin, capture_output=True, env=env, cwd=work, timeout=120, check=False
    )
    return (proc.stdout + proc.stderr).decode("utf-8", "replace")


def capture_all() -> dict[str, str]:
    """Build everything in a temporary directory and run every case; name -> report text."""
    with tempfile.TemporaryDirectory(prefix="pf-targets-") as tmp:
        work = Path(tmp)
        built = build(work)
        return {case.name: run_case(case, built, work) for case in CASES}


def main() -> int:
    """Rewrite the fixtures and ``expected.json`` (review its diff: it is what the tests hold)."""
    from pfcollector.report import parse

    REPORTS.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, text in capture_all().items():
        (REPORTS / f"{name}.txt").write_text(text)
        expected[name] = parse(text).signature
        print(f"{name}: {len(text)} chars: {expected[name]!r}")
    EXPECTED.write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
