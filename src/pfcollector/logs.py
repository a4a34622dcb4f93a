"""Log lines an operator's tools can parse: ``key=value`` by default, or one JSON object a line.

Both formats carry ``ts``, ``level``, ``logger`` and ``msg``, then whatever the call passed in
``extra={...}`` (``log.warning("spool near full", extra={"used_pct": 91})``), then ``exc`` for a
traceback. Values with spaces, quotes or ``=`` are quoted in the ``key=value`` format. Every
line goes through :func:`pfcollector.redact.redact`: no credential is logged, whoever wrote the
text it is in.

The daemon logs state changes, never single events, at INFO and above: a breaker opening or
closing, a master coming back, a dead letter, a drain deadline. Per-event and per-attempt
detail is DEBUG.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Final, TextIO

from .redact import redact

__all__ = ["JsonFormatter", "KeyValueFormatter", "set_level", "setup_logging"]

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD: Final = frozenset(
    set(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)))
    | {"message", "asctime"}
)
#: Libraries whose INFO lines are per request: kept at WARNING whatever our level is.
_CHATTY: Final = ("httpx", "httpcore")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    return logging.Formatter().formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{record.msecs:03.0f}"


class _FieldsFormatter(logging.Formatter):
    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """The keys both formats share, in their order."""
        fields: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return fields


class KeyValueFormatter(_FieldsFormatter):
    """``ts=... level=info logger=pfcollector.daemon msg="..." key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        """One line per record."""
        return redact(" ".join(f"{k}={_kv_value(v)}" for k, v in self.fields(record).items()))


class JsonFormatter(_FieldsFormatter):
    """One JSON object per line with the same keys as :class:`KeyValueFormatter`."""

    def format(self, record: logging.LogRecord) -> str:
        """One line per record."""
        fields = self.fields(record)
        return redact(json.dumps(fields, default=str, separators=(",", ":")))


def _kv_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' "=\n\t\\'):
        return text
    return json.dumps(text)  # quoted, with quotes, backslashes and newlines escaped


def setup_logging(level: str = "info", fmt: str = "kv", stream: TextIO | None = None) -> None:
    """Send every log line to ``stream`` (stderr) in ``fmt`` (``kv`` or ``json``) at ``level``.

    Error handling:
        ``ValueError`` for an unknown format or level (the config has validated both).
    """
    formatters: dict[str, type[logging.Formatter]] = {
        "kv": KeyValueFormatter,
        "json": JsonFormatter,
    }
    if fmt not in formatters:
        raise ValueError(f"log format must be 'kv' or 'json', got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatters[fmt]())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)


def set_level(level: str) -> None:
    """Change the level of every pfcollector log line (SIGHUP applies ``log_level`` so)."""
    value = logging.getLevelName(level.upper())
    if not isinstance(value, int):
        raise ValueError(f"log level must be debug, info, warning or error, got {level!r}")
    logging.getLogger().setLevel(value)
