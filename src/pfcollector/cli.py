"""The ``pfcollector`` command line. Thin: parse, build the config, call the daemon or ask it.

A daemon that cannot be reached is a one-line error and exit code 1, never a traceback;
a bad setting is a one-line error naming the key and exit code 2.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import msgpack
import trio
import typer

from . import __version__
from .config import Config, ConfigError, default_socket_path
from .protocol import HEADER_SIZE, Control, ErrorMsg, Reply, encode, parse_server_message

__all__ = ["DaemonUnreachable", "app", "format_status", "main", "request"]

app = typer.Typer(
    name="pfcollector",
    help="Local result collector for PandaFuzz fuzzing bots.",
    no_args_is_help=True,
    add_completion=False,
)
dead_letters_app = typer.Typer(help="Batches the master refused as poison.", no_args_is_help=True)
app.add_typer(dead_letters_app, name="dead-letters")

SocketOpt = Annotated[
    Path | None,
    typer.Option(
        "--socket",
        help="Daemon socket [default: $PFCOLLECTOR_SOCKET, "
        "$XDG_RUNTIME_DIR/pfcollector.sock, or /tmp/pfcollector-<uid>.sock]",
    ),
]


class DaemonUnreachable(Exception):
    """No daemon answers on the socket. The message names the path and the reason."""


def request(
    socket_path: Path | None, op: str, args: dict[str, Any] | None = None, timeout: float = 5.0
) -> Any:
    """Send one control request to the daemon and return its result.

    Error handling:
        :class:`DaemonUnreachable` when nothing answers; ``RuntimeError`` with the daemon's
        message when it answers with an error.
    """
    path = socket_path or default_socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise DaemonUnreachable(
                f"no pfcollector daemon at {path}: {exc.strerror or exc}"
            ) from None
        sock.sendall(encode(Control(1, op, args or {})))
        while True:
            (length,) = struct.unpack(">I", _recv_exact(sock, HEADER_SIZE, path))
            msg = parse_server_message(msgpack.unpackb(_recv_exact(sock, length, path), raw=False))
            if isinstance(msg, Reply) and msg.req == 1:
                if not msg.ok:
                    raise RuntimeError(msg.error or "the daemon refused the request")
                return msg.result
            if isinstance(msg, ErrorMsg):
                raise RuntimeError(f"{msg.code}: {msg.message}")
    except TimeoutError:
        raise DaemonUnreachable(f"the daemon at {path} did not answer within {timeout}s") from None
    finally:
        sock.close()


def _recv_exact(sock: socket.socket, n: int, path: Path) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise DaemonUnreachable(f"the daemon at {path} closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _ask(socket_path: Path | None, op: str, args: dict[str, Any] | None = None) -> Any:
    try:
        return request(socket_path, op, args)
    except DaemonUnreachable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def serve(
    socket_path: SocketOpt = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Spool and crash inputs [default: "
            "$PFCOLLECTOR_DATA_DIR or ~/.local/share/pfcollector]"
        ),
    ] = None,
    master: Annotated[
        str | None, typer.Option(help="PandaFuzz master URL; none = local mode")
    ] = None,
    bot_id: Annotated[str | None, typer.Option(help="Bot id to report as")] = None,
    register: Annotated[bool, typer.Option(help="Register with the master for a bot id")] = False,
    token: Annotated[
        str | None,
        typer.Option(envvar="PFCOLLECTOR_TOKEN", help="Bearer token for a master behind a proxy"),
    ] = None,
    delivery_mode: Annotated[str, typer.Option(help="batch or item")] = "batch",
    batch_size: Annotated[int, typer.Option()] = 100,
    flush_interval: Annotated[float, typer.Option(help="Seconds")] = 10.0,
    drain_deadline: Annotated[float, typer.Option(help="Seconds to deliver at shutdown")] = 30.0,
    spool_max_bytes: Annotated[int, typer.Option()] = 1024**3,
    max_connections: Annotated[int, typer.Option()] = 256,
    retry_base: Annotated[float, typer.Option()] = 0.5,
    retry_cap: Annotated[float, typer.Option()] = 30.0,
    breaker_reset: Annotated[float, typer.Option()] = 1.0,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Run the daemon (local mode unless --master is given)."""
    from .daemon import run_daemon
    from .server import AddressInUse
    from .spool import SpoolCorrupt

    _setup_logging(log_level)
    values: dict[str, Any] = dict(
        master_url=master,
        bot_id=bot_id,
        register=register,
        token=token,
        delivery_mode=delivery_mode,
        batch_size=batch_size,
        flush_interval=flush_interval,
        drain_deadline=drain_deadline,
        spool_max_bytes=spool_max_bytes,
        max_connections=max_connections,
        retry_base=retry_base,
        retry_cap=retry_cap,
        breaker_reset=breaker_reset,
    )
    if socket_path is not None:
        values["socket_path"] = socket_path
    if data_dir is not None:
        values["data_dir"] = data_dir
    try:
        config = Config(**values)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        trio.run(run_daemon, config)
    except (AddressInUse, SpoolCorrupt, PermissionError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def status(
    socket_path: SocketOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Stable machine-readable output")] = False,
) -> None:
    """Ask the running daemon how it is doing."""
    result = _ask(socket_path, "status")
    typer.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else format_status(result))


