"""The exceptions pfclient raises: all are :class:`PfClientError`."""

from __future__ import annotations

import os

__all__ = [
    "DaemonUnavailable",
    "EventRejected",
    "FlushTimeout",
    "OutboxUnavailable",
    "PfClientError",
    "UntrustedDaemon",
]


class PfClientError(Exception):
    """Base class of every error pfclient raises (a control request the daemon refused, too)."""


class DaemonUnavailable(PfClientError):
    """The daemon cannot be reached: the message names the socket path and the OS error."""


class UntrustedDaemon(DaemonUnavailable):
    """The process listening on the socket runs as a uid the client does not trust (not its
    own, not root, not in ``trust_uids`` / ``$PFCOLLECTOR_DAEMON_UID``): nothing was sent to it.

    Attributes:
        path: The socket path.
        uid: The listener's uid, from ``SO_PEERCRED``.
    """

    def __init__(self, path: str, uid: int) -> None:
        super().__init__(f"refusing the daemon at {path}: it runs as uid {uid}, which is not "
                         f"this process's uid ({os.getuid()}), root, or a uid trusted through "
                         "PFCOLLECTOR_DAEMON_UID / trust_uids")  # fmt: skip
        self.path = path
        self.uid = uid


class OutboxUnavailable(DaemonUnavailable):
    """A crash could not reach the daemon and could not be written to the outbox either."""


class EventRejected(PfClientError):
    """The daemon answered an ``error`` message (an event refused, or the hello itself).

    Attributes:
        code: The daemon's error code, e.g. ``"too_long"``.
        message: The daemon's explanation, naming the event's seq, kind and field.
        seq: The refused event's seq on the connection it was sent on, or ``None``.
        field: The offending field, or ``None``.
        event_id: The refused event's id, when the client could match it, else ``None``.
        fatal: Whether the daemon closed the connection after it.
    """

    def __init__(
        self,
        code: str,
        message: str,
        seq: int | None = None,
        field: str | None = None,
        *,
        event_id: str | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.seq = seq
        self.field = field
        self.event_id = event_id
        self.fatal = fatal


class FlushTimeout(PfClientError, TimeoutError):
    """The daemon did not acknowledge (or answer) in time; nothing is lost, the client still
    holds every unacknowledged event and resends it after a reconnect."""
