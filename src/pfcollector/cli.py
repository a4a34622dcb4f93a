"""The ``pfcollector`` command line. Thin: parse, build the config, call the daemon or ask it.

A daemon that cannot be reached is a one-line error and exit code 1, never a traceback;
a bad setting is a one-line error naming the key and exit code 2.

``serve`` and ``config show`` take the same setting flags (one signature, :func:`_setting_flags`,
given to both by :func:`_with_setting_flags`), so ``config show`` prints exactly what ``serve``
would run with. Precedence: flag > ``PFCOLLECTOR_<KEY>`` > TOML file > default
(:mod:`pfcollector.config`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import trio
import typer
import typer.core
import typer.main

from . import __version__
from .bugview import register_bugs
from .config import Config, ConfigError, Loaded, check_file, load
from .control import DaemonUnreachable, request
from .logs import setup_logging
from .private import NotPrivate, check_private, serve_umask
from .statusview import format_bytes, format_status, format_watch, printable, printable_tree
from .tools import register_tools

__all__ = ["app", "main"]

app = typer.Typer(
    name="pfcollector",
    help="Local result collector for PandaFuzz fuzzing bots.",
    no_args_is_help=True,
    add_completion=False,
)
dead_letters_app = typer.Typer(help="Batches the master refused as poison.", no_args_is_help=True)
app.add_typer(dead_letters_app, name="dead-letters")
config_app = typer.Typer(
    help="The effective settings and where they come from; check a settings file.",
    no_args_is_help=True,
)
app.add_typer(config_app, name="config")
spool_app = typer.Typer(help="The durable spool on disk.", no_args_is_help=True)
app.add_typer(spool_app, name="spool")
register_tools(app)  # pfcollector watch afl|libfuzzer, pfcollector send KIND
register_bugs(app)  # pfcollector bugs [--job J]

SocketOpt = Annotated[
    Path | None,
    typer.Option(
        "--socket",
        help="Daemon socket [default: $PFCOLLECTOR_SOCKET, "
        "$XDG_RUNTIME_DIR/pfcollector.sock, or /tmp/pfcollector-<uid>/pfcollector.sock]",
    ),
]


def _ask(socket_path: Path | None, op: str, args: dict[str, Any] | None = None) -> Any:
    try:
        return request(socket_path, op, args)
    except DaemonUnreachable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except RuntimeError as exc:
        typer.echo(f"error: {printable(str(exc))}", err=True)
        raise typer.Exit(1) from None


# -- settings flags, shared by `serve` and `config show` -----------------------------------

_PANEL = "Settings (flag > PFCOLLECTOR_<KEY> > config file > default)"


def _flag(*decls: str, help: str) -> Any:
    return typer.Option(*decls, help=help, rich_help_panel=_PANEL, show_default=False)


def _setting_flags(
    config_file: Annotated[
        Path | None,
        _flag(
            "--config",
            help="TOML settings file [default: $PFCOLLECTOR_CONFIG, else "
            "/etc/pfcollector/pfcollector.toml, else $XDG_CONFIG_HOME/pfcollector/config.toml, "
            "the first that exists]",
        ),
    ] = None,
    socket_path: Annotated[
        Path | None,
        _flag(
            "--socket",
            help="Daemon socket [$PFCOLLECTOR_SOCKET, $XDG_RUNTIME_DIR/pfcollector.sock, "
            "or /tmp/pfcollector-<uid>/pfcollector.sock]",
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        _flag("--data-dir", help="Spool and crash inputs [$XDG_DATA_HOME/pfcollector]"),
    ] = None,
    master_url: Annotated[
        str | None, _flag("--master", help="PandaFuzz master URL [none: local mode]")
    ] = None,
    bot_id: Annotated[str | None, _flag("--bot-id", help="Bot id to report as")] = None,
    register: Annotated[
        bool | None,
        _flag("--register/--no-register", help="Register with the master for a bot id"),
    ] = None,
    token_file: Annotated[
        Path | None,
        _flag(
            "--token-file",
            help="File holding the bearer token for a master behind a proxy "
            "[$PFCOLLECTOR_TOKEN_FILE; or $PFCOLLECTOR_TOKEN]",
        ),
    ] = None,
    delivery_mode: Annotated[
        str | None, _flag("--delivery-mode", help="batch or item [batch]")
    ] = None,
    batch_size: Annotated[int | None, _flag("--batch-size", help="Events per batch [100]")] = None,
    batch_bytes: Annotated[int | None, _flag("--batch-bytes", help="Bytes per batch [960 KiB]")] = (
        None
    ),
    flush_interval: Annotated[
        float | None, _flag("--flush-interval", help="Seconds a batch may wait [10]")
    ] = None,
    drain_deadline: Annotated[
        float | None, _flag("--drain-deadline", help="Seconds to deliver at shutdown [30]")
    ] = None,
    spool_max_bytes: Annotated[
        int | None, _flag("--spool-max-bytes", help="Spool size limit [1 GiB]")
    ] = None,
    max_connections: Annotated[
        int | None, _flag("--max-connections", help="Client connections at most [256]")
    ] = None,
    memory_budget: Annotated[
        int | None,
        _flag("--memory-budget", help="Bytes held in memory at most, producers wait [256 MiB]"),
    ] = None,
    senders: Annotated[int | None, _flag("--senders", help="Delivery workers [4]")] = None,
    retry_attempts: Annotated[
        int | None, _flag("--retry-attempts", help="Attempts per request [4]")
    ] = None,
    retry_base: Annotated[
        float | None, _flag("--retry-base", help="First retry window, seconds [0.5]")
    ] = None,
    retry_cap: Annotated[
        float | None, _flag("--retry-cap", help="Largest retry window, seconds [30]")
    ] = None,
    breaker_reset: Annotated[
        float | None, _flag("--breaker-reset", help="First open period, seconds [1]")
    ] = None,
    http_timeout: Annotated[
        float | None, _flag("--http-timeout", help="Seconds per request [10]")
    ] = None,
    coalesce: Annotated[
        bool | None,
        _flag("--coalesce/--no-coalesce", help="Merge stats and coverage between flushes [on]"),
    ] = None,
    crash_dedupe: Annotated[
        str | None,
        _flag("--crash-dedupe", help="One crash per bug, per input, or all: bug|input|off [bug]"),
    ] = None,
    log_level: Annotated[
        str | None, _flag("--log-level", help="debug, info, warning or error [info]")
    ] = None,
    log_format: Annotated[
        str | None, _flag("--log-format", help="kv (key=value) or json [kv]")
    ] = None,
    metrics_addr: Annotated[
        str | None,
        _flag("--metrics-addr", help="Serve Prometheus metrics on HOST:PORT [off]"),
    ] = None,
    compression: Annotated[
        str | None,
        _flag(
            "--compression",
            help="none, gzip or zstd [none: the PandaFuzz master refuses compressed bodies]",
        ),
    ] = None,
    compression_threshold: Annotated[
        int | None,
        _flag("--compression-threshold", help="Compress bodies of at least N bytes [1024]"),
    ] = None,
) -> None:
    """The flags every setting command takes (only the signature is used)."""


_SETTINGS = inspect.signature(_setting_flags, eval_str=True)


def _with_setting_flags(func: Callable[..., None]) -> Callable[..., None]:
    """Give a command every setting flag; they reach it as ``settings`` (name to value)."""
    own = inspect.signature(func, eval_str=True)
    params = [p for name, p in own.parameters.items() if name != "settings"]
    params += list(_SETTINGS.parameters.values())

    @functools.wraps(func)
    def command(**kwargs: Any) -> None:
        settings = {name: kwargs.pop(name) for name in _SETTINGS.parameters}
        func(settings=settings, **kwargs)

    command.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return command


def _load(settings: dict[str, Any]) -> tuple[Loaded, Callable[[], Config]]:
    """The effective configuration (or exit 2 naming the key), and how to read it again."""
    flags = {k: v for k, v in settings.items() if k != "config_file" and v is not None}
    config_file: Path | None = settings.get("config_file")
    try:
        loaded = load(flags, config_file=config_file)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return loaded, lambda: load(flags, config_file=config_file).config


@app.command()
@_with_setting_flags
def serve(
    settings: dict[str, Any],
    fix_permissions: Annotated[
        bool,
        typer.Option(
            "--fix-permissions",
            help="Take other users' access away from the data directory instead of refusing",
        ),
    ] = False,
) -> None:
    """Run the daemon (local mode unless a master is configured).

    SIGHUP re-reads the settings (batch_size, flush_interval and log_level change at once;
    the rest need a restart). SIGTERM/SIGINT stop accepting, drain for up to
    drain_deadline seconds, and exit 0. Under systemd socket activation (LISTEN_FDS) the
    daemon listens on the socket it is given instead of binding one.
    """
    from .activation import ActivationError
    from .sockdir import AddressInUse
    from .spool import SpoolCorrupt

    loaded, reload = _load(settings)
    config = loaded.config
    setup_logging(config.log_level, config.log_format)
    log = logging.getLogger(__name__)
    log.info("settings file: %s", loaded.file or "none")
    for warning in loaded.warnings:
        log.warning("%s", warning)
    os.umask(serve_umask(config.socket_gid is not None))  # files private (docs/security.md)
    try:
        if fixed := check_private(config.data_dir, fix=fix_permissions):
            log.warning("took other users' access away from %d entries under %s", fixed,
                        config.data_dir)  # fmt: skip
    except (NotPrivate, OSError) as exc:
        typer.echo(f"error: {_one_line(exc)}", err=True)
        raise typer.Exit(1) from None
    known = (AddressInUse, SpoolCorrupt, ActivationError, OSError)  # DataDirLocked: an OSError
    try:
        trio.run(_run_daemon, config, reload)
    except BaseExceptionGroup as group:
        leaf = _first_leaf(group)
        if not isinstance(leaf, known):
            raise
        typer.echo(f"error: {_one_line(leaf)}", err=True)
        raise typer.Exit(1) from None
    except known as exc:
        typer.echo(f"error: {_one_line(exc)}", err=True)
        raise typer.Exit(1) from None


async def _run_daemon(config: Config, reload: Callable[[], Config]) -> None:
    from .daemon import Daemon

    daemon = Daemon(config)
    daemon.config_loader = reload
    await daemon.run()


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename is None:  # AddressInUse(errno, message): the message without "[Errno 98]"
            return exc.strerror
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


# -- config ----------------------------------------------------------------------------------


@config_app.command("show")
@_with_setting_flags
def config_show(
    settings: dict[str, Any],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Print the effective settings and where each came from.

    Takes the flags of `serve`, so it shows exactly what `serve` would run with. The text
    output is valid TOML (secrets masked), fit to start a settings file from.
    """
    loaded, _ = _load(settings)
    public = loaded.config.public()
    if as_json:
        out = {
            "file": str(loaded.file) if loaded.file else None,
            "warnings": list(loaded.warnings),
            "settings": {k: {"value": public[k], "source": s} for k, s in loaded.sources.items()},
        }
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"# settings file: {loaded.file or 'none'}")
    typer.echo("# precedence: flag > environment PFCOLLECTOR_<KEY> > file > default")
    for warning in loaded.warnings:
        typer.echo(f"# warning: {warning}")
    for key, source in loaded.sources.items():
        value = public[key]
        line = f"# {key} (unset)" if value is None else f"{key} = {_toml_value(key, value)}"
        typer.echo(f"{line:<56} # {source}")


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="The TOML settings file", show_default=False)],
) -> None:
    """Check a settings file on its own: syntax, keys, types and allowed values."""
    errors = check_file(file)
    for exc in errors:
        typer.echo(f"error: {exc}", err=True)
    if errors:
        raise typer.Exit(2)
    typer.echo(f"{file}: ok")


