"""Settings, validated once at start, and the default paths every part agrees on.

Where a setting comes from, highest first: a command-line flag, an environment variable
``PFCOLLECTOR_<KEY>`` (``PFCOLLECTOR_BATCH_SIZE``; the socket is ``PFCOLLECTOR_SOCKET``, the
name the thin client reads too), the TOML file, the built-in default. The file is ``--config``,
else ``$PFCOLLECTOR_CONFIG``, else ``/etc/pfcollector/pfcollector.toml`` if it exists, else
``$XDG_CONFIG_HOME/pfcollector/config.toml`` (``~/.config/...``) if it exists, else none. Its
keys are the field names of :class:`Config`, at the top level. Every value is checked at start;
an error names the key (and the variable or file it came from) and what is allowed, and a key
nobody knows in the file is an error too. A ``PFCOLLECTOR_*`` variable that names no key is a
warning (the prefix is shared with the client and the tools), with a suggestion if one is close.

The socket path rule is shared with the thin client (``pfclient.default_socket_path``, which
cannot import this module): ``$PFCOLLECTOR_SOCKET``, else ``$XDG_RUNTIME_DIR/pfcollector.sock``,
else ``/tmp/pfcollector-<uid>.sock``. The data directory is ``$PFCOLLECTOR_DATA_DIR``, else
``$XDG_DATA_HOME/pfcollector``, else ``~/.local/share/pfcollector``.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import importlib.util
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .bugs import dedupe_mode

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "RUNTIME_KEYS",
    "SYSTEM_CONFIG_FILE",
    "Config",
    "ConfigError",
    "Loaded",
    "check_file",
    "default_config_file",
    "default_data_dir",
    "default_socket_path",
    "env_name",
    "load",
    "read_file",
    "runtime_changes",
]

MIN_FLUSH_INTERVAL = 0.1
#: Prefix of every environment variable that sets a key.
ENV_PREFIX = "PFCOLLECTOR_"
#: The variable naming the configuration file (not a key itself).
CONFIG_ENV = "PFCOLLECTOR_CONFIG"
#: The system-wide configuration file, read when it exists and no other file is named.
SYSTEM_CONFIG_FILE = Path("/etc/pfcollector/pfcollector.toml")
#: Keys a running daemon applies on SIGHUP; every other change needs a restart.
RUNTIME_KEYS = ("batch_size", "flush_interval", "log_level")

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("kv", "json")
COMPRESSIONS = ("none", "gzip", "zstd")
_ENV_OVERRIDES = {"socket_path": "PFCOLLECTOR_SOCKET"}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


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


def default_config_file(env: Mapping[str, str] | None = None) -> Path | None:
    """The configuration file read when none is named, or ``None`` (see the module docstring)."""
    env = os.environ if env is None else env
    if SYSTEM_CONFIG_FILE.is_file():
        return SYSTEM_CONFIG_FILE
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    user = base / "pfcollector" / "config.toml"
    return user if user.is_file() else None


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
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["kv", "json"] = "kv"
    metrics_addr: str | None = None
    compression: Literal["none", "gzip", "zstd"] = "none"
    compression_threshold: int = 1024
    crash_dedupe: Literal["bug", "input", "off"] | bool = "bug"  # a bool: its older form
    coalesce: bool = True
    # Connection limits (docs/security.md). 0 switches a timeout or the rate cap off.
    idle_timeout: float = 3600.0
    slow_sender_timeout: float = 30.0
    rate_limit: float = 200_000.0
    allow_uids: str | None = None
    allow_gids: str | None = None
    socket_group: str | None = None

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
        _one_of("delivery_mode", self.delivery_mode, ("batch", "item"))
        try:  # "bug", "input", "off"; true/false (and env's yes/no...) as bug/off (bugs.py)
            object.__setattr__(self, "crash_dedupe", dedupe_mode(self.crash_dedupe))
        except ValueError as exc:
            raise ConfigError("crash_dedupe", str(exc)) from None
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
        _one_of("log_level", self.log_level, LOG_LEVELS)
        _one_of("log_format", self.log_format, LOG_FORMATS)
        if self.metrics_addr is not None:
            parse_host_port(self.metrics_addr)
        _one_of("compression", self.compression, COMPRESSIONS)
        if self.compression == "zstd" and importlib.util.find_spec("zstandard") is None:
            raise ConfigError(
                "compression",
                "zstd needs the zstandard package (pip install zstandard); "
                "allowed here: 'gzip', 'none'",
            )
        _at_least("compression_threshold", self.compression_threshold, 0, 64 * 1024 * 1024)
        _at_least("idle_timeout", self.idle_timeout, 0.0, 7 * 86_400.0)
        _at_least("slow_sender_timeout", self.slow_sender_timeout, 0.0, 3600.0)
        _at_least("rate_limit", self.rate_limit, 0.0, 1e9)
        self.allowed_uids, self.allowed_gids, self.socket_gid  # noqa: B018  (validate now)

    @property
    def allowed_uids(self) -> frozenset[int] | None:
        """Peer uids allowed to connect (``allow_uids``), or None for any."""
        return _id_list("allow_uids", self.allow_uids)

    @property
    def socket_gid(self) -> int | None:
        """The group the socket file is given (``socket_group``: a name or a number)."""
        if self.socket_group is None or not self.socket_group.strip():
            return None
        if self.socket_group.strip().isdigit():
            return int(self.socket_group)
        try:
            return grp.getgrnam(self.socket_group.strip()).gr_gid
        except KeyError:
            raise ConfigError("socket_group", f"no group named {self.socket_group!r}") from None

    @property
    def allowed_gids(self) -> frozenset[int] | None:
        """Peer gids allowed to connect (``allow_gids``), or None for any."""
        return _id_list("allow_gids", self.allow_gids)

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


def parse_host_port(addr: str, key: str = "metrics_addr") -> tuple[str, int]:
    """``"127.0.0.1:9464"`` or ``"[::1]:9464"`` as ``(host, port)``; else :class:`ConfigError`."""
    host, sep, port = addr.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65_535:
        raise ConfigError(key, f"must be HOST:PORT such as 127.0.0.1:9464, got {addr!r}")
    return host, int(port)


def _one_of(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ConfigError(key, f"must be one of {choices}, got {value!r}")


def _id_list(key: str, text: str | None) -> frozenset[int] | None:
    if text is None or not text.strip():
        return None
    try:
        ids = frozenset(int(part) for part in text.replace(",", " ").split())
    except ValueError:
        raise ConfigError(key, f"must be numeric ids separated by commas, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise ConfigError(key, f"ids must not be negative, got {text!r}")
    return ids


def _at_least(key: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(key, f"must be between {low} and {high}, got {value}")


# -- loading: defaults < file < environment < flags ------------------------------------------

_HINTS = typing.get_type_hints(Config)
KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))


def env_name(key: str) -> str:
    """The environment variable that sets ``key``."""
    return _ENV_OVERRIDES.get(key, ENV_PREFIX + key.upper())


_ENV_KEYS = {env_name(k): k for k in KEYS}


@dataclass(frozen=True)
class Loaded:
    """The effective configuration and, per key, where its value came from.

    Attributes:
        config: The validated configuration.
        sources: Key to ``"default"``, ``"file PATH"``, ``"env NAME"`` or ``"flag"``.
        file: The configuration file read, if any.
        warnings: ``PFCOLLECTOR_*`` variables that name no key (with a suggestion when one
            is close). Not errors: the prefix is shared with the client and the tools
            (``PFCOLLECTOR_ALLOW_NO_AFL``), but a typo should not pass unseen.
    """

    config: Config
    sources: dict[str, str]
    file: Path | None
    warnings: tuple[str, ...] = ()


def load(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Loaded:
    """Resolve the configuration from flags, environment, file and defaults, and validate it.

    Args:
        flags: Key to value for the flags given on the command line (``None`` values are
            ignored: the flag was not given).
        config_file: The file ``--config`` named; else the rule of the module docstring.
        env: The environment (``os.environ`` when ``None``).

    Raises:
        ConfigError: A value, a key or the file is wrong; the message says which and where.
    """
    env = os.environ if env is None else env
    path = config_file
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    elif path is None:
        path = default_config_file(env)
    elif not path.is_file():
        raise ConfigError("config", f"{path}: no such file")
    # The defaults of the two paths without their own variables (those are the env layer).
    own = ("PFCOLLECTOR_SOCKET", "PFCOLLECTOR_DATA_DIR")
    rest = {k: v for k, v in env.items() if k not in own}
    values: dict[str, Any] = {
        "socket_path": default_socket_path(rest),
        "data_dir": default_data_dir(rest),
    }
    sources = dict.fromkeys(KEYS, "default")
    if path is not None:
        file_values = read_file(path)
        values.update(file_values)
        sources.update(dict.fromkeys(file_values, f"file {path}"))
    warnings: list[str] = []
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        if not raw.strip():
            continue  # PFCOLLECTOR_SOCKET= (empty) means unset, as in default_socket_path
        key = _ENV_KEYS.get(name)
        if key is None:
            close = difflib.get_close_matches(name, _ENV_KEYS, n=1, cutoff=0.85)
            hint = f"; did you mean {close[0]}?" if close else ""
            warnings.append(f"{name} is not a setting, ignored{hint}")
            continue
        values[key] = _from_env(key, name, raw)
        sources[key] = f"env {name}"
    for key, value in (flags or {}).items():
        if key not in _HINTS:
            raise ConfigError(key, f"unknown setting{_suggest(key, KEYS)}")
        if value is not None:
            values[key] = value
            sources[key] = "flag"
    try:
        config = Config(**values)
    except ConfigError as exc:
        where = sources.get(exc.key, "default")
        raise ConfigError(exc.key, f"{str(exc).partition(': ')[2]} (from {where})") from None
    return Loaded(config, sources, path, tuple(warnings))


def read_file(path: Path) -> dict[str, Any]:
    """The settings of a TOML file, each checked for its type.

    Raises:
        ConfigError: The file cannot be read or parsed, or a key is unknown or mistyped (the
            first problem; :func:`check_file` lists them all).
    """
    values, errors = _read_file(path)
    if errors:
        raise errors[0]
    return values


def check_file(path: Path) -> list[ConfigError]:
    """Every problem of a configuration file on its own (defaults for what it leaves out)."""
    values, errors = _read_file(path)
    if not errors:
        try:
            Config(**values)
        except ConfigError as exc:
            errors.append(exc)
    return errors


def runtime_changes(old: Config, new: Config) -> tuple[dict[str, Any], list[str]]:
    """What a reload may apply (:data:`RUNTIME_KEYS` that changed), and what needs a restart."""
    apply: dict[str, Any] = {}
    restart: list[str] = []
    for key in KEYS:
        before, after = getattr(old, key), getattr(new, key)
        if before == after:
            continue
        if key in RUNTIME_KEYS:
            apply[key] = after
        else:
            restart.append(key)
    return apply, restart


def _read_file(path: Path) -> tuple[dict[str, Any], list[ConfigError]]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        return {}, [ConfigError("config", f"{path}: {exc.strerror or exc}")]
    except tomllib.TOMLDecodeError as exc:
        return {}, [ConfigError("config", f"{path}: not valid TOML: {exc}")]
    values: dict[str, Any] = {}
    errors: list[ConfigError] = []
    for key, value in data.items():
        if key not in _HINTS:
            errors.append(ConfigError(key, f"unknown key in {path}{_suggest(key, KEYS)}"))
            continue
        try:
            values[key] = _typed(key, value)
        except ConfigError as exc:
            errors.append(ConfigError(key, f"{str(exc).partition(': ')[2]} (in {path})"))
    return values, errors


def _typed(key: str, value: Any) -> Any:
    """Check a TOML value against the field's type."""
    hint = _HINTS[key]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is Literal:
        _one_of(key, value, args)
        return value
    base = next((a for a in args if a is not type(None)), hint)
    if key == "socket_mode" and isinstance(value, str):
        return _octal(key, value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
        Path: isinstance(value, str),
    }.get(base, True)  # another type: Config's own validation has the last word
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(base, "a string")
        raise ConfigError(key, f"must be {kind}, got {value!r}")
    return float(value) if base is float else value


def _from_env(key: str, name: str, raw: str) -> Any:
    """Parse an environment variable's text as the field's type."""
    hint = _HINTS[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint)
    text = raw.strip()
    try:
        if optional and not text:
            return None
        if typing.get_origin(hint) is Literal:
            _one_of(key, text, args)
            return text
        if key == "socket_mode":
            return _octal(key, text)
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


def _octal(key: str, text: str) -> int:
    try:
        return int(text.lower().removeprefix("0o"), 8)
    except ValueError:
        raise ConfigError(key, f"must be an octal mode such as 0660, got {text!r}") from None


def _suggest(name: str, known: typing.Iterable[str], what: str = "keys") -> str:
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (known {what}: {', '.join(known)})"
