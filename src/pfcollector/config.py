"""Settings, validated once at start, and the default paths every part agrees on.

The socket path rule is shared with the thin client (``pfclient.default_socket_path``, which
cannot import this module): ``$PFCOLLECTOR_SOCKET``, else ``$XDG_RUNTIME_DIR/pfcollector.sock``,
else ``/tmp/pfcollector-<uid>.sock``. The data directory is ``$PFCOLLECTOR_DATA_DIR``, else
``$XDG_DATA_HOME/pfcollector``, else ``~/.local/share/pfcollector``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

__all__ = [
    "Config",
    "ConfigError",
    "default_data_dir",
    "default_socket_path",
]

MIN_FLUSH_INTERVAL = 0.1


class ConfigError(ValueError):
    """A setting has a value it cannot take. The message names the key and what is allowed."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """The socket path when none is given (the rule is in the module docstring)."""
    env = os.environ if env is None else env
    if env.get("PFCOLLECTOR_SOCKET"):
        return Path(env["PFCOLLECTOR_SOCKET"])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "pfcollector.sock"
    return Path(f"/tmp/pfcollector-{os.getuid()}.sock")


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """The data directory when none is given (the rule is in the module docstring)."""
    env = os.environ if env is None else env
    if env.get("PFCOLLECTOR_DATA_DIR"):
        return Path(env["PFCOLLECTOR_DATA_DIR"])
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]) / "pfcollector"
    return Path.home() / ".local" / "share" / "pfcollector"


@dataclass(frozen=True)
class Config:
    """Everything the daemon needs to know. Construction validates every field.

    ``master_url`` ``None`` means local mode: events are spooled and kept, nothing is sent.
    """

    socket_path: Path = dataclasses.field(default_factory=default_socket_path)
    data_dir: Path = dataclasses.field(default_factory=default_data_dir)
    master_url: str | None = None
    bot_id: str | None = None
    register: bool = False
    token: str | None = None
    delivery_mode: Literal["batch", "item"] = "batch"
    batch_size: int = 100
    batch_bytes: int = 512 * 1024
    flush_interval: float = 10.0
    max_frame: int = 16 * 1024 * 1024
    max_connections: int = 256
    socket_mode: int = 0o660
    spool_max_bytes: int = 1024**3
    drain_deadline: float = 30.0
    retry_attempts: int = 4
    retry_base: float = 0.5
    retry_cap: float = 30.0
    breaker_threshold: int = 5
    breaker_reset: float = 1.0
    breaker_max_reset: float = 60.0
    http_timeout: float = 10.0
    heartbeat_interval: float = 30.0
    senders: int = 4
    crash_dedupe: bool = True
    coalesce: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "socket_path", Path(self.socket_path))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.master_url is not None:
            parts = urlsplit(self.master_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(
                    "master_url", f"must be an http:// or https:// URL, got {self.master_url!r}"
                )
            object.__setattr__(self, "master_url", self.master_url.rstrip("/"))
            if not self.bot_id and not self.register:
                raise ConfigError(
                    "bot_id", "a master needs --bot-id, or --register to get one from it"
                )
        if self.bot_id is not None and not self.bot_id.strip():
            raise ConfigError("bot_id", "must not be empty")
        if self.delivery_mode not in ("batch", "item"):
            raise ConfigError(
                "delivery_mode", f"must be 'batch' or 'item', got {self.delivery_mode!r}"
            )
        _at_least("batch_size", self.batch_size, 1, 10_000)
        _at_least("batch_bytes", self.batch_bytes, 1024, 1024 * 1024 - 4096)
        _at_least("flush_interval", self.flush_interval, MIN_FLUSH_INTERVAL, 3600.0)
        _at_least("max_frame", self.max_frame, 1024, 64 * 1024 * 1024)
        _at_least("max_connections", self.max_connections, 1, 65_536)
        _at_least("spool_max_bytes", self.spool_max_bytes, 1024 * 1024, 2**50)
        _at_least("drain_deadline", self.drain_deadline, 0.0, 3600.0)
        _at_least("retry_attempts", self.retry_attempts, 1, 100)
        _at_least("retry_base", self.retry_base, 0.001, 60.0)
        _at_least("retry_cap", self.retry_cap, self.retry_base, 3600.0)
        _at_least("breaker_threshold", self.breaker_threshold, 1, 1000)
        _at_least("breaker_reset", self.breaker_reset, 0.01, 3600.0)
        _at_least("breaker_max_reset", self.breaker_max_reset, self.breaker_reset, 86_400.0)
        _at_least("http_timeout", self.http_timeout, 0.1, 600.0)
        _at_least("heartbeat_interval", self.heartbeat_interval, 1.0, 3600.0)
        _at_least("senders", self.senders, 1, 64)
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(
                "socket_mode", f"must be a permission mode like 0o660, got {self.socket_mode:o}"
            )

    @property
    def local_mode(self) -> bool:
        """True when no master is configured: events are kept in the local store."""
        return self.master_url is None

    @property
    def spool_path(self) -> Path:
        """The SQLite spool database."""
        return self.data_dir / "spool.db"

    @property
    def inputs_dir(self) -> Path:
        """The content-addressed directory of crash inputs."""
        return self.data_dir / "inputs"

    def public(self) -> dict[str, Any]:
        """The effective configuration as plain JSON-able values, secrets masked."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            if f.name == "token" and value:
                value = "***"
            out[f.name] = value
        out["socket_mode"] = f"0o{self.socket_mode:o}"
        out["mode"] = "local" if self.local_mode else "master"
        return out


def _at_least(key: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {low} and {high}, got {value}")
