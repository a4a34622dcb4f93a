"""Settings: precedence (flag > env > file > default), errors that name the key, the
``config show`` and ``config check`` commands, and what SIGHUP's reload applies.

Rules of this module: no test reads the real environment or /etc: every ``load`` gets an
explicit ``env`` and the default file locations are pointed into ``tmp_path``; commands run
through typer's ``CliRunner``; error messages are asserted by the key and allowed values they
name, as an operator reads them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from typer.testing import CliRunner

from pfcollector import config as config_mod
from pfcollector.cli import app
from pfcollector.config import Config, ConfigError, check_file, load, runtime_changes
from pfcollector.daemon import Daemon


@pytest.fixture(autouse=True)
def no_system_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod, "SYSTEM_CONFIG_FILE", tmp_path / "etc" / "pfcollector.toml")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name in [n for n in __import__("os").environ if n.startswith("PFCOLLECTOR_")]:
        monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_and_config_still_builds_directly(tmp_path: Path) -> None:
    loaded = load(env={"XDG_RUNTIME_DIR": "/run/user/7"})
    assert loaded.file is None
    assert loaded.config.socket_path == Path("/run/user/7/pfcollector.sock")
    assert set(loaded.sources.values()) == {"default"}
    assert Config(batch_size=5, data_dir=tmp_path).batch_size == 5


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    file = write(
        tmp_path / "pf.toml",
        'batch_size = 10\nflush_interval = 2\nlog_level = "debug"\nsocket_mode = 0o600\n',
    )
    env = {"PFCOLLECTOR_FLUSH_INTERVAL": "3.5", "PFCOLLECTOR_BATCH_SIZE": "15"}
    loaded = load({"batch_size": 20}, config_file=file, env=env)
    c, src = loaded.config, loaded.sources
    assert (c.batch_size, src["batch_size"]) == (20, "flag")
    assert (c.flush_interval, src["flush_interval"]) == (3.5, "env PFCOLLECTOR_FLUSH_INTERVAL")
    assert (c.log_level, src["log_level"]) == ("debug", f"file {file}")
    assert (c.socket_mode, c.retry_cap, src["retry_cap"]) == (0o600, 30.0, "default")


def test_default_file_locations(tmp_path: Path) -> None:
    user = write(tmp_path / "xdg" / "pfcollector" / "config.toml", "senders = 2\n")
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}
    assert load(env=env).file == user
    system = write(tmp_path / "etc" / "pfcollector.toml", "senders = 3\n")
    assert (load(env=env).file, load(env=env).config.senders) == (system, 3)
    named = write(tmp_path / "named.toml", "senders = 5\n")
    assert load(env={**env, "PFCOLLECTOR_CONFIG": str(named)}).config.senders == 5


def test_env_values_are_parsed_by_type() -> None:
    env = {
        "PFCOLLECTOR_SOCKET": "/x/pf.sock",
        "PFCOLLECTOR_REGISTER": "yes",
        "PFCOLLECTOR_MASTER_URL": "http://m:8080/",
        "PFCOLLECTOR_SOCKET_MODE": "0640",
        "PFCOLLECTOR_SPOOL_MAX_BYTES": "2_000_000",
        "PFCOLLECTOR_TOKEN": "",
    }
    c = load(env=env).config
    assert c.socket_path == Path("/x/pf.sock") and c.register is True
    assert c.master_url == "http://m:8080" and c.socket_mode == 0o640
    assert c.spool_max_bytes == 2_000_000 and c.token is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batch_sise = 3\n", "batch_sise: unknown key in .*did you mean 'batch_size'"),
        ('batch_size = "10"\n', "batch_size: must be an integer, got '10'"),
        ("log_level = 'loud'\n", "log_level: must be one of 'debug', 'info', 'warning', 'error'"),
        ('delivery_mode = "bulk"\n', "delivery_mode: must be one of 'batch', 'item'"),
        ("batch_size = 0\n", r"batch_size: must be between 1 and 10000, got 0 \(from file "),
        ("batch_size = \n", "config: .*not valid TOML"),
        ("register = 1\n", "register: must be true or false"),
    ],
)
def test_file_errors_name_the_key_and_what_is_allowed(
    tmp_path: Path, text: str, message: str
) -> None:
    file = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match=message):
        load(config_file=file, env={})


def test_env_and_flag_errors_name_the_variable() -> None:
    loaded = load(env={"PFCOLLECTOR_BACH_SIZE": "3", "PFCOLLECTOR_KILL": "1"})
    assert loaded.warnings == (
        "PFCOLLECTOR_BACH_SIZE is not a setting, ignored; did you mean PFCOLLECTOR_BATCH_SIZE?",
        "PFCOLLECTOR_KILL is not a setting, ignored",
    )
    with pytest.raises(ConfigError, match=r"senders: must be an integer, got 'many' \(from env"):
        load(env={"PFCOLLECTOR_SENDERS": "many"})
    with pytest.raises(ConfigError, match=r"batch_size: must be between .* \(from flag\)"):
        load({"batch_size": -1}, env={})
    with pytest.raises(ConfigError, match=r"config: .*missing.toml: no such file"):
        load(config_file=Path("/nonexistent/missing.toml"), env={})


def test_check_file_lists_every_problem(tmp_path: Path) -> None:
    file = write(tmp_path / "c.toml", 'batch_sise = 3\nflush_interval = "x"\nsenders = 2\n')
    assert [e.key for e in check_file(file)] == ["batch_sise", "flush_interval"]
    assert check_file(write(tmp_path / "ok.toml", "senders = 2\n")) == []
    # values out of range are listed together with the rest, each naming the file
    file = write(tmp_path / "r.toml", 'batch_size = 0\nflush_interval = -1\nbogus = 1\n'
                 'log_level = "loud"\nsenders = "four"\n')  # fmt: skip
    errors = check_file(file)
    assert sorted(e.key for e in errors) == [
        "batch_size", "bogus", "flush_interval", "log_level", "senders"
    ]  # fmt: skip
    assert all(str(file) in str(e) for e in errors)
    # a rule between keys, once every value is right on its own
    errors = check_file(write(tmp_path / "m.toml", 'master_url = "http://m:8080"\n'))
    assert [e.key for e in errors] == ["bot_id"] and str(tmp_path / "m.toml") in str(errors[0])


def test_runtime_changes() -> None:
    old = Config(batch_size=10)
    apply, restart = runtime_changes(old, Config(batch_size=20, log_level="debug", senders=2))
    assert apply == {"batch_size": 20, "log_level": "debug"} and restart == ["senders"]


# -- commands --------------------------------------------------------------------------------

runner = CliRunner()


def test_config_show_text_and_json(tmp_path: Path) -> None:
    file = write(tmp_path / "pf.toml", 'flush_interval = 2.5\ntoken = "s3cret"\n')
    env = {"PFCOLLECTOR_BATCH_SIZE": "42"}
    args = ["config", "show", "--config", str(file), "--senders", "3"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    lines = {line.split("=")[0].strip(): line for line in result.output.splitlines()}
    assert lines["batch_size"].endswith("# env PFCOLLECTOR_BATCH_SIZE")
    assert lines["flush_interval"].startswith("flush_interval = 2.5")
    assert lines["flush_interval"].endswith(f"# file {file}")
    assert lines["senders"].endswith("# flag") and "s3cret" not in result.output
    assert "# master_url (unset)" in result.output
    result = runner.invoke(app, [*args, "--json"], env=env)
    out = json.loads(result.output)
    assert out["file"] == str(file)
    assert out["settings"]["batch_size"] == {"value": 42, "source": "env PFCOLLECTOR_BATCH_SIZE"}
    assert out["settings"]["token"]["value"] == "***"


def test_config_show_refuses_a_bad_setting_in_one_line() -> None:
    result = runner.invoke(app, ["config", "show"], env={"PFCOLLECTOR_LOG_FORMAT": "xml"})
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: log_format: must be one of 'kv', 'json', got 'xml' "
        "(from env PFCOLLECTOR_LOG_FORMAT)"
    ]


def test_config_check(tmp_path: Path) -> None:
    ok = write(tmp_path / "ok.toml", 'batch_size = 50\nmetrics_addr = "127.0.0.1:9464"\n')
    result = runner.invoke(app, ["config", "check", str(ok)])
    assert (result.exit_code, result.output.strip()) == (0, f"{ok}: ok")
    bad = write(tmp_path / "bad.toml", "batch_size = 0\ncompresion = 'gzip'\n")
    result = runner.invoke(app, ["config", "check", str(bad)])
    assert result.exit_code == 2
    assert (
        "compresion: unknown key" in result.output and "did you mean 'compression'" in result.output
    )


def test_serve_refuses_a_bad_setting_before_starting(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", "--batch-size", "0", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: batch_size: must be between 1 and 10000, got 0 (from flag)"
    )


# -- reload (what SIGHUP calls) ----------------------------------------------------------------


async def test_reload_applies_runtime_keys_and_keeps_the_rest(
    tmp_path: Path,
    make_config: Callable[..., Config],
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    file = write(tmp_path / "pf.toml", "batch_size = 10\nflush_interval = 5\n")
    base = make_config(coalesce=False)
    flags = {"socket_path": base.socket_path, "data_dir": base.data_dir, "coalesce": False}
    config = load(flags, config_file=file, env={}).config
    daemon: Daemon = await nursery.start(
        lambda task_status: Daemon(config).run(handle_signals=False, task_status=task_status)
    )
    daemon.config_loader = lambda: load(flags, config_file=file, env={}).config
    root_level = logging.getLogger().level
    try:
        write(file, 'batch_size = 25\nflush_interval = 0.5\nlog_level = "debug"\nsenders = 9\n')
        with caplog.at_level(logging.INFO, logger="pfcollector.daemon"):
            applied = daemon.reload()
        assert applied == {"batch_size": 25, "flush_interval": 0.5, "log_level": "debug"}
        assert (daemon.policy.batch_size, daemon.policy.flush_interval) == (25, 0.5)
        assert daemon.config.senders == 4  # needs a restart: logged, not applied
        assert logging.getLogger().level == logging.DEBUG
        assert "senders changed; applied at the next restart" in caplog.text

        write(file, "batch_size = 0\n")  # a bad file: the running settings stay
        assert daemon.reload() == {}
        assert daemon.policy.batch_size == 25
        assert "settings not reloaded" in caplog.text
    finally:
        logging.getLogger().setLevel(root_level)
        daemon.stop()


def test_empty_variables_count_as_unset(tmp_path: Path) -> None:
    env = {"PFCOLLECTOR_SOCKET": "", "PFCOLLECTOR_BATCH_SIZE": "  ", "HOME": str(tmp_path)}
    loaded = load(env=env)
    assert str(loaded.config.socket_path) != "."
    assert loaded.config.batch_size == 100
    assert loaded.sources["batch_size"] == "default"


def test_memory_budget_from_file_env_and_flag(tmp_path: Path) -> None:
    assert Config().memory_budget == 256 * 1024 * 1024  # the documented default
    file = write(tmp_path / "pf.toml", "memory_budget = 100_000_000\n")
    assert load(config_file=file).config.memory_budget == 100_000_000
    env = {"PFCOLLECTOR_MEMORY_BUDGET": "64_000_000"}
    assert load(env=env, config_file=file).config.memory_budget == 64_000_000
    result = runner.invoke(app, ["config", "show", "--memory-budget", "50000000"], env=env)
    assert result.exit_code == 0, result.output
    assert "memory_budget = 50000000" in result.output and "# flag" in result.output
    with pytest.raises(ConfigError, match="memory_budget"):
        Config(memory_budget=1024)
