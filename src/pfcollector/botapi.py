"""The PandaFuzz master's bot endpoints as pure functions: registration and heartbeats.

No I/O here (:mod:`pfcollector.bots` does the HTTP). The master decodes both bodies strictly:
exactly these fields (``shared/pandafuzz-master-api.md``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from .events import rfc3339
from .master import MasterError, compact_json, error_text, json_object

__all__ = [
    "HEARTBEAT_STATUSES",
    "REGISTER_PATH",
    "RegisterError",
    "heartbeat_body",
    "heartbeat_path",
    "parse_register",
    "register_body",
    "sanitize_capabilities",
]

REGISTER_PATH: Final = "/api/v1/bots/register"
#: The ``status`` values the heartbeat endpoint takes.
HEARTBEAT_STATUSES: Final = frozenset({"registering", "idle", "busy", "timed_out", "failed"})
_CAPABILITY = re.compile(r"[A-Za-z_-][A-Za-z0-9_-]*")
_MAX_CAPABILITIES: Final = 10


class RegisterError(MasterError):
    """The master refused a registration, or answered it with something unusable.

    Attributes:
        status: The HTTP status of the answer.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"registration failed (HTTP {status}): {message}")
        self.status = status


def sanitize_capabilities(capabilities: Iterable[str]) -> list[str]:
    """Capabilities as the master takes them: 1 to 10 names matching ``[A-Za-z_-][A-Za-z0-9_-]*``.

    ``+`` becomes ``p`` (``afl++`` → ``aflpp``, ``c++`` → ``cpp``), any other refused character
    ``_``; a name starting with a digit gets a ``_`` in front; empty names and duplicates go;
    the first ten stay. If none is left, ``["fuzzer"]``.
    """
    out: list[str] = []
    for raw in capabilities:
        name = re.sub(r"[^A-Za-z0-9_-]", "_", raw.strip().replace("+", "p"))
        if not name:
            continue
        if not _CAPABILITY.fullmatch(name):
            name = "_" + name
        if name not in out:
            out.append(name)
        if len(out) == _MAX_CAPABILITIES:
            break
    return out or ["fuzzer"]


def register_body(
    hostname: str, name: str, capabilities: Iterable[str], api_endpoint: str
) -> bytes:
    """The body for ``POST /api/v1/bots/register`` (strict decoding: exactly these fields).

    Raises:
        ValueError: ``hostname`` is empty, or ``api_endpoint`` is not an http(s) URL.
    """
    if not hostname:
        raise ValueError("hostname is required")
    if not api_endpoint.startswith(("http://", "https://")):
        raise ValueError("api_endpoint must start with http:// or https://")
    return compact_json(
        {
            "hostname": hostname,
            "name": name,
            "capabilities": sanitize_capabilities(capabilities),
            "api_endpoint": api_endpoint,
        }
    )


def parse_register(status: int, body: bytes) -> str:
    """The ``bot_id`` from a registration answer (JSON, whatever its Content-Type says).

    Raises:
        RegisterError: The status is not 2xx, or the answer has no usable ``bot_id``.
    """
    if not 200 <= status < 300:
        raise RegisterError(status, error_text(body))
    obj = json_object(body)
    bot_id = obj.get("bot_id") if obj is not None else None
    if not isinstance(bot_id, str) or not bot_id:
        raise RegisterError(status, f"no bot_id in the answer: {error_text(body)}")
    return bot_id


def heartbeat_path(bot_id: str) -> str:
    """The heartbeat endpoint of ``bot_id``."""
    return f"/api/v1/bots/{bot_id}/heartbeat"


def heartbeat_body(status: str, current_job: str | None, last_activity_ns: int) -> bytes:
    """The body for ``POST /api/v1/bots/{id}/heartbeat``.

    Raises:
        ValueError: ``status`` is not one the master knows (:data:`HEARTBEAT_STATUSES`).
    """
    if status not in HEARTBEAT_STATUSES:
        raise ValueError(f"unknown bot status {status!r}")
    return compact_json(
        {
            "status": status,
            "current_job": current_job or None,
            "last_activity": rfc3339(last_activity_ns),
        }
    )