def _toml_value(key: str, value: Any) -> str:
    if key == "socket_mode":
        return str(value)  # "0o660" is an octal integer in TOML
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


# -- asking the daemon -----------------------------------------------------------------------


@app.command()
def status(
    socket_path: SocketOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Stable machine-readable output")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="A live view, refreshed in place until Ctrl-C")
    ] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes (--watch)")] = 2.0,
    count: Annotated[int | None, typer.Option(hidden=True, help="Stop after N frames")] = None,
) -> None:
    """Ask the running daemon how it is doing."""
    result = _ask(socket_path, "status")
    if watch:
        _watch(socket_path, result, max(0.1, interval), count)
        return
    typer.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else format_status(result))


def _watch(
    socket_path: Path | None, first: dict[str, Any], interval: float, count: int | None
) -> None:
    """Refresh until Ctrl-C (or ``count`` frames); a daemon gone away is shown, and retried."""
    tty = sys.stdout.isatty()
    prev: dict[str, Any] | None = None
    cur = first
    problem: str | None = None
    shown = 0
    try:
        while True:
            frame = format_watch(prev, cur, problem)
            typer.echo(("\x1b[H\x1b[2J" + frame) if tty else frame + "\n")
            shown += 1
            if count is not None and shown >= count:
                return
            time.sleep(interval)
            try:
                latest = request(socket_path, "status")
            except (DaemonUnreachable, RuntimeError) as exc:
                problem = f"{exc} (retrying every {interval:g}s)"
                continue
            prev, cur, problem = cur, latest, None
    except KeyboardInterrupt:
        return


