"""The reference master's server: a threaded HTTP listener that can really go down and up.

``down`` closes the listening socket (clients get connection refused) and every open
connection (pooled keep-alive connections break too, as when a real master dies); ``up`` binds
the same port again (``SO_REUSEADDR``) with a fresh listener, keeping the database and faults.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Final

from ._faults import Faults
from ._handler import App, Handler
from ._store import Store

__all__ = ["DevMaster", "main", "serve"]

#: How often an idle listener checks for shutdown: bounds how long ``down`` takes.
_POLL_INTERVAL_S: Final = 0.02
#: How long ``stop`` waits for handler threads to end after their connections are closed.
_STOP_GRACE_S: Final = 2.0


class _Listener(ThreadingHTTPServer):
    """A ThreadingHTTPServer that knows its open connections, to close them on ``down``."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Condition()
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
            self._conns_lock.notify_all()
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet: dropped connections are this server's business, not a traceback."""

    def drop_connections(self, exclude: socket.socket | None, wait: float = 0.0) -> None:
        """Shut down every open connection but ``exclude``; wait up to ``wait`` s for them."""
        with self._conns_lock:
            for conn in list(self._conns):
                if conn is not exclude:
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
            if wait:
                self._conns_lock.wait_for(lambda: not (self._conns - {exclude}), wait)


class DevMaster:
    """A local PandaFuzz master for tests, benchmarks and trying pfcollector out.

    Args:
        host: Address to listen on.
        port: Port, 0 for any free one (kept across :meth:`Faults.down_for`).
        db_path: SQLite file, or None for an in-memory database.
        accept_compression: Decode gzip (and zstd) request bodies instead of refusing them
            with 400 as the PandaFuzz master does.
        cost_per_item: Seconds each stored result item costs, writes serialised (see
            :class:`Store`); 0.00023 costs what the PandaFuzz master costs per crash in a batch.
        request_log: Called (from handler threads) with one line per request answered:
            ``METHOD PATH STATUS [items=N]``. None (the default) logs nothing.

    Attributes:
        faults: The fault injection controls.

    Resource handling:
        :meth:`start` binds the port and starts a background thread; :meth:`stop` (or leaving
        the ``with`` block) closes the listener, every connection and the database.

    Error handling:
        :meth:`start` raises ``OSError`` when the port cannot be bound.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        db_path: str | Path | None = None,
        *,
        accept_compression: bool = False,
        cost_per_item: float = 0.0,
        request_log: Callable[[str], None] | None = None,
    ) -> None:
        if not cost_per_item >= 0.0:
            raise ValueError(f"cost_per_item must be >= 0 seconds, got {cost_per_item!r}")
        self.cost_per_item = cost_per_item
        self.host = host
        self.request_log = request_log
        self.accept_compression = accept_compression
        self.port = port
        self._db_path = db_path
        self._lock = threading.RLock()
        self._listener: _Listener | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._store: Store | None = None
        self._app: App | None = None
        self.faults = Faults(self)

    @property
    def url(self) -> str:
        """Base URL, such as ``http://127.0.0.1:8080``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> DevMaster:
        """Open the database, bind the port and serve in a background thread."""
        with self._lock:
            if self._app is not None:
                raise RuntimeError("DevMaster already started")
            store = Store(self._db_path, self.cost_per_item)
            app = App(
                store=store,
                faults=self.faults,
                control=self,
                accept_compression=self.accept_compression,
                request_log=self.request_log,
            )
            try:
                self._app, self._store = app, store
                self._listen()
            except BaseException:
                self._app = self._store = None
                store.close()
                raise
        return self

    def stop(self) -> None:
        """Close the listener, every connection and the database (idempotent)."""
        with self._lock:
            self._cancel_timer()
            self._close_listener(None, wait=_STOP_GRACE_S)
            if self._store is not None:
                self._store.close()
            self._store = self._app = None

    def __enter__(self) -> DevMaster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- listener control (used by Faults and the /_dev/ endpoints) -------------------------

    def _listen(self) -> None:
        assert self._app is not None
        listener = _Listener((self.host, self.port), self._app)
        self.port = listener.server_address[1]
        thread = threading.Thread(
            target=listener.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL_S},
            name=f"devmaster:{self.port}",
            daemon=True,
        )
        self._listener, self._thread = listener, thread
        thread.start()

    def _close_listener(self, exclude: socket.socket | None, wait: float = 0.0) -> None:
        listener, thread = self._listener, self._thread
        if listener is None:
            return
        self._listener = self._thread = None
        listener.shutdown()
        listener.server_close()
        listener.drop_connections(exclude, wait)
        if thread is not None:
            thread.join()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def down(self, exclude: socket.socket | None = None) -> None:
        """Close the listener and every connection but ``exclude``, until :meth:`up`."""
        with self._lock:
            self._cancel_timer()
            self._close_listener(exclude)

    def up(self) -> None:
        """Listen again on the same port (no-op when up or stopped)."""
        with self._lock:
            self._cancel_timer()
            if self._listener is None and self._app is not None:
                self._listen()

    def down_for(self, seconds: float, exclude: socket.socket | None = None) -> None:
        """Go :meth:`down` now and :meth:`up` after ``seconds``."""
        with self._lock:
            self.down(exclude)
            self._timer = threading.Timer(max(0.0, seconds), self.up)
            self._timer.daemon = True
            self._timer.start()

    # -- inspection --------------------------------------------------------------------------

    def _require_store(self, kind: str | None = None) -> Store:
        if kind is not None:
            Store.check_kind(kind)
        if self._store is None:
            raise RuntimeError("DevMaster is not running")
        return self._store

    def count(self, kind: str) -> int:
        """Rows stored of ``kind``: ``crash``, ``coverage``, ``corpus`` or ``status``."""
        return self._require_store(kind).count(kind)

    def ids(self, kind: str) -> set[str]:
        """Ids stored of ``kind`` (row numbers for ``status``)."""
        return self._require_store(kind).ids(kind)

    def rows(self, kind: str) -> list[dict[str, Any]]:
        """Stored rows of ``kind`` as dicts (``files`` as a list, ``is_unique`` as a bool)."""
        return self._require_store(kind).rows(kind)

    def submissions(self) -> dict[str, int]:
        """Id to the number of times it was stored: above 1 means a redundant resend."""
        return self._require_store().submissions()

    def bots(self) -> list[dict[str, Any]]:
        """Registered bots as dicts."""
        return self._require_store().bots()

    def requests_seen(self) -> int:
        """HTTP requests handled, faulted ones included (``/health`` and ``/_dev/`` excluded)."""
        app = self._app
        return 0 if app is None else app.requests_seen()


