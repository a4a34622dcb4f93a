"""Who may use which control op on the socket (docs/security.md, docs/protocol.md).

Every peer the allowlists admit may send events and ask for ``status``. The ops that change
or reveal the daemon's work as a whole, ``tune``, ``flush``, ``dead_letters`` and
``dead_letters_retry``, and the full ``status``, are for admins: the daemon's own uid, root,
and the uids of the ``admin_uids`` setting. Anyone else asking for ``status`` gets it scoped to
what is theirs (:func:`scoped_status`); anything else is refused with ``not_permitted``. The
uid is the kernel's (``SO_PEERCRED``), never the client's word. Every control op is logged with
the peer's uid and pid (``status``, polled by ``status --watch``, at DEBUG).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["ADMIN_OPS", "OPEN_OPS", "Access", "NotPermitted", "scoped_status"]

log = logging.getLogger(__name__)

#: Ops only an admin may use.
ADMIN_OPS = frozenset({"tune", "flush", "dead_letters", "dead_letters_retry"})
#: Ops every admitted peer may use (``status`` is scoped for non-admins).
OPEN_OPS = frozenset({"status"})
#: The configuration keys a non-admin's status shows.
_PEER_CONFIG = ("batch_size", "flush_interval", "data_dir", "socket_path", "master_url", "mode")


class Peer(Protocol):
    """What the check needs of a connection (:class:`pfcollector.server.ConnectionInfo`)."""

    @property
    def pid(self) -> int: ...
    @property
    def uid(self) -> int: ...


class NotPermitted(LookupError):
    """The peer may not use this op. A ``LookupError`` so that the server answers it as a
    refused request (``ok: false``), never as a failed connection."""

    code = "not_permitted"

    def __init__(self, op: str, uid: int) -> None:
        super().__init__(
            f"not_permitted: {op} is for the daemon's uid, root or a uid in admin_uids; "
            f"uid {uid} is none of them"
        )
        self.op = op
        self.uid = uid


@dataclass(frozen=True)
class Access:
    """The control-op policy of one daemon.

    Attributes:
        admin_uids: The ``admin_uids`` setting.
        daemon_uid: The daemon's own uid (always an admin, as is root).
    """

    admin_uids: frozenset[int] = frozenset()
    daemon_uid: int = field(default_factory=os.getuid)

    @classmethod
    def of(cls, admin_uids: Iterable[int]) -> Access:
        return cls(frozenset(admin_uids))

    def is_admin(self, uid: int) -> bool:
        """Does ``uid`` get every control op and the full status?"""
        return uid in (0, self.daemon_uid) or uid in self.admin_uids

    def check(self, op: str, peer: Peer) -> bool:
        """Log the request; return whether the peer is an admin, or raise.

        Raises:
            NotPermitted: A non-admin asked for an admin op (logged at WARNING).
        """
        admin = self.is_admin(peer.uid)
        if op in ADMIN_OPS and not admin:
            log.warning("control op %s refused: pid %d uid %d is not an admin",
                        op, peer.pid, peer.uid)  # fmt: skip
            raise NotPermitted(op, peer.uid)
        level = logging.DEBUG if op in OPEN_OPS else logging.INFO
        log.log(level, "control op %s from pid %d uid %d%s",
                op, peer.pid, peer.uid, "" if admin else " (not an admin)")  # fmt: skip
        return admin


def scoped_status(full: dict[str, Any], uid: int) -> dict[str, Any]:
    """The ``status`` a non-admin peer sees: the daemon's health, and only its own connections.

    Left out: other uids' connections (pids, jobs, fuzzers), the crash signatures of
    ``policies``, the pipeline's per-job detail and the settings beyond a few harmless ones.
    """
    out = dict(full)
    out["scope"] = "peer"
    conns = full["connections"]
    out["connections"] = {**conns, "live": [c for c in conns["live"] if c["uid"] == uid]}
    out["config"] = {k: full["config"][k] for k in _PEER_CONFIG if k in full["config"]}
    out["policies"] = None
    if full.get("delivery"):
        out["delivery"] = {k: v for k, v in full["delivery"].items() if k != "pipeline"}
    return out
