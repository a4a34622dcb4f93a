"""The checks and parsers of single setting values, and the error they raise.

:mod:`pfcollector.config` builds the whole configuration from them; they know nothing of where
a value came from beyond what the caller says. A secret's value (:data:`SECRET_KEYS`) is never
shown in an error.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "SECRET_KEYS",
    "ConfigError",
    "at_least",
    "from_env",
    "id_list",
    "octal",
    "one_of",
    "parse_host_port",
    "suggest",
    "typed",
]

#: Settings whose values are never repeated in an error message.
SECRET_KEYS = frozenset({"token"})
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A setting has a value it cannot take. The message names the key and what is allowed."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def parse_host_port(addr: str, key: str = "metrics_addr") -> tuple[str, int]:
    """``"127.0.0.1:9464"`` or ``"[::1]:9464"`` as ``(host, port)``; else :class:`ConfigError`."""
    host, sep, port = addr.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65_535:
        raise ConfigError(key, f"must be HOST:PORT such as 127.0.0.1:9464, got {addr!r}")
    return host, int(port)


def one_of(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ConfigError(key, f"must be one of {choices}, got {value!r}")


def id_list(key: str, text: str | None) -> frozenset[int] | None:
    if text is None or not text.strip():
        return None
    try:
        ids = frozenset(int(part) for part in text.replace(",", " ").split())
    except ValueError:
        raise ConfigError(key, f"must be numeric ids separated by commas, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise ConfigError(key, f"ids must not be negative, got {text!r}")
    return ids


def at_least(key: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {low} and {high}, got {value}")


def typed(key: str, value: Any, hint: Any) -> Any:
    """Check a TOML value against the field's type ``hint``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        one_of(key, value, args)
        return value
    base = next((a for a in args if a is not type(None)), hint)
    if key == "socket_mode" and isinstance(value, str):
        return octal(key, value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
        Path: isinstance(value, str),
    }.get(base, True)  # another type: Config's own validation has the last word
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(base, "a string")
        shown = "a value not shown" if key in SECRET_KEYS else repr(value)
        raise ConfigError(key, f"must be {kind}, got {shown}")
    return float(value) if base is float else value


def from_env(key: str, name: str, raw: str, hint: Any) -> Any:
    """Parse an environment variable's text as the field's type ``hint``."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint)
    text = raw.strip()
    try:
        if optional and not text:
            return None
        if typing.get_origin(hint) is Literal:
            one_of(key, text, args)
            return text
        if key == "socket_mode":
            return octal(key, text)
        if base is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ConfigError(key, f"must be one of {', '.join(_TRUE + _FALSE)}, got {raw!r}")
        if base is int:
            try:
                return int(text.replace("_", ""))
            except ValueError:
                raise ConfigError(key, f"must be an integer, got {raw!r}") from None
        if base is float:
            try:
                return float(text)
            except ValueError:
                raise ConfigError(key, f"must be a number, got {raw!r}") from None
        return Path(text) if base is Path else raw
    except ConfigError as exc:
        raise ConfigError(key, f"{str(exc).partition(': ')[2]} (from env {name})") from None


def octal(key: str, text: str) -> int:
    try:
        return int(text.lower().removeprefix("0o"), 8)
    except ValueError:
        raise ConfigError(key, f"must be an octal mode such as 0660, got {text!r}") from None


def suggest(name: str, known: typing.Iterable[str], what: str = "keys") -> str:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (known {what}: {', '.join(known)})"
