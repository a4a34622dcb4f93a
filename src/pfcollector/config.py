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
else ``/tmp/pfcollector-<uid>/pfcollector.sock``. The data directory is
``$PFCOLLECTOR_DATA_DIR``, else ``$XDG_DATA_HOME/pfcollector``, else ``~/.local/share/pfcollector``.
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
from .configvalues import (
    ConfigError,
    at_least,
    from_env,
    id_list,
    one_of,
    parse_host_port,
    suggest,
    typed,
)
from .credentials import check_token, read_token_file, remember_url_secrets
from .redact import MASK, redact_url

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
    "parse_host_port",
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
#: Variables that are not daemon settings: the config file's, and the clients' and watchers'.
_CLIENT_ENV = frozenset({CONFIG_ENV, "PFCOLLECTOR_OUTBOX", "PFCOLLECTOR_DAEMON_UID",
                         "PFCOLLECTOR_JOB"})  # fmt: skip


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """The socket path when none is given (the rule is in the module docstring)."""
    env = os.environ if env is None else env
    if env.get("PFCOLLECTOR_SOCKET"):
        return Path(env["PFCOLLECTOR_SOCKET"])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "pfcollector.sock"
    return Path(f"/tmp/pfcollector-{os.getuid()}/pfcollector.sock")  # private dir: sockdir.py


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
    token: str | None = dataclasses.field(default=None, repr=False)  # never in a repr
    #: A file holding the token (a mounted secret); read at start. Not with ``token``.
    token_file: Path | None = None
    delivery_mode: Literal["batch", "item"] = "batch"
    batch_size: int = 100
    batch_bytes: int = 960 * 1024
    flush_interval: float = 10.0
    max_frame: int = 16 * 1024 * 1024
    max_connections: int = 256
    memory_budget: int = 256 * 1024 * 1024
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
    #: Uids allowed the control ops (tune, flush, dead letters, full status) besides the
    #: daemon's own uid and root (docs/security.md).
    admin_uids: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "socket_path", Path(self.socket_path))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.master_url is not None:
            remember_url_secrets(self.master_url)
            parts = urlsplit(self.master_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigError(
                    "master_url",
                    f"must be an http:// or https:// URL, got {redact_url(self.master_url)!r}",
                )
            object.__setattr__(self, "master_url", self.master_url.rstrip("/"))
            if not self.bot_id and not self.register:
                raise ConfigError(
                    "bot_id", "a master needs --bot-id, or --register to get one from it"
                )
        if self.bot_id is not None and not self.bot_id.strip():
            raise ConfigError("bot_id", "must not be empty")
        self._load_token()
        one_of("delivery_mode", self.delivery_mode, ("batch", "item"))
        try:  # "bug", "input", "off"; true/false (and env's yes/no...) as bug/off (bugs.py)
            object.__setattr__(self, "crash_dedupe", dedupe_mode(self.crash_dedupe))
        except ValueError as exc:
            raise ConfigError("crash_dedupe", str(exc)) from None
        at_least("batch_size", self.batch_size, 1, 10_000)
        at_least("batch_bytes", self.batch_bytes, 1024, 1024 * 1024 - 4096)
        at_least("flush_interval", self.flush_interval, MIN_FLUSH_INTERVAL, 3600.0)
        at_least("max_frame", self.max_frame, 1024, 64 * 1024 * 1024)
        at_least("max_connections", self.max_connections, 1, 65_536)
        at_least("memory_budget", self.memory_budget, 16 * 1024 * 1024, 2**40)
        at_least("spool_max_bytes", self.spool_max_bytes, 1024 * 1024, 2**50)
        at_least("drain_deadline", self.drain_deadline, 0.0, 3600.0)
        at_least("retry_attempts", self.retry_attempts, 1, 100)
        at_least("retry_base", self.retry_base, 0.001, 60.0)
        at_least("retry_cap", self.retry_cap, self.retry_base, 3600.0)
        at_least("breaker_threshold", self.breaker_threshold, 1, 1000)
        at_least("breaker_reset", self.breaker_reset, 0.01, 3600.0)
        at_least("breaker_max_reset", self.breaker_max_reset, self.breaker_reset, 86_400.0)
        at_least("http_timeout", self.http_timeout, 0.1, 600.0)
        at_least("heartbeat_interval", self.heartbeat_interval, 1.0, 3600.0)
        at_least("senders", self.senders, 1, 64)
        if not 0 <= self.socket_mode <= 0o777:
            raise ConfigError(
                "socket_mode", f"must be a permission mode like 0o660, got {self.socket_mode:o}"
            )
        one_of("log_level", self.log_level, LOG_LEVELS)
        one_of("log_format", self.log_format, LOG_FORMATS)
        if self.metrics_addr is not None:
            parse_host_port(self.metrics_addr)
        one_of("compression", self.compression, COMPRESSIONS)
        if self.compression == "zstd" and importlib.util.find_spec("zstandard") is None:
            raise ConfigError(
                "compression",
                "zstd needs the zstandard package (pip install zstandard); "
                "allowed here: 'gzip', 'none'",
            )
        at_least("compression_threshold", self.compression_threshold, 0, 64 * 1024 * 1024)
        at_least("idle_timeout", self.idle_timeout, 0.0, 7 * 86_400.0)
        at_least("slow_sender_timeout", self.slow_sender_timeout, 0.0, 3600.0)
        at_least("rate_limit", self.rate_limit, 0.0, 1e9)
        self.allowed_uids, self.allowed_gids, self.socket_gid, self.admins  # noqa: B018

    def _load_token(self) -> None:
        """Strip and check the token; read it from ``token_file`` when that is set instead."""
        if self.token_file is not None:
            object.__setattr__(self, "token_file", Path(self.token_file))
        key, token = "token", self.token
        try:
            if token is None and self.token_file is not None:
                key = "token_file"
                token = read_token_file(self.token_file)
            elif token is not None:
                token = check_token(token)
        except ValueError as exc:
            raise ConfigError(key, str(exc)) from None
        object.__setattr__(self, "token", token)

    @property
    def allowed_uids(self) -> frozenset[int] | None:
        """Peer uids allowed to connect (``allow_uids``), or None for any."""
        return id_list("allow_uids", self.allow_uids)

    @property
    def admins(self) -> frozenset[int]:
        """Uids given the control ops by ``admin_uids`` (the daemon's uid and root always are)."""
        return id_list("admin_uids", self.admin_uids) or frozenset()

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
        return id_list("allow_gids", self.allow_gids)

    @property
    def local_mode(self) -> bool:
        """True when no master is configured: events are kept in the local store."""
        return self.master_url is None

    @property
    def spool_path(self) -> Path:
        """The SQLite spool database."""
        return self.data_dir / "spool.db"

    @property
    def outbox_dir(self) -> Path:
        """Where clients write events the daemon could not acknowledge (``outbox.py``)."""
        return self.data_dir.absolute() / "outbox"

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
                value = MASK
            out[f.name] = value
        if self.master_url is not None:
            out["master_url"] = redact_url(self.master_url)
        out["socket_mode"] = f"0o{self.socket_mode:o}"
        out["mode"] = "local" if self.local_mode else "master"
        return out


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
            (``PFCOLLECTOR_REQUIRE_TOOLCHAINS``), but a typo should not pass unseen.
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
        if not name.startswith(ENV_PREFIX) or name in _CLIENT_ENV:
            continue
        if not raw.strip():
            continue  # PFCOLLECTOR_SOCKET= (empty) means unset, as in default_socket_path
        key = _ENV_KEYS.get(name)
        if key is None:
            close = difflib.get_close_matches(name, _ENV_KEYS, n=1, cutoff=0.85)
            hint = f"; did you mean {close[0]}?" if close else ""
            warnings.append(f"{name} is not a setting, ignored{hint}")
            continue
        values[key] = from_env(key, name, raw, _HINTS[key])
        sources[key] = f"env {name}"
    for key, value in (flags or {}).items():
        if key not in _HINTS:
            raise ConfigError(key, f"unknown setting{suggest(key, KEYS)}")
        if value is not None:
            values[key] = value
            sources[key] = "flag"
    _one_token_source(values, sources)
    try:
        config = Config(**values)
    except ConfigError as exc:
        where = sources.get(exc.key, "default")
        raise ConfigError(exc.key, f"{str(exc).partition(': ')[2]} (from {where})") from None
    return Loaded(config, sources, path, tuple(warnings))


def _one_token_source(values: dict[str, Any], sources: dict[str, str]) -> None:
    """``token`` and ``token_file`` are one setting: the higher layer wins, one layer errs."""
    if values.get("token") is None or values.get("token_file") is None:
        return
    rank = {"flag": 3, "env": 2, "file": 1}
    token, path = (rank.get(sources[k].split()[0], 0) for k in ("token", "token_file"))
    if token == path:
        raise ConfigError(
            "token_file",
            f"set token or token_file, not both (token from {sources['token']}, "
            f"token_file from {sources['token_file']})",
        )
    loser = "token_file" if token > path else "token"
    values[loser], sources[loser] = None, "default"


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
    """Every problem of a configuration file at once, each naming the file: unknown keys and
    wrong types, each value against its range (defaults for the rest), then the whole."""
    values, errors = _read_file(path)
    for key, attempt in [*((k, {k: v}) for k, v in values.items()), ("", values)]:
        try:
            if key or not errors:  # the whole only once each value is right on its own
                Config(**attempt)
        except ConfigError as exc:  # a rule about another key is left to the whole
            if exc.key == key or not key:
                errors.append(ConfigError(exc.key, f"{str(exc).partition(': ')[2]} (in {path})"))
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
            errors.append(ConfigError(key, f"unknown key in {path}{suggest(key, KEYS)}"))
            continue
        try:
            values[key] = typed(key, value, _HINTS[key])
        except ConfigError as exc:
            errors.append(ConfigError(key, f"{str(exc).partition(': ')[2]} (in {path})"))
    return values, errors
