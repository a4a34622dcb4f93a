"""The reference master's HTTP request handler: routing, body limits, the master's answers.

What each endpoint accepts and answers follows ``shared/pandafuzz-master-api.md`` and the
master's Go handlers: per-item result endpoints decode leniently and answer 500 when the store
fails; the batch and register endpoints decode strictly, want ``Content-Type`` exactly
``application/json`` (415) and answer a store failure in a batch as ``partial_success``.
Errors are ``{error, details?, status, timestamp}``; map answers have sorted keys, as Go
prints maps; every body ends with a newline, as ``json.Encoder`` writes it.
"""

from __future__ import annotations

import gzip
import io
import socket
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, cast
from urllib.parse import parse_qs, urlsplit

from ._faults import Faults, Plan
from ._http import MIB, Abort, BaseHandler
from ._schema import (
    BATCH_FIELDS,
    HEARTBEAT_FIELDS,
    HEARTBEAT_STATUSES,
    ITEM_FIELDS,
    REGISTER_FIELDS,
    DecodeError,
    decode_object,
    parse_json,
    validate_register,
)
from ._store import KINDS, Store, now_rfc3339

__all__ = ["AdminControl", "App", "Handler", "HasApp"]

#: Body limits by path, as the master's size middleware sets them.
_LIMITS: Final[Mapping[str, int]] = {
    "/api/v1/results/crash": 10 * MIB,
    "/api/v1/results/corpus": 100 * MIB,
}
_DEFAULT_LIMIT: Final = MIB
_GO_NAMES: Final[Mapping[str, str]] = {
    "crash": "CrashResult",
    "coverage": "CoverageResult",
    "corpus": "CorpusUpdate",
}
_BATCH_LISTS: Final[tuple[tuple[str, str], ...]] = (
    ("crashes", "crash"),
    ("coverage", "coverage"),
    ("corpus", "corpus"),
)
_NOUNS: Final[Mapping[str, str]] = {
    "crash": "crash result",
    "coverage": "coverage result",
    "corpus": "corpus update",
}
_REGISTER_TIMEOUT_S: Final = 300
_LISTENER_OPS: Final = frozenset({"down", "down_for"})


class AdminControl(Protocol):
    """The listener control the admin endpoints use (excluding the asking connection)."""

    def down(self, exclude: socket.socket | None = None) -> None:
        """Close the listener and every open connection but ``exclude``."""

    def down_for(self, seconds: float, exclude: socket.socket | None = None) -> None:
        """As :meth:`down`, then reopen after ``seconds``."""


@dataclass
class App:
    """What the handler threads share: storage, faults, the listener, a request counter."""

    store: Store
    faults: Faults
    control: AdminControl
    #: Decode ``Content-Encoding: gzip`` (and ``zstd`` with the zstandard package) bodies
    #: instead of answering 400 as the PandaFuzz master does. Off by default.
    accept_compression: bool = False
    #: Called with one line per request (``pfcollector dev-master`` prints them); None: quiet.
    request_log: Callable[[str], None] | None = None
    _seen: int = 0
    _max_body: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def saw_request(self) -> None:
        """Count one request (admin and health requests excluded)."""
        with self._lock:
            self._seen += 1

    def saw_body(self, size: int) -> None:
        """Note a result request's body size (as sent, before any decompression)."""
        with self._lock:
            self._max_body = max(self._max_body, size)

    def max_body(self) -> int:
        """The largest result request body seen so far, bytes."""
        with self._lock:
            return self._max_body

    def requests_seen(self) -> int:
        """Requests counted so far."""
        with self._lock:
            return self._seen


class HasApp(Protocol):
    """The server as the handler sees it."""

    app: App


