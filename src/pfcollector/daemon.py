"""The composition root: every long-lived task of the daemon, in one place.

Read :meth:`Daemon.run` as the diagram::

    socket ─▶ server ─▶ ingest channel ─▶ group commit ─▶ spool ─▶ pipeline ─▶ senders ─▶ master

Two nurseries: ``delivery`` (pipeline, delivery workers, heartbeats) outlives ``ingest``
(listener and connections, group commit, signals), so that on shutdown the daemon first
stops taking events in, settles everything it accepted, and only then drains deliveries under
a shielded deadline. Whatever is not delivered by then stays in the spool for the next start.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio

from . import __version__
from .access import Access, scoped_status
from .botapi import RegisterError
from .bots import heartbeat_loop, register
from .breaker import BreakerState, CircuitBreaker
from .bugs import list_bugs, top_per_job, top_repeats
from .config import Config, ConfigError, runtime_changes
from .datalock import DataDirLock
from .events import Kind
from .ingest import INGEST_QUEUE_SIZE, GroupCommitter, Pending
from .inputproc import InputProcess
from .inputs import InputStore
from .inputwriter import InputWriter
from .logs import set_level
from .membudget import MemoryBudget, tune_allocator
from .metrics import serve_metrics
from .outbox import Importer, prepare_outbox
from .pipeline import BATCH_QUEUE_SIZE, BatchPolicy, Pipeline
from .policies import COALESCED_KINDS
from .private import create_private_file, make_private_dir
from .redact import redact_tree
from .sender import Batch, RetryPolicy, Sender, TransientError
from .server import ConnectionInfo, Limits, Server
from .sockdir import prepare_socket_dir
from .spoolfile import open_spool

__all__ = ["CONTROL_OPS", "Daemon", "run_daemon"]

log = logging.getLogger(__name__)

#: Control operations the daemon answers on its socket.
CONTROL_OPS = ("status", "dead_letters", "dead_letters_retry", "flush", "tune")
_REGISTER_RETRY_CAP = 60.0
#: Bugs shown in ``status`` per job, and the most read to find them (most hit first).
TOP_BUGS_PER_JOB = 5
TOP_BUGS_READ = 200


class Daemon:
    """One running pfcollector. :meth:`run` is the whole of its life."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        # Private whatever the umask: SQLite gives -wal and -shm the mode of spool.db.
        make_private_dir(config.data_dir)
        # Before anything touches the spool: a second daemon on this data dir stops here.
        self._lock = DataDirLock(config.data_dir)
        try:
            create_private_file(config.spool_path)
            self.spool = open_spool(config.spool_path, config.spool_max_bytes)
            self.inputs = InputStore(config.inputs_dir)
            self.inputs.clean()
        except BaseException:
            self._lock.release()
            raise
        #: Everything held in memory, in bytes: readers, channel, group, window, writer.
        self.budget = MemoryBudget(config.memory_budget)
        # SQLite copies an input while the group commit writes it (the bound value, then its
        # record) and while the input writer reads it back: held aside for good, so readers
        # leave room for them.
        self.budget.force(min(2 * config.max_frame, config.memory_budget // 4))
        tune_allocator()
        self.ingest_send, self.ingest_recv = trio.open_memory_channel[Pending](INGEST_QUEUE_SIZE)
        self.committer = GroupCommitter(self.spool, self.inputs, crash_dedupe=config.crash_dedupe)
        # A child process writes the files, an eighth of the budget at a time.
        self.input_files = InputProcess(self.inputs, self.budget.capacity // 8)
        self.input_writer = InputWriter(self.spool, self.inputs, self.budget, self.input_files)
        self.committer.on_commit(self.input_writer.notify)
        self.committer.hand_inputs_to(self.input_writer)  # no read-back of fresh inputs
        self.access = Access.of(config.admins)  # who may tune, flush, see everything
        self.policy = BatchPolicy(config.batch_size, config.batch_bytes, config.flush_interval)
        self.server = Server(
            config.socket_path,
            self.ingest_send,
            self.control,
            socket_mode=config.socket_mode,
            socket_group=config.socket_gid,
            limits=Limits(
                max_frame=config.max_frame,
                max_connections=config.max_connections,
                idle_timeout=config.idle_timeout,
                slow_sender_timeout=config.slow_sender_timeout,
                rate_limit=config.rate_limit,
                allowed_uids=config.allowed_uids,
                allowed_gids=config.allowed_gids,
            ),
            coalesce_interval=(lambda: self.policy.flush_interval) if config.coalesce else None,
            budget=self.budget,
        )
        self.outbox = Importer(
            config.outbox_dir,
            max_frame=config.max_frame,
            allows=self.server.limits.allows,
            socket_mode=config.socket_mode,
            socket_group=config.socket_gid,
            budget=self.budget,
        )
        self.server.outbox = str(config.outbox_dir)
        self.pipeline = Pipeline(
            self.spool,
            self.policy,
            retry_base=config.retry_base,
            retry_cap=config.retry_cap,
            budget=self.budget,
            prompt_kinds=COALESCED_KINDS if config.coalesce else frozenset(),
        )
        self.sender: Sender | None = None
        self.bot_id = config.bot_id
        self.draining = False
        self.stopping = False
        #: Trio time the drain ends at the latest (set when it starts).
        self.drain_deadline: float | None = None
        # Why the drain ended before everything was delivered (None: it did not).
        self._drain_cut: str | None = None
        # Shielded: a cancellation from outside must not cut the drain short; its deadline,
        # or a second SIGTERM (skip_drain), does.
        self._drain_scope = trio.CancelScope(shield=True)
        #: Reads the settings again on SIGHUP (:meth:`reload`); the CLI sets it.
        self.config_loader: Callable[[], Config] | None = None

    async def run(
        self,
        *,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :meth:`stop` (or SIGTERM/SIGINT), drain, and return."""
        config = self.config
        try:
            async with self._master_client() as http, trio.open_nursery() as delivery:
                if config.metrics_addr is not None:
                    await delivery.start(serve_metrics, self, config.metrics_addr)  # /metrics
                if http is not None:
                    delivery.start_soon(self._deliver, http, delivery)  # spool -> master
                if handle_signals:
                    delivery.start_soon(self._on_signals)  # TERM/INT stop, HUP reloads
                delivery.start_soon(self.input_writer.run)  # spooled input bytes -> files
                if not os.environ.get("LISTEN_FDS"):  # systemd owns an inherited socket
                    prepare_socket_dir(config.socket_path, config.socket_gid)
                outbox_send = self._prepare_outbox()
                async with trio.open_nursery() as front:
                    # The socket: events until stop(), control requests until the drain ends.
                    await front.start(self.server.serve)
                    if outbox_send is not None:  # outbox files -> channel, until stop()
                        front.start_soon(self.outbox.run, outbox_send)
                    log.info(
                        "pfcollector %s listening on %s%s (%s mode, spool %s)",
                        __version__,
                        self.server.socket_path,
                        ", passed by systemd (socket activation)" if self.server.activated else "",
                        "local" if config.local_mode else f"master {config.master_url}",
                        config.spool_path,
                    )
                    task_status.started(self)
                    # channel -> spool, until stop() closed the channel and all of it is written
                    await self.committer.run(self.ingest_recv)
                    # Ingest is over: every accepted event is settled in the spool.
                    if http is not None:
                        await self._drain()
                    self.server.stop()
                delivery.cancel_scope.cancel()
        finally:
            try:
                self.spool.close()
            finally:
                self._lock.release()
        if self._drain_cut is not None:
            log.warning("stopped before the drain was done (%s); %d undelivered event(s) stay "
                        "in the spool for the next start", self._drain_cut,
                        self.spool.total_count)  # fmt: skip
        else:
            log.info("stopped; %d event(s) remain in the spool", self.spool.total_count)

    def _prepare_outbox(self) -> trio.MemorySendChannel[Pending] | None:
        """The outbox's own sender on the ingest channel, or None if it cannot be used."""
        try:
            prepare_outbox(self.config.outbox_dir, self.config.socket_gid)
        except OSError as exc:
            log.error("outbox disabled, clients' files will not be imported: %s",
                      exc.strerror or exc)  # fmt: skip
            self.server.outbox = None
            return None
        return self.ingest_send.clone()

    def stop(self) -> None:
        """Begin a graceful shutdown: take no more events; :meth:`run` drains and returns.

        Control requests (``status``) are answered until the drain is over.
        """
        self.stopping = True
        self.outbox.stop()  # its clone of the ingest channel closes: the committer can end
        self.server.stop_ingest()

    def skip_drain(self, reason: str = "a second signal") -> None:
        """End the drain now: what is undelivered stays in the spool for the next start."""
        if self._drain_cut is None:
            self._drain_cut = reason
        self._drain_scope.cancel()

    async def _on_signals(self) -> None:
        # Lives as long as the daemon (the delivery nursery), so a SIGHUP or a second SIGTERM
        # during the drain is handled rather than killing the process.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    self.reload()
                elif not self.stopping:
                    log.info("%s: stopping, draining for up to %.1fs", name,
                             self.config.drain_deadline)  # fmt: skip
                    self.stop()
                else:
                    log.warning("%s again: ending the drain", name)
                    self.skip_drain(f"{name} again")

    async def _drain(self) -> None:
        """Deliver what the spool holds, until done, the deadline, or no hope of delivering.

        A drain that cannot deliver ends at once: with the circuit breaker open (now, or
        opening during the drain), or no bot id yet, nothing more would reach the master, and
        everything stays in the spool anyway.
        """
        self.draining = True
        self.pipeline.drain()
        self.drain_deadline = trio.current_time() + self.config.drain_deadline
        self._drain_scope.deadline = self.drain_deadline
        if self.sender is None:
            self.skip_drain("not registered with the master")
        elif self.sender.breaker.state(trio.current_time()) is BreakerState.OPEN:
            self.skip_drain("the master is unreachable: circuit breaker open")
        with self._drain_scope as scope:
            await self.pipeline.wait_idle()
        if scope.cancelled_caught and self._drain_cut is None:
            self._drain_cut = f"drain_deadline of {self.config.drain_deadline:g}s"

    @asynccontextmanager
    async def _master_client(self) -> AsyncIterator[httpx.AsyncClient | None]:
        if self.config.master_url is None:
            yield None
            return
        timeout = httpx.Timeout(self.config.http_timeout)
        limits = httpx.Limits(max_connections=self.config.senders * 8 + 4)
        async with httpx.AsyncClient(
            base_url=self.config.master_url, timeout=timeout, limits=limits
        ) as client:
            yield client

    async def _deliver(self, http: httpx.AsyncClient, delivery: trio.Nursery) -> None:
        """Start the delivery side: (register,) pipeline, workers, heartbeats."""
        config = self.config
        if self.bot_id is None:
            self.bot_id = await self._register(http)
        breaker = CircuitBreaker(
            failure_threshold=config.breaker_threshold,
            reset_timeout=config.breaker_reset,
            max_reset_timeout=config.breaker_max_reset,
        )
        breaker.on_transition = self._on_breaker
        self.sender = Sender(
            http,
            bot_id=self.bot_id,
            mode=config.delivery_mode,
            breaker=breaker,
            retry=RetryPolicy(config.retry_attempts, config.retry_base, config.retry_cap),
            token=config.token,
            compression=config.compression,
            compression_threshold=config.compression_threshold,
        )
        self.committer.hand_rows_to(self.pipeline.offer)  # in place of a read-back
        batch_send, batch_recv = trio.open_memory_channel[Batch](BATCH_QUEUE_SIZE)
        async with batch_recv:
            delivery.start_soon(self.pipeline.run, batch_send)  # spool -> batches
            for _ in range(config.senders):
                delivery.start_soon(self.pipeline.deliver, batch_recv.clone(), self.sender.deliver)
        if config.register:
            delivery.start_soon(self._heartbeats, http)

    def _on_breaker(self, old: BreakerState, new: BreakerState) -> None:
        log.warning("circuit breaker for %s: %s -> %s", self.config.master_url, old, new)
        if new is BreakerState.OPEN and self.draining:
            self.skip_drain("the master is unreachable: circuit breaker open")

    async def _register(self, http: httpx.AsyncClient) -> str:
        stored = await trio.to_thread.run_sync(self.spool.get_meta, "bot_id")
        if stored:
            log.info("using bot id %s registered earlier", stored)
            return stored
        delay = 1.0
        while True:
            try:
                bot_id = await register(
                    http,
                    hostname=socket.gethostname(),
                    name=f"pfcollector-{socket.gethostname()}",
                    capabilities=["pfcollector", "afl", "libfuzzer"],
                    api_endpoint=f"http://{socket.gethostname()}",
                    token=self.config.token,
                )
            except (httpx.HTTPError, TransientError, RegisterError, ValueError) as exc:
                log.warning(
                    "registering with %s failed (%s); retrying in %.0fs",
                    self.config.master_url,
                    exc,
                    delay,
                )
                await trio.sleep(delay)
                delay = min(delay * 2, _REGISTER_RETRY_CAP)
                continue
            await trio.to_thread.run_sync(self.spool.set_meta, "bot_id", bot_id)
            log.info("registered with %s as bot %s", self.config.master_url, bot_id)
            return bot_id

    async def _heartbeats(self, http: httpx.AsyncClient) -> None:
        assert self.bot_id is not None
        await heartbeat_loop(
            http,
            self.bot_id,
            interval=self.config.heartbeat_interval,
            status_fn=lambda: "busy" if self.server.connections else "idle",
            token=self.config.token,
        )

    # -- control -------------------------------------------------------------------------

    async def control(self, op: str, args: dict[str, Any], peer: ConnectionInfo) -> Any:
        """Answer a control request from the socket (``pfcollector status`` and friends).

        Admin ops and the full status need an admin peer (:mod:`pfcollector.access`).
        """
        admin = self.access.check(op, peer)  # logs; NotPermitted for a non-admin's admin op
        if op == "status":
            full = await self.status()
            return full if admin else scoped_status(full, peer.uid)
        if op == "dead_letters":
            limit = int(args.get("limit", 100))
            rows = await trio.to_thread.run_sync(self.spool.dead_letters, limit)
            return redact_tree(rows)  # kept before a secret was known to be one, too
        if op == "dead_letters_retry":
            ids = args.get("ids")
            found: list[str] = []
            count = await trio.to_thread.run_sync(self.spool.retry_dead_letters, ids, found)
            log.info("pid %d put %d dead letter(s) back in line", peer.pid, count)
            self.pipeline.notify()
            taken = set(found)
            return {"requeued": count, "unknown": [i for i in ids or () if i not in taken]}
        if op == "flush":
            return self.flush()
        if op == "tune":
            return self.tune(args)
        raise LookupError(f"unknown control op {op!r}; known: {', '.join(CONTROL_OPS)}")

    def flush(self) -> dict[str, Any]:
        """Send what is ready now, once. Retries keep their backoff and the master's
        ``Retry-After``; an open breaker holds everything back until its probe succeeds."""
        if self.sender is None:
            return {"flushing": False, "reason": "no master (local mode, or not registered yet)"}
        self.pipeline.flush_now()
        now = trio.current_time()
        breaker = self.sender.breaker.snapshot(now)
        out: dict[str, Any] = {
            "flushing": True,
            "breaker": breaker["state"],
            "waiting_retry": self.pipeline.status()["waiting_retry"],
        }
        if breaker["state"] != "closed":
            out["reason"] = (
                f"the circuit breaker is {breaker['state']}: deliveries wait for the master "
                f"(next probe in {breaker['retry_in'] or 0:.1f}s)"
            )
        return out

    def tune(self, args: dict[str, Any]) -> dict[str, Any]:
        """Change the batch size and flush interval at run time (validated like the config)."""
        changes = {k: args[k] for k in ("batch_size", "flush_interval") if k in args}
        if not changes:
            raise ValueError("tune takes batch_size and/or flush_interval")
        candidate = dataclasses.replace(self.config, **changes)  # validates, or ConfigError
        self.config = candidate
        self.policy.batch_size = candidate.batch_size
        self.policy.flush_interval = candidate.flush_interval
        self.pipeline.notify()
        log.info("tuned: %s", changes)
        return {"batch_size": self.policy.batch_size, "flush_interval": self.policy.flush_interval}

    def reload(self) -> dict[str, Any]:
        """Re-read the settings (SIGHUP) and apply what can change at run time.

        ``batch_size`` and ``flush_interval`` go through :meth:`tune`, ``log_level`` to the
        loggers; other changes are logged as waiting for a restart. Settings that do not
        validate are logged and the running ones kept. Returns what was applied.
        """
        if self.config_loader is None:
            log.warning("SIGHUP: no settings source to re-read; nothing changed")
            return {}
        try:
            new = self.config_loader()
        except (ConfigError, OSError) as exc:
            log.error("SIGHUP: settings not reloaded, the running ones stay: %s", exc)
            return {}
        apply, restart = runtime_changes(self.config, new)
        if restart:
            log.warning("SIGHUP: %s changed; applied at the next restart", ", ".join(restart))
        tuning = {k: v for k, v in apply.items() if k in ("batch_size", "flush_interval")}
        if tuning:
            self.tune(tuning)
        if "log_level" in apply:
            set_level(apply["log_level"])
            self.config = dataclasses.replace(self.config, log_level=apply["log_level"])
        log.info("SIGHUP: settings reloaded; applied %s", apply or "no change")
        return apply

    async def _policies(self) -> dict[str, Any]:
        coalescer = self.server.coalescer
        top = await trio.to_thread.run_sync(self.spool.read, top_repeats, Kind.CRASH.value, 5)
        bug_rows = await trio.to_thread.run_sync(self.spool.read, list_bugs, None, TOP_BUGS_READ)
        crash = {"dedupe": self.config.crash_dedupe, "top_repeats": top}
        crash["top_bugs"] = top_per_job(bug_rows, TOP_BUGS_PER_JOB)
        return {
            "crash": crash,
            "corpus": {"dedupe": True},
            "coalesce": {
                "enabled": coalescer is not None,
                "kinds": ["stats", "coverage"] if coalescer is not None else [],
                "interval_s": self.policy.flush_interval,
                "pending": len(coalescer) if coalescer is not None else 0,
                "absorbed": dict(coalescer.absorbed) if coalescer is not None else {},
            },
        }

    def _drain_progress(self) -> dict[str, Any] | None:
        """While stopping: events still to deliver, and seconds left before the deadline."""
        if not self.stopping:
            return None
        left = None
        if self.drain_deadline is not None:
            left = round(max(0.0, self.drain_deadline - trio.current_time()), 3)
        return {
            "phase": "delivering" if self.draining else "storing accepted events",
            "events_left": self.spool.total_count,
            "deadline_in_s": left,
            "ended": self._drain_cut,
        }

    async def status(self) -> dict[str, Any]:
        """Everything ``pfcollector status`` shows, as stable JSON."""
        server, stats = self.server, self.server.stats
        spool_status = await trio.to_thread.run_sync(self.spool.status)
        queue = self.ingest_send.statistics()
        out: dict[str, Any] = {
            "version": __version__,
            "scope": "full",
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "mode": "local" if self.config.local_mode else "master",
            "draining": self.draining,
            "drain": self._drain_progress(),
            "connections": {
                "current": len(server.connections),
                "total": stats.connections_total,
                "max": server.max_connections,
                "live": [c.public() for c in server.connections.values()],
            },
            "events": {
                kind.value: {
                    "received": stats.received[kind.value],
                    "accepted": stats.accepted[kind.value],
                    "rejected": stats.rejected[kind.value],
                    "refused": dict(sorted(stats.refused.get(kind.value, {}).items())),
                }
                for kind in Kind
            },
            "errors": dict(stats.errors),
            "outbox": self.outbox.status(),
            "queue": {"depth": queue.current_buffer_used, "capacity": INGEST_QUEUE_SIZE},
            "memory": self.budget.snapshot(),
            "spool": {
                "path": str(self.config.spool_path),
                "events": self.spool.total_count,
                "bytes": self.spool.total_bytes,
                "max_bytes": self.spool.max_bytes,
                "write_error": self.committer.failing,
                "inputs_pending": await trio.to_thread.run_sync(self.spool.pending_input_count),
                "input_writer": self.input_files.status(),
                "kinds": spool_status,
            },
            "policies": await self._policies(),
            "delivery": None,
            "config": self.config.public(),
        }
        if self.sender is not None:
            out["delivery"] = {
                "bot_id": self.bot_id,
                "mode": self.config.delivery_mode,
                "breaker": self.sender.breaker.snapshot(trio.current_time()),
                "sender": self.sender.stats.snapshot(),
                "pipeline": self.pipeline.status(),
            }
        return redact_tree(out)


async def run_daemon(
    config: Config,
    *,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a daemon for ``config`` until stopped. For ``nursery.start``."""
    daemon = Daemon(config)
    await daemon.run(handle_signals=handle_signals, task_status=task_status)