@app.command()
def tune(
    socket_path: SocketOpt = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    flush_interval: Annotated[float | None, typer.Option()] = None,
) -> None:
    """Change the batch size or flush interval of the running daemon."""
    args = {
        k: v
        for k, v in (("batch_size", batch_size), ("flush_interval", flush_interval))
        if v is not None
    }
    typer.echo(json.dumps(_ask(socket_path, "tune", args)))


@app.command()
def flush(socket_path: SocketOpt = None) -> None:
    """Send every pending batch now instead of at the flush interval."""
    _ask(socket_path, "flush")
    typer.echo("flushing")


@dead_letters_app.command("list")
def dead_letters_list(
    socket_path: SocketOpt = None,
    limit: Annotated[int, typer.Option()] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the dead letters with the master's answer."""
    rows = _ask(socket_path, "dead_letters", {"limit": limit})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no dead letters")
    for row in rows:
        typer.echo(
            f"{row['id']}  {row['kind']:<8} job={row['job_id']}  "
            f"status={row['status']}  {row['error'][:120]}"
        )


@dead_letters_app.command("retry")
def dead_letters_retry(
    socket_path: SocketOpt = None,
    ids: Annotated[list[str] | None, typer.Option("--id", help="Only these (repeatable)")] = None,
) -> None:
    """Put dead letters back in line for delivery (after fixing what the master refused)."""
    result = _ask(socket_path, "dead_letters_retry", {"ids": ids} if ids else {})
    typer.echo(f"requeued {result['requeued']} event(s)")


@app.command("dev-master")
def dev_master(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8080,
    db: Annotated[str | None, typer.Option(help="SQLite file (default: in memory)")] = None,
) -> None:
    """Run the reference PandaFuzz master (for trying pfcollector and for tests)."""
    from .devmaster import serve as serve_master

    serve_master(host, port, db)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"pfcollector {__version__}")


def format_status(s: dict[str, Any]) -> str:
    """The human view of a status reply: a few readable tables."""
    cfg, conns, spool = s["config"], s["connections"], s["spool"]
    where = "local mode (no master)" if s["mode"] == "local" else f"master {cfg['master_url']}"
    lines = [
        f"pfcollector {s['version']}  pid {s['pid']}  up {s['uptime_s']:.0f}s  {where}",
        f"connections: {conns['current']} now, {conns['total']} total (max {conns['max']})",
        f"queue: {s['queue']['depth']}/{s['queue']['capacity']}   "
        f"spool: {spool['events']} events, {_bytes(spool['bytes'])} of "
        f"{_bytes(spool['max_bytes'])}  ({spool['path']})",
        f"batch size {cfg['batch_size']}, flush every {cfg['flush_interval']}s, "
        f"data dir {cfg['data_dir']}",
        "",
        f"{'kind':<9}{'received':>10}{'accepted':>10}{'rejected':>10}{'spooled':>10}"
        f"{'delivered':>11}{'retried':>9}{'dead':>7}{'dropped':>9}{'oldest':>9}",
    ]
    for kind, ev in s["events"].items():
        sp = spool["kinds"].get(kind, {})
        age = sp.get("oldest_age_s")
        lines.append(
            f"{kind:<9}{ev['received']:>10}{ev['accepted']:>10}{ev['rejected']:>10}"
            f"{sp.get('spooled', 0):>10}{sp.get('delivered', 0):>11}{sp.get('retried', 0):>9}"
            f"{sp.get('dead_letters', 0):>7}{sp.get('dropped', 0):>9}"
            f"{'-' if age is None else f'{age:.0f}s':>9}"
        )
    delivery = s.get("delivery")
    if delivery:
        br, snd = delivery["breaker"], delivery["sender"]
        lines += ["", f"bot {delivery['bot_id']} ({delivery['mode']} mode), breaker {br['state']}"]
        lines.append(f"last success: {_when(snd['last_success']['wall'])}")
        err = snd["last_error"]
        lines.append(f"last error:   {_when(err['wall'])}  {err['text'] or ''}".rstrip())
    if conns["live"]:
        lines += ["", f"{'conn':>5} {'pid':>8} {'uid':>6}  {'events':>8}  job / fuzzer"]
        for c in conns["live"]:
            lines.append(
                f"{c['id']:>5} {c['pid']:>8} {c['uid']:>6}  {c['events']:>8}  "
                f"{c['job_id'] or '-'} / {c['fuzzer'] or '-'}"
            )
    return "\n".join(lines)


def _when(wall: float | None) -> str:
    if wall is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))
    return f"{stamp} ({max(0.0, time.time() - wall):.0f}s ago)"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage().replace('"', "'")
        line = (
            f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')} level={record.levelname.lower()} "
            f'logger={record.name} msg="{msg}"'
        )
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)


def main() -> None:
    """Console-script entry point."""
    app()
