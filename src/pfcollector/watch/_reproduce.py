"""``watch afl --reproduce``: run the target again on a crash input to get its report.

AFL++ keeps only the input of a crash, so a crash reaches the master without a stack trace.
With ``--reproduce`` the watcher re-runs the target once per new crash, the way AFL++ ran it:
the ``command_line`` that AFL++ records in ``fuzzer_stats`` (the part after ``--``, or after
afl-fuzz's own options), with ``@@`` replaced by the crash file and the input on stdin
otherwise. The sanitizer's report then goes with the crash (``stack_trace``: the report;
``output``: what happened and the tail of the target's output), and the daemon buckets it by
bug (``crash_dedupe = "bug"``).

Resource handling:
    One child at a time, in its own session, killed with its whole process group after
    ``timeout`` seconds. In the child, before exec: ``RLIMIT_CPU``, ``RLIMIT_FSIZE`` (its output
    goes to a private temporary file, so at most :data:`OUTPUT_FILE_MAX` bytes), no core
    files, nice +10, and ``RLIMIT_AS`` for a target without a sanitizer (a sanitizer
    reserves terabytes of address space: for those the limit is ``hard_rss_limit_mb`` in its
    options instead).
    The working directory is the crash's directory.

Error handling:
    Never as root: when the watcher runs as root, the target runs as the owner of the AFL++
    output directory, and a directory owned by root is refused (:class:`ReproduceRefused`,
    raised when the watcher starts). A crash that cannot be reproduced (no command line,
    the target exits cleanly, times out, cannot start) is still sent, with why in ``output``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..report import parse

__all__ = [
    "ATTACHED_MAX",
    "OUTPUT_FILE_MAX",
    "Limits",
    "ReproduceRefused",
    "Reproducer",
    "run_as",
    "target_argv",
]

log = logging.getLogger("pfcollector.watch.reproduce")
#: Most bytes of output a target may write (RLIMIT_FSIZE on its output file).
OUTPUT_FILE_MAX = 8 * 1024 * 1024
#: Characters of report and output attached to a crash (the protocol truncates at 64 KiB).
ATTACHED_MAX = 60 * 1024
#: afl-fuzz's options that take an argument (its getopt string, AFL++ 4).
_AFL_ARG_OPTIONS = frozenset("bBceEifFgGlLmMopsStTVx")
_STATS_MAX = 1024 * 1024  # a fuzzer_stats file is a few KiB
_NICENESS = 10  # added to the target's nice value: reproducing yields the CPU to fuzzing
_BINARY_CHUNKS = 256  # MiB of a target binary searched for a sanitizer's runtime
_SANITIZER_MARKS = (b"__asan_init", b"__msan_init", b"__tsan_init", b"__hwasan_init")


class ReproduceRefused(Exception):
    """Reproducing would run a fuzzer's target as root."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one run of the target may use."""

    timeout: float = 10.0
    memory_mb: int = 2048


def run_as(owner_uid: int, euid: int) -> int | None:
    """The uid to run the target as: None to stay as we are (not root).

    Raises :class:`ReproduceRefused` when we are root and the fuzzer's directory is root's.
    """
    if euid != 0:
        return None
    if owner_uid == 0:
        raise ReproduceRefused(
            "the AFL++ output directory is owned by root: --reproduce will not run its target "
            "as root (run afl-fuzz and the watcher as an unprivileged user)"
        )
    return owner_uid


def target_argv(command_line: str) -> tuple[list[str], str | None, str | None]:
    """``(target argv, -o value, -f value)`` of an afl-fuzz ``command_line``.

    The target is what follows ``--``, else the first argument that is not one of afl-fuzz's
    options or their values. An empty argv when there is no target.
    """
    try:
        words = shlex.split(command_line)
    except ValueError:  # AFL++ joins argv with spaces, unquoted: a stray quote is literal
        words = command_line.split()
    out_dir = input_file = None
    i = 1  # words[0] is afl-fuzz itself
    while i < len(words):
        word = words[i]
        if word == "--":
            return words[i + 1 :], out_dir, input_file
        if not word.startswith("-") or word == "-":
            return words[i:], out_dir, input_file
        letter = word[1:2]
        if letter in _AFL_ARG_OPTIONS:
            value = word[2:] if len(word) > 2 else (words[i + 1] if i + 1 < len(words) else "")
            if letter == "o":
                out_dir = value
            elif letter == "f":
                input_file = value
            i += 1 if len(word) > 2 else 2
        else:
            i += 1
    return [], out_dir, input_file


