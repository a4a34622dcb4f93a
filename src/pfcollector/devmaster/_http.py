"""HTTP primitives of the reference master: read a body within a limit, answer, reset.

A body over its limit is drained (up to a bound) before the 413 so the client reads the 413
rather than a reset; answers are written in one ``send`` with ``Content-Length`` so HTTP/1.1
keep-alive works and Nagle never delays them.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Final

from ._store import now_rfc3339

__all__ = ["MIB", "Abort", "BaseHandler"]

MIB: Final = 1024 * 1024
#: Past this, an oversized body is not drained before the 413: the connection is closed.
_MAX_DRAIN: Final = 256 * MIB
_DRAIN_CHUNK: Final = 256 * 1024


class Abort(Exception):
    """The request has been answered (or the connection dropped): stop handling it."""


class BaseHandler(BaseHTTPRequestHandler):
    """One connection's requests, HTTP/1.1 keep-alive, no per-request logging."""

    """One connection's requests, HTTP/1.1 keep-alive, no per-request logging."""

    protocol_version = "HTTP/1.1"
    server_version = "pfcollector-devmaster"
    sys_version = ""
    disable_nagle_algorithm = True

    #: Items the request carried (results in a batch, 1 for an item or status), once known.
    items: int | None = None

    def log_message(self, format: str, *args: Any) -> None:
        """Silence http.server's own stderr log (:meth:`note` writes ours)."""

    def request_log(self) -> Callable[[str], None] | None:
        """Where :meth:`note` writes one line per request (None: nowhere). Overridden."""
        return None

    def note(self, status: int | str) -> None:
        """Log ``METHOD PATH STATUS [items=N]`` for the request just answered."""
        log = self.request_log()
        if log is None:
            return
        path = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in self.path[:200])
        items = "" if self.items is None else f" items={self.items}"
        log(f"{self.command} {path} {status}{items}")
        self.items = None

    def handle(self) -> None:
        """Serve the connection, quietly ending when the peer or a fault drops it."""
        try:
            super().handle()
        except OSError:
            self.close_connection = True

    # -- answering ---------------------------------------------------------------------------

    def send_json(
        self,
        status: int,
        payload: Any,
        *,
        sort_keys: bool = True,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        body = json.dumps(payload, sort_keys=sort_keys, separators=(",", ":")).encode() + b"\n"
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        lines = [
            f"HTTP/1.1 {status} {phrase}",
            f"Server: {self.server_version}",
            f"Date: {formatdate(usegmt=True)}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
        ]
        lines.extend(f"{k}: {v}" for k, v in (headers or {}).items())
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        self.note(status)

    def send_error_json(
        self, status: int, message: str, details: str | None = None, **headers: str
    ) -> None:
        payload: dict[str, Any] = {"error": message}
        if details:
            payload["details"] = details
        payload["status"] = status
        payload["timestamp"] = now_rfc3339()
        self.send_json(status, payload, sort_keys=False, headers=headers)

    # -- bodies ------------------------------------------------------------------------------

    def read_body(self, limit: int) -> bytes:
        """Read the whole body, or answer 413 (draining it first so the client sees the 413)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked(limit)
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if length < 0:
                raise ValueError(length)
        except ValueError:
            self.close_connection = True
            self.send_error_json(400, "Invalid Content-Length")
            raise Abort from None
        if length > limit:
            if length > _MAX_DRAIN:
                self.close_connection = True
            else:
                while length > 0:
                    got = self.rfile.read(min(length, _DRAIN_CHUNK))
                    if not got:
                        raise Abort
                    length -= len(got)
            self.send_error_json(413, "Request body too large")
            raise Abort
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise Abort
        return body

    def _read_chunked(self, limit: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                self.close_connection = True
                self.send_error_json(413, "Request body too large")
                raise Abort
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def reset(self) -> None:
        """Read part of the body, then drop the connection with a TCP RST."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = 0
        if length > 1:
            self.rfile.read(min(length // 2, 64 * 1024))
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.note("reset")