@app.command()
def tune(
    socket_path: SocketOpt = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Events per batch, 1..10000 (setting batch_size)", show_default=False),
    ] = None,
    flush_interval: Annotated[
        float | None,
        typer.Option(
            help="Seconds a batch may wait, 0.1..3600 (setting flush_interval)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Change the batch size or flush interval of the running daemon.

    Lasts until the daemon restarts or re-reads its settings (SIGHUP). Prints the batching in
    force afterwards.
    """
    args = {
        k: v
        for k, v in (("batch_size", batch_size), ("flush_interval", flush_interval))
        if v is not None
    }
    typer.echo(json.dumps(_ask(socket_path, "tune", args)))


@app.command()
def flush(socket_path: SocketOpt = None) -> None:
    """Send what is ready now, once, instead of at the flush interval.

    Events waiting for a retry keep their backoff and the master's Retry-After.
    """
    result = _ask(socket_path, "flush")
    if not isinstance(result, dict) or "breaker" not in result:
        reason = result.get("reason") if isinstance(result, dict) else None
        typer.echo(f"nothing to flush: {reason or 'the daemon did not say why'}")
        return
    line = "flushing"
    if result.get("waiting_retry"):
        line += f"; {result['waiting_retry']} event(s) wait for their retry delay"
    typer.echo(line)
    if result.get("reason"):
        typer.echo(f"warning: {result['reason']}", err=True)


@dead_letters_app.command("list")
def dead_letters_list(
    socket_path: SocketOpt = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most N, newest first")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Show the dead letters with the master's answer."""
    rows = _ask(socket_path, "dead_letters", {"limit": limit})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no dead letters")
    for row in printable_tree(rows):  # the error is the master's text: no terminal escapes
        typer.echo(
            f"{row['id']}  {row['kind']:<8} job={row['job_id']}  "
            f"status={row['status']}  {row['error'][:120]}"
        )


@dead_letters_app.command("retry")
def dead_letters_retry(
    socket_path: SocketOpt = None,
    ids: Annotated[list[str] | None, typer.Option("--id", help="Only these (repeatable)")] = None,
) -> None:
    """Put dead letters back in line for delivery (after fixing what the master refused).

    Exit 1 if an --id names no dead letter (the others are requeued all the same).
    """
    result = _ask(socket_path, "dead_letters_retry", {"ids": ids} if ids else {})
    unknown = result.get("unknown") or []
    if result["requeued"] or not unknown:
        typer.echo(
            f"requeued {result['requeued']} event(s)" if result["requeued"] else
            "no dead letters: nothing requeued"
        )  # fmt: skip
    if unknown:
        typer.echo(f"error: no dead letter with id {', '.join(map(repr, unknown))}", err=True)
        raise typer.Exit(1)


@spool_app.command("check")
def spool_check(
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Data directory [default: as serve: $PFCOLLECTOR_DATA_DIR, ...]"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Check the spool's integrity and count what it holds (read-only; safe while running).

    Exit 0 when the spool is sound, 1 when it is missing, unreadable or corrupt.
    """
    from .config import default_data_dir
    from .spoolfile import check_spool

    try:  # the data directory as serve resolves it: flag, env, settings file, default
        resolved = load({"data_dir": data_dir}).config.data_dir
    except ConfigError:
        resolved = data_dir or default_data_dir()
    report = check_spool(resolved / "spool.db")
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
    elif not report["ok"] and not report["exists"]:
        typer.echo(f"error: spool {report['path']}: {report['integrity']}", err=True)
    else:
        typer.echo(f"spool {report['path']}: {report['integrity']}")
        if report["exists"] and "kinds" in report:
            typer.echo(f"file: {format_bytes(report['file_bytes'])} on disk")
            for kind, row in sorted(report["kinds"].items()):
                typer.echo(
                    f"  {kind:<9} {row['events']:>10} events {format_bytes(row['bytes']):>12}"
                )
            for kind, n in sorted(report["dead_letters"].items()):
                typer.echo(f"  {kind:<9} {n:>10} dead letters")
    if not report["ok"]:
        raise typer.Exit(1)


@app.command("dev-master")
def dev_master(
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one)")] = 8080,
    db: Annotated[str | None, typer.Option(help="SQLite file (default: in memory)")] = None,
    accept_compression: Annotated[
        bool,
        typer.Option(
            help="Decode gzip/zstd request bodies (the PandaFuzz master answers 400 to them)"
        ),
    ] = False,
    cost_per_item: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=10.0,
            metavar="SECONDS",
            help="Seconds each stored result costs, writes serialised: 0.00023 makes this "
            "master as slow as the PandaFuzz master (23 ms per batch of 100 crashes)",
        ),
    ] = 0.0,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No line per request on stdout")
    ] = False,
) -> None:
    """Run the reference PandaFuzz master (for trying pfcollector and for tests).

    Prints one line per request (time, method, path, status, items). What it stored:
    GET /_dev/stats (counts per kind) and GET /_dev/rows?kind=crash|coverage|corpus|status.
    Faults: POST /_dev/fail_next {"n": 2, "status": 503}, /_dev/down_for {"seconds": 5},
    /_dev/slow, /_dev/reject_ids, /_dev/partial_fail_ids, /_dev/reset_next, /_dev/clear
    (docs/operations.md, "The reference master").
    """
    import sqlite3

    from .devmaster import serve as serve_master

    try:
        serve_master(
            host,
            port,
            db,
            accept_compression=accept_compression,
            cost_per_item=cost_per_item,
            quiet=quiet,
        )
    except sqlite3.Error as exc:
        typer.echo(f"error: cannot open --db {db}: {exc}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        typer.echo(f"error: cannot serve on {host}:{port}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"pfcollector {__version__}")


# -- the boundary: every user mistake is one line on stderr, never a traceback -------------


def _version_flag(value: bool) -> None:
    if value:
        typer.echo(f"pfcollector {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit", is_eager=True, callback=_version_flag
        ),
    ] = False,
) -> None:
    """Local result collector for PandaFuzz fuzzing bots."""


def command() -> Any:
    """The click command behind :data:`app`, with its help tidied: no ``<bool>`` label on a
    flag, and brackets in help texts shown as written (rich would read ``[default: x]`` as
    markup and drop it)."""
    root = typer.main.get_command(app)
    rich_markup = getattr(typer.core, "HAS_RICH", False) and (
        getattr(root, "rich_markup_mode", None) == "rich"
    )
    _tidy(root, set(), rich_markup)
    return root


def _tidy(cmd: Any, seen: set[int], rich_markup: bool) -> None:
    if id(cmd) in seen:
        return
    seen.add(id(cmd))
    params = list(getattr(cmd, "params", ()))
    with contextlib.suppress(Exception):  # --help itself (made per command, then cached)
        params.append(cmd.get_help_option(cmd.context_class(cmd, info_name=cmd.name)))
    for param in params:
        if param is None:
            continue
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""  # a flag takes no value: no type to show
        if rich_markup and getattr(param, "help", None):
            param.help = param.help.replace("[", "\\[")
    for sub in getattr(cmd, "commands", {}).values():
        _tidy(sub, seen, rich_markup)


def run(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    A usage mistake (unknown option, a value of the wrong type, a missing argument) is one
    line, ``error: ... (see 'pfcollector CMD --help')``, exit 2; a file or directory problem
    that reaches this far is one line, exit 1. Only a bug shows a traceback.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    root = command()
    try:
        result = root.main(args=args, prog_name="pfcollector", standalone_mode=False)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"error: {where}{exc.strerror or exc}", err=True)
        return 1
    except Exception as exc:
        code = getattr(exc, "exit_code", None)
        if not isinstance(code, int) or not hasattr(exc, "format_message"):
            if type(exc).__name__ == "Abort":
                typer.echo("error: aborted", err=True)
                return 1
            raise  # not a usage error: a bug, shown as one
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # `pfcollector` alone: the help
            text = exc.format_message()  # rich help was printed already: this is then empty
            if text.strip():
                typer.echo(text, err=True)
            return code
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = " ".join(exc.format_message().split())  # one line, whatever click wrote
        typer.echo(f"error: {message}{hint}", err=True)
        return code
    return result if isinstance(result, int) else 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
