"""``pfcollector watch afl|libfuzzer``: the sidecars that turn fuzzer output into events."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..logs import setup_logging
from ._afl import AflWatcher
from ._libfuzzer import LibFuzzerWatcher
from ._reproduce import Limits, Reproducer, ReproduceRefused
from ._run import run_loop
from ._sink import Sink
from ._state import StateError, StateFile, default_state_path

__all__ = ["watch_app"]

watch_app = typer.Typer(
    help="Follow a fuzzer's output directory and report what it finds.", no_args_is_help=True
)

JobOpt = Annotated[str, typer.Option("--job", envvar="PFCOLLECTOR_JOB", help="Job id")]
SocketOpt = Annotated[
    Path | None, typer.Option("--socket", help="Daemon socket (default: as pfcollector serve)")
]
StateOpt = Annotated[
    Path | None,
    typer.Option(
        "--state",
        help="State file [default: <data dir>/watch/<kind>-<digest>.json]",
        show_default=False,
    ),
]
IntervalOpt = Annotated[float, typer.Option("--interval", min=0.0, help="Seconds between scans")]
SettleOpt = Annotated[
    float, typer.Option("--settle", min=0.0, help="Ignore files modified less than this ago (s)")
]
OnceOpt = Annotated[bool, typer.Option("--once", help="Scan once and exit (1 if no daemon)")]
LogLevelOpt = Annotated[str, typer.Option("--log-level")]


DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="The daemon's data directory, for the state file [default: asked of the daemon, "
        "else as pfcollector serve: $PFCOLLECTOR_DATA_DIR, settings file, "
        "$XDG_DATA_HOME/pfcollector]",
        show_default=False,
    ),
]


def data_dir_of(flag: Path | None, socket_path: Path | None) -> Path:
    """Where the daemon keeps its data: ``--data-dir``, else the running daemon's answer, else
    what ``pfcollector serve`` would use (environment, settings file, default)."""
    from ..config import ConfigError, default_data_dir, load
    from ..control import DaemonUnreachable, request

    if flag is not None:
        return flag
    try:
        return Path(request(socket_path, "status", timeout=2.0)["config"]["data_dir"])
    except (DaemonUnreachable, RuntimeError, KeyError, TypeError):
        pass
    try:
        return load({}).config.data_dir
    except ConfigError:
        return default_data_dir()


def _state(
    path: Path | None,
    kind: str,
    watched: Path,
    job: str,
    data_dir: Path | None = None,
    socket_path: Path | None = None,
) -> StateFile:
    try:
        if path is None:
            path = default_state_path(kind, watched, job, data_dir_of(data_dir, socket_path))
        return StateFile(path, watched)
    except StateError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _watched_dir(path: Path, what: str) -> None:
    """A file where a directory is expected is the user's mistake: one line, exit 2. A
    directory that does not exist yet is waited for (the watcher warns now and then)."""
    if path.exists() and not path.is_dir():
        typer.echo(f"error: {what} {path} is not a directory", err=True)
        raise typer.Exit(2)


def _logging(level: str) -> None:
    setup_logging(level, "kv")  # the daemon's key=value log lines


@watch_app.command("afl")
def watch_afl(
    output_dir: Annotated[Path, typer.Argument(help="afl-fuzz -o directory")],
    job: JobOpt,
    socket_path: SocketOpt = None,
    state: StateOpt = None,
    interval: IntervalOpt = 2.0,
    settle: SettleOpt = 1.0,
    once: OnceOpt = False,
    log_level: LogLevelOpt = "info",
    data_dir: DataDirOpt = None,
    reproduce: Annotated[
        bool, typer.Option("--reproduce", help="Re-run the target on each crash for its report")
    ] = False,
    reproduce_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a reproduction may take")
    ] = 10.0,
    reproduce_memory_mb: Annotated[
        int, typer.Option(min=16, help="Memory a reproduction may use (MiB)")
    ] = 2048,
) -> None:
    """Follow every AFL++ instance under OUTPUT_DIR: crashes, queue, fuzzer_stats."""
    _watched_dir(output_dir, "AFL++ output directory")
    _logging(log_level)
    reproducer = None
    if reproduce:
        try:
            reproducer = Reproducer(output_dir, Limits(reproduce_timeout, reproduce_memory_mb))
        except (ReproduceRefused, OSError) as exc:
            typer.echo(f"error: --reproduce: {exc}", err=True)
            raise typer.Exit(2) from None
    sink = Sink(socket_path, job)
    st = _state(state, "afl", output_dir, job, data_dir, socket_path)
    watcher = AflWatcher(output_dir, sink, st, settle, reproducer=reproducer)
    if not run_loop(watcher.scan, sink, interval, once=once):
        raise typer.Exit(1)


@watch_app.command("libfuzzer")
def watch_libfuzzer(
    artifact_dir: Annotated[Path, typer.Argument(help="libFuzzer -artifact_prefix directory")],
    job: JobOpt,
    log: Annotated[Path | None, typer.Option("--log", help="libFuzzer's stderr log")] = None,
    fuzzer: Annotated[str, typer.Option("--fuzzer", help="Fuzzer name")] = "libfuzzer",
    socket_path: SocketOpt = None,
    state: StateOpt = None,
    interval: IntervalOpt = 2.0,
    settle: SettleOpt = 1.0,
    once: OnceOpt = False,
    log_level: LogLevelOpt = "info",
    data_dir: DataDirOpt = None,
) -> None:
    """Turn libFuzzer artifacts into crashes and its log's status lines into stats/coverage."""
    _watched_dir(artifact_dir, "libFuzzer artifact directory")
    if log is not None and log.is_dir():
        typer.echo(f"error: libFuzzer log {log} is a directory, not a file", err=True)
        raise typer.Exit(2)
    _logging(log_level)
    sink = Sink(socket_path, job)
    st = _state(state, "libfuzzer", artifact_dir, job, data_dir, socket_path)
    watcher = LibFuzzerWatcher(artifact_dir, sink, st, log, fuzzer=fuzzer, settle=settle)
    if not run_loop(watcher.scan, sink, interval, once=once):
        raise typer.Exit(1)
