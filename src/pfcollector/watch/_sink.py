"""Where the watchers' events go: one :class:`pfclient.Client` per fuzzer name, stable ids.

A watcher needs ids it can make again after a restart (so a resend overwrites at the spool
and the master instead of duplicating): :func:`stable_id` makes them, and :func:`submit`
passes them to the client's ``id=``.

Resource handling:
    :class:`Sink` opens a client per fuzzer name on first use and closes them all in
    :meth:`Sink.close`. After a failure every client is dropped (with a short close timeout);
    the next call opens fresh ones. Nothing is resent from the clients' memory: the watcher
    resends from its own state, which only advances after :meth:`Sink.flush` succeeded.

Error handling:
    :class:`pfclient.DaemonUnavailable` and :class:`pfclient.FlushTimeout` propagate (the
    watcher backs off and retries). A refused event (:class:`pfclient.EventRejected`) is poison:
    it is logged and counted in :attr:`Sink.rejected`, never retried.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from typing import Any

from pfclient import Client, EventRejected, PfClientError

__all__ = ["Sink", "stable_id", "submit"]

log = logging.getLogger("pfcollector.watch")
#: Refusals that say "not now" (the daemon's disk or spool), not "never": the event is sent
#: again later, and the watcher's place is not advanced past it.
RETRY_LATER = frozenset({"spool_full", "disk_full", "spool_write_failed"})
_CLOSE_TIMEOUT = 2.0


def stable_id(prefix: str, *parts: str) -> str:
    """An event id that is the same every time for the same parts (and the same host).

    The host name is part of it: the master overwrites by id across all bots, and two bots
    fuzzing one job both have an ``afl++/default`` instance with an ``id:000000,...`` crash.
    """
    digest = hashlib.sha256("\0".join((socket.gethostname(), *parts)).encode()).hexdigest()
    return f"{prefix}-{digest[:40]}"


class Sink:
    """Sends events for one job to the daemon, one connection per fuzzer name."""

    def __init__(self, socket_path: str | os.PathLike[str] | None, job_id: str,
                 timeout: float = 10.0) -> None:  # fmt: skip
        self.socket_path = socket_path
        self.job_id = job_id
        self.timeout = timeout
        self.rejected = 0
        self._clients: dict[str, Client] = {}

    def _client(self, fuzzer: str) -> Client:
        client = self._clients.get(fuzzer)
        if client is None:
            client = Client(self.socket_path, job_id=self.job_id, fuzzer=fuzzer,
                                    timeout=self.timeout)  # fmt: skip
            self._clients[fuzzer] = client
        return client

    def send(self, fuzzer: str, kind: str, fields: dict[str, Any],
             event_id: str | None = None) -> None:  # fmt: skip
        """Send one event. A crash waits for its ack; the others are confirmed by :meth:`flush`."""
        client = self._client(fuzzer)
        try:
            submit(client, kind, fields, event_id=event_id)
        except EventRejected as exc:
            if exc.code in RETRY_LATER:
                self.reset()
                raise  # the watcher backs off and resends from its state: nothing skipped
            self._poison(fuzzer, kind, exc)
        except PfClientError:
            self.reset()
            raise

    def flush(self) -> None:
        """Wait until every event sent is acknowledged (refused ones are logged, not raised)."""
        try:
            for fuzzer, client in self._clients.items():
                seen = len(client.rejected)
                try:
                    client.flush()
                except EventRejected as first:
                    refused = client.rejected[seen:] or [first]
                    later = next((e for e in refused if e.code in RETRY_LATER), None)
                    if later is not None:
                        raise later from first  # not stored now: resend, never skip
                    for exc in refused:
                        self._poison(fuzzer, "event", exc)
        except PfClientError:
            self.reset()
            raise

    def _poison(self, fuzzer: str, kind: str, exc: EventRejected) -> None:
        self.rejected += 1
        log.error("the daemon refused a %s event from %s (not retried): %s", kind, fuzzer, exc)

    def reset(self) -> None:
        """Drop every connection (after a failure): the next send opens fresh ones."""
        clients, self._clients = self._clients, {}
        for client in clients.values():
            client.timeout = min(client.timeout, _CLOSE_TIMEOUT)
            client.close()

    def close(self) -> None:
        """Flush what can be flushed and close every connection."""
        self.reset()


def submit(
    client: Client,
    kind: str,
    fields: dict[str, Any],
    *,
    ts: float | None = None,
    event_id: str | None = None,
) -> str:
    """Send one ``kind`` event with ``fields`` through ``client``; return its id."""

    def rest(*names: str) -> dict[str, Any]:
        return {k: v for k, v in fields.items() if k not in names}

    if kind == "crash":
        return client.crash(fields["type"], fields["input"], ts=ts, id=event_id,
                            **rest("type", "input"))  # fmt: skip
    if kind == "coverage":
        return client.coverage(fields["edges"], ts=ts, id=event_id, **rest("edges"))
    if kind == "corpus":
        return client.corpus(fields["files"], ts=ts, id=event_id, **rest("files"))
    if kind == "stats":
        return client.stats(ts=ts, id=event_id, **fields)
    return client.lifecycle(kind, fields.get("message", ""), ts=ts, id=event_id)