class Handler(BaseHandler):
    """The master's endpoints and the ``/_dev/`` admin endpoints."""

    # -- dispatch ----------------------------------------------------------------------------

    @property
    def _app(self) -> App:
        return cast(HasApp, self.server).app

    def request_log(self) -> Callable[[str], None] | None:
        return self._app.request_log

    def do_GET(self) -> None:
        """Answer ``/health`` and the ``/_dev/`` read endpoints."""
        url = urlsplit(self.path)
        try:
            if url.path == "/health":
                self.send_json(200, {"status": "healthy", "timestamp": now_rfc3339()})
            elif url.path == "/_dev/stats":
                self._dev_stats()
            elif url.path == "/_dev/rows":
                kind = parse_qs(url.query).get("kind", [""])[0]
                if kind not in KINDS:
                    self.send_error_json(400, "Unknown kind", kind)
                else:
                    self.send_json(200, {"rows": self._app.store.rows(kind)})
            else:
                self._app.saw_request()
                self._not_found_or_405(url.path)
        except Abort:
            pass

    def do_POST(self) -> None:
        """Route a POST to its endpoint."""
        path = urlsplit(self.path).path
        try:
            if path.startswith("/_dev/"):
                self._dev(path.removeprefix("/_dev/"))
                return
            self._app.saw_request()
            if path.startswith("/api/v1/results/"):
                self._result(path)
            elif path == "/api/v1/bots/register":
                self._register()
            elif path.startswith("/api/v1/bots/") and path.endswith("/heartbeat"):
                self._heartbeat(path.removeprefix("/api/v1/bots/").removesuffix("/heartbeat"))
            else:
                self.read_body(_DEFAULT_LIMIT)
                self.send_error_json(404, "Not Found", path)
        except Abort:
            pass

    def _not_found_or_405(self, path: str) -> None:
        if path.startswith(("/api/v1/results/", "/api/v1/bots/")):
            self.send_error_json(405, "Method Not Allowed", path)
        else:
            self.send_error_json(404, "Not Found", path)

    # -- result endpoints --------------------------------------------------------------------

    def _result(self, path: str) -> None:
        kind = path.removeprefix("/api/v1/results/")
        handlers: dict[str, Callable[[bytes], None]] = {
            "batch": self._batch,
            "status": self._status,
        }
        handler = handlers.get(kind)
        if handler is None and kind in ITEM_FIELDS:
            handler = lambda body: self._item(kind, body)  # noqa: E731
        if handler is None:
            self.read_body(_DEFAULT_LIMIT)
            self.send_error_json(404, "Not Found", path)
            return
        plan = self._app.faults.take()
        if plan.reset:
            self.reset()
            return
        limit = _LIMITS.get(path, _DEFAULT_LIMIT)
        body = self.read_body(limit)
        self._app.saw_body(len(body))
        if plan.delay:
            time.sleep(plan.delay)
        if plan.fail_status is not None:
            self._injected(plan)
            return
        if kind == "batch":
            self._require_json_type()
        body = self._content_decoded(body, limit)
        handler(body)

    def _injected(self, plan: Plan) -> None:
        headers = {}
        if plan.retry_after is not None:
            ra = plan.retry_after
            headers["Retry-After"] = str(int(ra)) if ra == int(ra) else f"{ra:g}"
        status = cast(int, plan.fail_status)
        self.send_error_json(status, "Injected fault", "devmaster fail_next", **headers)

    def _require_json_type(self) -> None:
        if self.headers.get("Content-Type") != "application/json":
            self.send_error_json(
                415,
                "Content-Type must be application/json",
                self.headers.get("Content-Type") or "missing",
            )
            raise Abort

    def _refuse_encoding(self) -> None:
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            self.send_error_json(
                400, "Invalid request body", f"unsupported Content-Encoding {encoding!r}"
            )
            raise Abort

    def _content_decoded(self, body: bytes, limit: int) -> bytes:
        """The body as sent, or decompressed (within ``limit``) when ``accept_compression``."""
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return body
        if not self._app.accept_compression or encoding not in ("gzip", "zstd"):
            self.send_error_json(
                400, "Invalid request body", f"unsupported Content-Encoding {encoding!r}"
            )
            raise Abort
        try:
            plain = _decompress(body, encoding, limit + 1)
        except (OSError, EOFError, zlib.error, ValueError, ImportError) as exc:
            self.send_error_json(400, "Invalid request body", f"cannot decode {encoding}: {exc}")
            raise Abort from None
        if len(plain) > limit:
            self.send_error_json(413, "Request body too large")
            raise Abort
        return plain

    def _decode(self, body: bytes, message: str, fields: Any, strict: bool, where: str) -> Any:
        try:
            return decode_object(parse_json(body), fields, strict=strict, where=where)
        except DecodeError as exc:
            self.send_error_json(400, message, str(exc))
            raise Abort from None

    def _check_rejected(self, ids: list[str]) -> None:
        status = self._app.faults.rejection(ids)
        if status is not None:
            self.send_error_json(status, "Injected rejection", "devmaster reject_ids")
            raise Abort

    def _item(self, kind: str, body: bytes) -> None:
        noun = _NOUNS[kind]
        self.items = 1
        item = self._decode(body, f"Invalid {noun}", ITEM_FIELDS[kind], False, _GO_NAMES[kind])
        self._check_rejected([item["id"]])
        if not item["job_id"] or not item["bot_id"]:
            self.send_error_json(400, "Job ID and Bot ID are required")
            return
        app = self._app
        (err,) = app.store.store_items(kind, [item], app.faults.failing_ids())
        if err is not None:
            self.send_error_json(500, f"Failed to process {noun}", err)
            return
        answer: dict[str, Any] = {"status": "processed", f"{kind}_id": item["id"]}
        if kind == "crash":
            answer["is_unique"] = True
        answer["timestamp"] = now_rfc3339()
        self.send_json(200, answer)

    def _status(self, body: bytes) -> None:
        self.items = 1
        try:
            value = parse_json(body)
        except DecodeError as exc:
            self.send_error_json(400, "Invalid status update", str(exc))
            return
        if value is not None and not isinstance(value, dict):
            self.send_error_json(
                400,
                "Invalid status update",
                "json: cannot unmarshal into Go value of type map[string]interface {}",
            )
            return
        self._app.store.store_status(value)
        self.send_json(200, {"status": "received", "timestamp": now_rfc3339()})

    def _batch(self, body: bytes) -> None:
        req = self._decode(body, "Invalid request body", BATCH_FIELDS, True, "BatchResultRequest")
        lists: dict[str, list[dict[str, Any]]] = {}
        for key, kind in _BATCH_LISTS:
            where = f"BatchResultRequest.{key}"
            try:
                lists[kind] = [
                    decode_object(v, ITEM_FIELDS[kind], strict=True, where=where)
                    for v in req[key] or []
                ]
            except DecodeError as exc:
                self.send_error_json(400, "Invalid request body", str(exc))
                return
        self.items = sum(len(items) for items in lists.values())
        self._check_rejected([i["id"] for items in lists.values() for i in items])
        if not req["bot_id"] or not req["job_id"]:
            self.send_error_json(400, "Bot ID and Job ID are required")
            return
        app = self._app
        failing = app.faults.failing_ids()
        errors: list[str] = []
        processed: dict[str, int] = {}
        for key, kind in _BATCH_LISTS:
            for item in lists[kind]:
                item["bot_id"], item["job_id"] = req["bot_id"], req["job_id"]
            results = app.store.store_items(kind, lists[kind], failing)
            errors.extend(f"{kind} {i}: {e}" for i, e in enumerate(results) if e is not None)
            processed[key] = sum(e is None for e in results)
        answer: dict[str, Any] = {
            "status": "processed",
            "bot_id": req["bot_id"],
            "job_id": req["job_id"],
            "processed": processed,
            "timestamp": now_rfc3339(),
        }
        if errors:
            answer["errors"] = errors
            answer["partial_success"] = True
        self.send_json(200, answer)

    # -- bots --------------------------------------------------------------------------------

    def _register(self) -> None:
        body = self.read_body(_DEFAULT_LIMIT)
        self._require_json_type()
        self._refuse_encoding()
        req = self._decode(
            body, "Invalid request body", REGISTER_FIELDS, True, "BotRegisterRequest"
        )
        try:
            validate_register(req)
        except DecodeError as exc:
            self.send_error_json(400, "Validation failed", str(exc))
            return
        bot_id = self._app.store.register_bot(req)
        now = time.time()
        answer = {
            "bot_id": bot_id,
            "status": "registered",
            "timestamp": now_rfc3339(),
            "timeout": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + _REGISTER_TIMEOUT_S)),
        }
        # The master answers this one, wrongly, as text/plain (Go sniffs the type).
        self.send_json(201, answer, sort_keys=False, content_type="text/plain; charset=utf-8")

    def _heartbeat(self, bot_id: str) -> None:
        body = self.read_body(_DEFAULT_LIMIT)
        self._refuse_encoding()
        req = self._decode(
            body, "Invalid request body", HEARTBEAT_FIELDS, False, "BotHeartbeatRequest"
        )
        if req["status"] not in HEARTBEAT_STATUSES:
            self.send_error_json(
                400, "Invalid request body", f"invalid bot status {req['status']!r}"
            )
            return
        if not bot_id or "/" in bot_id or not self._app.store.heartbeat(bot_id, req):
            self.send_error_json(404, "Bot not found", bot_id)
            return
        now = time.time()
        self.send_json(
            200,
            {
                "status": "ok",
                "timestamp": now_rfc3339(),
                "timeout": time.strftime(
                    "%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + _REGISTER_TIMEOUT_S)
                ),
            },
        )

    # -- admin -------------------------------------------------------------------------------

    def _dev_stats(self) -> None:
        app = self._app
        self.send_json(
            200,
            {
                "counts": {kind: app.store.count(kind) for kind in KINDS},
                "requests_seen": app.requests_seen(),
                "max_body_bytes": app.max_body(),
                "submissions": app.store.submissions(),
            },
        )

    def _dev(self, op: str) -> None:
        body = self.read_body(_DEFAULT_LIMIT)
        try:
            args = parse_json(body) if body.strip() else {}
            if not isinstance(args, dict):
                raise DecodeError("expected a JSON object")
            action = self._dev_action(op, args)
            if action is None:
                self.send_error_json(404, "Not Found", f"/_dev/{op}")
                return
            if op not in _LISTENER_OPS:
                action()
                self.send_json(200, {"ok": True})
                return
            if op == "down_for":
                float(args["seconds"])  # refuse a bad value before going down
        except (DecodeError, TypeError, ValueError, KeyError) as exc:
            self.send_error_json(400, f"Bad /_dev/{op} request", str(exc))
            return
        # Down first, then answer on this connection (spared by the shutdown, then closed), so
        # that a client's next request already finds the port closed.
        action()
        self.close_connection = True
        self.send_json(200, {"ok": True})

    def _dev_action(self, op: str, a: dict[str, Any]) -> Callable[[], None] | None:
        f = self._app.faults
        control, me = self._app.control, self.connection
        actions: dict[str, Callable[[], None]] = {
            "fail_next": lambda: f.fail_next(
                int(a["n"]), int(a.get("status", 503)), _opt_float(a.get("retry_after"))
            ),
            "down_for": lambda: control.down_for(float(a["seconds"]), exclude=me),
            "down": lambda: control.down(exclude=me),
            "slow": lambda: f.slow(float(a["seconds"]), _opt_int(a.get("n"))),
            "reject_ids": lambda: f.reject_ids(_str_list(a["ids"]), int(a.get("status", 400))),
            "partial_fail_ids": lambda: f.partial_fail_ids(_str_list(a["ids"])),
            "reset_next": lambda: f.reset_next(int(a["n"])),
            "clear": f.clear,
        }
        return actions.get(op)


def _decompress(body: bytes, encoding: str, max_size: int) -> bytes:
    """Decompress at most ``max_size`` bytes (a bomb stops there)."""
    if encoding == "gzip":
        with gzip.GzipFile(fileobj=io.BytesIO(body)) as f:
            return f.read(max_size)
    import zstandard  # type: ignore[import-not-found,unused-ignore]

    reader = zstandard.ZstdDecompressor().stream_reader(body)
    return bytes(reader.read(max_size))


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _str_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("ids must be a list of strings")
    return value