class Reproducer:
    """Re-runs an AFL++ target on crash inputs; :meth:`run` gives the fields to attach."""

    def __init__(self, output_dir: Path, limits: Limits | None = None) -> None:
        self.output_dir = output_dir.resolve()
        self.limits = limits or Limits()
        self.uid = run_as(self.output_dir.stat().st_uid, os.geteuid())
        self.gid = self.output_dir.stat().st_gid if self.uid is not None else None
        self.symbolizer = shutil.which("llvm-symbolizer")

    def run(self, instance_dir: Path, crash_file: Path, data: bytes) -> dict[str, Any]:
        """Run the target on one crash; ``output`` and ``stack_trace`` for its event."""
        stats = _read_regular(instance_dir / "fuzzer_stats", _STATS_MAX).decode(errors="replace")
        command_line = next(
            (line.partition(":")[2].strip() for line in stats.splitlines()
             if line.partition(":")[0].strip() == "command_line"),
            "",
        )  # fmt: skip
        argv, out_arg, input_file = target_argv(command_line)
        if not argv:
            return _not_reproduced("fuzzer_stats has no command_line with a target", "")
        afl_cwd = _afl_cwd(self.output_dir, out_arg)
        if not os.path.isabs(argv[0]) and "/" in argv[0]:
            argv[0] = str(afl_cwd / argv[0])
        uses_file = any("@@" in arg for arg in argv)
        if not uses_file and input_file:
            return _not_reproduced(f"the target reads a fixed file (-f {input_file})", "")
        argv = [arg.replace("@@", str(crash_file.resolve())) for arg in argv]
        with tempfile.TemporaryDirectory(prefix="pf-reproduce-") as tmp:
            log_path = Path(tmp) / "output"
            outcome, crashed = self._execute(
                argv, crash_file.parent, log_path, None if uses_file else data
            )
            text = _read(log_path)
        fields = _fields(outcome, crashed, text)
        log.info("%s: %s", crash_file.name, fields["output"].partition("\n")[0])
        return fields

    def _execute(
        self, argv: list[str], cwd: Path, log_path: Path, stdin: bytes | None
    ) -> tuple[str, bool | None]:
        """What happened, and whether the target crashed (None: it did not run to the end)."""
        sanitized = _is_sanitized(argv[0], cwd)
        env = self._environment()
        with contextlib.ExitStack() as stack:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            stack.callback(os.close, fd)
            stdin_file = (
                stack.enter_context(tempfile.TemporaryFile()) if stdin is not None else None
            )
            if stdin_file is not None and stdin is not None:
                stdin_file.write(stdin)
                stdin_file.seek(0)
            started = time.monotonic()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
                    stdout=fd,
                    stderr=fd,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,  # its own process group: killed whole
                    user=self.uid,
                    group=self.gid,
                    extra_groups=[] if self.uid is not None else None,
                    preexec_fn=_limiter(self.limits, sanitized),  # the watcher has no threads
                )
            except OSError as exc:
                return f"the target could not start ({exc})", None
            stack.callback(_kill_group, proc)  # whatever it left running in its session
            try:
                code = proc.wait(timeout=self.limits.timeout)
            except subprocess.TimeoutExpired:
                return f"timed out after {self.limits.timeout:g}s", None
            took = time.monotonic() - started
            how = f"killed by signal {-code}" if code < 0 else f"exited with {code}"
            return f"{how} in {took:.2f}s", code != 0
        raise AssertionError("unreachable")  # pragma: no cover

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AFL_", "__AFL"))}
        rss = f"hard_rss_limit_mb={self.limits.memory_mb}"
        common = f"symbolize=1:{rss}:allocator_may_return_null=1:detect_leaks=1"
        env["ASAN_OPTIONS"] = (
            f"{common}:abort_on_error=0:handle_abort=1:detect_stack_use_after_return=0"
        )
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:symbolize=1"
        env["MSAN_OPTIONS"] = f"symbolize=1:{rss}"
        env["TSAN_OPTIONS"] = "symbolize=1:halt_on_error=1"
        env["LSAN_OPTIONS"] = "symbolize=1"
        if self.symbolizer:
            env["ASAN_SYMBOLIZER_PATH"] = env["MSAN_SYMBOLIZER_PATH"] = self.symbolizer
        return env


