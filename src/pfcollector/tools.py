"""Command-line tools around the daemon for fuzzers that cannot embed pfclient.

``pfcollector send KIND [options]`` reports one event from a shell script and waits for the
daemon's acknowledgement; ``pfcollector watch afl|libfuzzer`` (:mod:`pfcollector.watch`)
follows a fuzzer's files. :func:`register_tools` adds both to the main typer app.

Error handling:
    A daemon that cannot be reached, or that refuses the event, is one line on stderr and
    exit code 1; an unreadable ``--input`` file, or a ``--file`` that does not exist, is exit
    code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pfclient import Client, PfClientError

from .events import LIFECYCLE_KINDS
from .watch import submit, watch_app

__all__ = ["register_tools", "send_app", "send_event", "watch_app"]

send_app = typer.Typer(
    help="Report one event to the daemon (for shell scripts); prints its id once acknowledged.",
    no_args_is_help=True,
)

Job = Annotated[str, typer.Option("--job", envvar="PFCOLLECTOR_JOB", help="Job id")]
Fuzzer = Annotated[str, typer.Option("--fuzzer", envvar="PFCOLLECTOR_FUZZER", help="Fuzzer name")]
Sock = Annotated[
    Path | None, typer.Option("--socket", help="Daemon socket (default: as pfcollector serve)")
]
EventId = Annotated[
    str | None, typer.Option("--id", help="Event id, for retries (default: a uuid4)")
]
Ts = Annotated[float | None, typer.Option("--ts", help="Seconds since the epoch (default: now)")]
Timeout = Annotated[float, typer.Option("--timeout", help="Seconds to wait for the daemon")]
_DEFAULT_FUZZER = "shell"


def register_tools(app: typer.Typer) -> None:
    """Add ``watch`` and ``send`` to the ``pfcollector`` app."""
    app.add_typer(watch_app, name="watch")
    app.add_typer(send_app, name="send")


def send_event(socket_path: Path | None, job: str, fuzzer: str, kind: str,
               fields: dict[str, Any], event_id: str | None = None, ts: float | None = None,
               timeout: float = 10.0) -> str:  # fmt: skip
    """Send one event, wait for its acknowledgement, and return its id.

    Raises:
        PfClientError: the daemon is unreachable, refused the event, or did not ack in time.
    """
    client = Client(socket_path, job_id=job, fuzzer=fuzzer, timeout=timeout, fail_open=False)
    try:
        event_id = submit(client, kind, fields, ts=ts, event_id=event_id)
        client.flush()
    finally:
        client.timeout = min(timeout, 2.0)
        client.close()
    return event_id


def _run(socket_path: Path | None, job: str, fuzzer: str, kind: str, fields: dict[str, Any],
         event_id: str | None, ts: float | None, timeout: float) -> None:  # fmt: skip
    try:
        typer.echo(send_event(socket_path, job, fuzzer, kind, fields, event_id, ts, timeout))
    except PfClientError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@send_app.command("crash")
def send_crash(
    crash_type: Annotated[str, typer.Option("--type", help="e.g. SIGSEGV, heap-overflow")],
    input_file: Annotated[
        Path, typer.Option("--input", help="The crashing input (at most 10 MiB)")
    ],
    job: Job,
    fuzzer: Fuzzer = _DEFAULT_FUZZER,
    signal: Annotated[int, typer.Option("--signal")] = 0,
    exit_code: Annotated[int, typer.Option("--exit-code")] = 0,
    output: Annotated[str, typer.Option("--output", help="Program output")] = "",
    stack_trace: Annotated[str, typer.Option("--stack-trace")] = "",
    socket_path: Sock = None,
    event_id: EventId = None,
    ts: Ts = None,
    timeout: Timeout = 10.0,
) -> None:
    """Report a crash with its input; waits until the daemon stored it durably."""
    try:
        data = input_file.read_bytes()
    except OSError as exc:
        typer.echo(f"error: cannot read --input {input_file}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None
    fields = {"type": crash_type, "input": data, "signal": signal, "exit_code": exit_code,
              "output": output, "stack_trace": stack_trace}  # fmt: skip
    _run(socket_path, job, fuzzer, "crash", fields, event_id, ts, timeout)


@send_app.command("coverage")
def send_coverage(
    edges: Annotated[int, typer.Option("--edges")],
    job: Job,
    fuzzer: Fuzzer = _DEFAULT_FUZZER,
    new_edges: Annotated[int, typer.Option("--new-edges")] = 0,
    exec_count: Annotated[int, typer.Option("--exec-count")] = 0,
    socket_path: Sock = None,
    event_id: EventId = None,
    ts: Ts = None,
    timeout: Timeout = 10.0,
) -> None:
    """Report coverage."""
    fields = {"edges": edges, "new_edges": new_edges, "exec_count": exec_count}
    _run(socket_path, job, fuzzer, "coverage", fields, event_id, ts, timeout)


@send_app.command("corpus")
def send_corpus(
    files: Annotated[list[str], typer.Option("--file", "--files", help="A file (repeatable)")],
    job: Job,
    fuzzer: Fuzzer = _DEFAULT_FUZZER,
    total_size: Annotated[int, typer.Option("--total-size")] = 0,
    socket_path: Sock = None,
    event_id: EventId = None,
    ts: Ts = None,
    timeout: Timeout = 10.0,
) -> None:
    """Report new corpus files; waits until the daemon stored the update durably.

    Every --file must exist (exit 2 naming the first that does not).
    """
    for name in files:
        if not Path(name).is_file():
            why = "is not a file" if Path(name).exists() else "does not exist"
            typer.echo(f"error: --file {name} {why}", err=True)
            raise typer.Exit(2)
    fields = {"files": files, "total_size": total_size}
    _run(socket_path, job, fuzzer, "corpus", fields, event_id, ts, timeout)


@send_app.command("stats")
def send_stats(
    job: Job,
    fuzzer: Fuzzer = _DEFAULT_FUZZER,
    executions: Annotated[int, typer.Option("--executions")] = 0,
    exec_per_second: Annotated[float, typer.Option("--exec-per-second")] = 0.0,
    total_edges: Annotated[int, typer.Option("--total-edges")] = 0,
    covered_edges: Annotated[int, typer.Option("--covered-edges")] = 0,
    coverage_percent: Annotated[float, typer.Option("--coverage-percent")] = 0.0,
    unique_crashes: Annotated[int, typer.Option("--unique-crashes")] = 0,
    total_crashes: Annotated[int, typer.Option("--total-crashes")] = 0,
    corpus_size: Annotated[int, typer.Option("--corpus-size")] = 0,
    cpu_usage: Annotated[float, typer.Option("--cpu-usage")] = 0.0,
    memory_usage: Annotated[int, typer.Option("--memory-usage", help="Bytes")] = 0,
    socket_path: Sock = None,
    event_id: EventId = None,
    ts: Ts = None,
    timeout: Timeout = 10.0,
) -> None:
    """Report fuzzer statistics."""
    fields = {"executions": executions, "exec_per_second": exec_per_second,
              "total_edges": total_edges, "covered_edges": covered_edges,
              "coverage_percent": coverage_percent, "unique_crashes": unique_crashes,
              "total_crashes": total_crashes, "corpus_size": corpus_size,
              "cpu_usage": cpu_usage, "memory_usage": memory_usage}  # fmt: skip
    _run(socket_path, job, fuzzer, "stats", fields, event_id, ts, timeout)


def _lifecycle_command(kind: str) -> None:
    def command(
        job: Job,
        fuzzer: Fuzzer = _DEFAULT_FUZZER,
        message: Annotated[str, typer.Option("--message")] = "",
        socket_path: Sock = None,
        event_id: EventId = None,
        ts: Ts = None,
        timeout: Timeout = 10.0,
    ) -> None:
        _run(socket_path, job, fuzzer, kind, {"message": message}, event_id, ts, timeout)

    command.__doc__ = f"Report the lifecycle event {kind!r}."
    send_app.command(kind)(command)


for _kind in sorted(LIFECYCLE_KINDS):
    _lifecycle_command(_kind.value)