def serve(
    host: str,
    port: int,
    db_path: str | None,
    *,
    accept_compression: bool = False,
    cost_per_item: float = 0.0,
    quiet: bool = False,
) -> None:
    """Run a :class:`DevMaster` until Ctrl-C or SIGTERM, printing its URL first.

    Args:
        host: Address to listen on.
        port: Port (0 for any free one; the URL printed shows which).
        db_path: SQLite file, or None for an in-memory database.
        accept_compression: Decode compressed request bodies (see :class:`DevMaster`).
        cost_per_item: Seconds each stored result item costs (see :class:`DevMaster`).
        quiet: Do not print a line per request (``time METHOD PATH STATUS [items=N]``).

    Error handling:
        Raises ``OSError`` when the port cannot be bound.
    """
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    print_lock = threading.Lock()

    def log(line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with print_lock:
            print(f"{stamp} {line}", flush=True)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with DevMaster(
            host,
            port,
            db_path,
            accept_compression=accept_compression,
            cost_per_item=cost_per_item,
            request_log=None if quiet else log,
        ) as master:
            print(
                f"pfcollector dev-master listening on {master.url} (db: {db_path or ':memory:'})",
                flush=True,
            )
            print(
                f"  what it received: curl {master.url}/_dev/stats, "
                f"curl '{master.url}/_dev/rows?kind=crash'",
                flush=True,
            )
            try:
                while not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m pfcollector.devmaster [--host H] [--port P] [--db FILE]``.

    Returns:
        The exit code: 0 after a clean stop, 1 when the port cannot be bound.
    """
    parser = argparse.ArgumentParser(
        prog="python -m pfcollector.devmaster",
        description="Run a local reference PandaFuzz master (with fault injection under /_dev/).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--db", default=None, help="SQLite file (default: in memory)")
    parser.add_argument(
        "--accept-compression", action="store_true", help="decode gzip/zstd request bodies"
    )
    parser.add_argument(
        "--cost-per-item",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="seconds each stored result costs, writes serialised "
        "(0.00023 = the PandaFuzz master's cost per crash in a batch; default 0)",
    )
    # Quiet by default here (benchmarks and tests pipe stdout and read only the first line: a
    # line per request would fill the pipe and block the master); `pfcollector dev-master`,
    # for people, logs them unless --quiet.
    parser.add_argument(
        "--log-requests", action="store_true", help="print a line per request on stdout"
    )
    args = parser.parse_args(argv)
    try:
        serve(
            args.host,
            args.port,
            args.db,
            accept_compression=args.accept_compression,
            cost_per_item=args.cost_per_item,
            quiet=not args.log_requests,
        )
    except OSError as exc:
        print(f"dev-master: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def _seconds(text: str) -> float:
    """``--cost-per-item``: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.0 <= value < 10.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 10 seconds, got {text!r}")
    return value