def _limiter(limits: Limits, sanitized: bool) -> Callable[[], None]:
    cpu = int(limits.timeout) + 1
    memory = limits.memory_mb * 1024 * 1024

    def limit() -> None:  # in the child, after the uid change, before exec
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_FILE_MAX, OUTPUT_FILE_MAX))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.nice(_NICENESS)  # the fuzzer comes first
        if not sanitized:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return limit


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _is_sanitized(program: str, cwd: Path) -> bool:
    """Whether the target is built with a sanitizer (its binary names their runtime)."""
    path = cwd / (Path(program) if "/" in program else Path(shutil.which(program) or program))
    try:
        fd = _open_regular(path)
    except OSError:
        return True  # unknown: no address-space limit rather than a spurious failure
    with os.fdopen(fd, "rb") as f:
        tail = b""
        for _ in range(_BINARY_CHUNKS):
            chunk = f.read(1024 * 1024)
            if not chunk:
                return False
            window = tail + chunk
            if any(mark in window for mark in _SANITIZER_MARKS):
                return True
            tail = window[-32:]
    return True  # a binary past 256 MiB: assume a sanitizer rather than risk a false failure


def _open_regular(path: Path) -> int:
    """An fd of ``path`` if it is a regular file (never blocks on a FIFO), else OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def _read_regular(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file that is not a symlink; b"" otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return b""
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return f.read(limit)


def _afl_cwd(output_dir: Path, out_arg: str | None) -> Path:
    """Where afl-fuzz ran, from its ``-o`` value: relative paths of its command are from there."""
    if out_arg and not os.path.isabs(out_arg):
        parts = Path(out_arg).parts
        if output_dir.parts[-len(parts) :] == parts:
            return Path(*output_dir.parts[: -len(parts)])
    return output_dir.parent


def _read(path: Path) -> str:
    with path.open("rb") as f:
        return f.read(OUTPUT_FILE_MAX).decode("utf-8", "replace")


def _not_reproduced(why: str, text: str) -> dict[str, Any]:
    return {"output": f"not reproduced: {why}\n{text[-ATTACHED_MAX:]}".rstrip(),
            "stack_trace": ""}  # fmt: skip


def _fields(outcome: str, crashed: bool | None, text: str) -> dict[str, Any]:
    """``output`` (outcome and the output's tail) and ``stack_trace`` (the report itself)."""
    report = parse(text) if crashed is not None else None
    if report is None or (report.signature is None and not crashed):
        return _not_reproduced(outcome, text)
    tail = text[-ATTACHED_MAX:]
    if report.signature is None:
        return {"output": f"reproduced: {outcome}, no sanitizer report\n{tail}".rstrip(),
                "stack_trace": ""}  # fmt: skip
    start = report_start(text)
    return {
        "output": f"reproduced: {outcome}: {report.crash_type}\n{tail}".rstrip(),
        "stack_trace": text[start : start + ATTACHED_MAX],
    }


def report_start(text: str) -> int:
    """Where the report begins: its ``=====`` rule or first line, else the output's start."""
    for marker in ("=================", "ERROR: ", "WARNING: ", "runtime error: ", "Assertion `"):
        at = text.find(marker)
        if at >= 0:
            return text.rfind("\n", 0, at) + 1
    return 0
