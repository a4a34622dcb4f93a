"""Secrets are never printed (issue 15, docs/security.md "The master and the network").

A token set in each supported way, and a password in the master URL, never appear in the log,
``status``, ``config show``, ``/metrics`` or dead letters, even when a hostile master echoes
them back in its answers, or the HTTP library puts them in an error.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from typer.testing import CliRunner

from pfcollector.breaker import CircuitBreaker
from pfcollector.cli import app
from pfcollector.config import Config, ConfigError, load
from pfcollector.events import Kind
from pfcollector.logs import setup_logging
from pfcollector.redact import redact, redact_url
from pfcollector.sender import Batch, RetryPolicy, Sender
from pfcollector.server import ConnectionInfo
from pfcollector.transport import request_headers
from tests.conftest import make_event, start_daemon
from tests.wire import RawClient, event

TOKEN = "s3cr3t-T0ken_value"
PASSWORD = "P4SSW0RD"
SECRETS = (TOKEN, PASSWORD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EchoMaster:
    """A master that answers every request with the credentials it was sent: first 500, then
    400 (so the event becomes a dead letter with the echo as the master's error)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        master = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                auth = self.headers.get("Authorization", "")
                master.seen.append(auth)
                scheme, _, credential = auth.partition(" ")
                decoded = base64.b64decode(credential).decode() if scheme == "Basic" else ""
                echo = (
                    f"Authorization: {auth} (credential {credential}, decoded {decoded}, as a "
                    f"URL http://{decoded or credential}@master)"
                )
                status = 500 if len(master.seen) == 1 else 400
                body = json.dumps({"error": "echo", "details": echo}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> EchoMaster:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def captured_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    setup_logging("debug", "kv", stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def assert_no_secret(where: str, text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} in {where}: {text}"


def token_ways(tmp_path: Path) -> dict[str, tuple[dict[str, Any], dict[str, str], Path | None]]:
    """Each supported way to set the token: (flags, environment, settings file)."""
    secret_file = tmp_path / "token"
    secret_file.write_text(TOKEN + "\n")  # a mounted secret ends with a newline
    toml_token = tmp_path / "token.toml"
    toml_token.write_text(f'token = "{TOKEN}"\n')
    toml_file = tmp_path / "token_file.toml"
    toml_file.write_text(f'token_file = "{secret_file}"\n')
    return {
        "env PFCOLLECTOR_TOKEN": ({}, {"PFCOLLECTOR_TOKEN": TOKEN + "\n"}, None),
        "env PFCOLLECTOR_TOKEN_FILE": ({}, {"PFCOLLECTOR_TOKEN_FILE": str(secret_file)}, None),
        "flag --token-file": ({"token_file": secret_file}, {}, None),
        "file token": ({}, {}, toml_token),
        "file token_file": ({}, {}, toml_file),
        # httpx sends URL credentials as Basic auth (instead of a token, if both are set).
        "master URL password": ({}, {"PFCOLLECTOR_MASTER_URL": "userinfo"}, None),
    }


WAYS = (
    "env PFCOLLECTOR_TOKEN",
    "env PFCOLLECTOR_TOKEN_FILE",
    "flag --token-file",
    "file token",
    "file token_file",
    "master URL password",
)


@pytest.mark.parametrize("way", WAYS)
async def test_no_secret_in_log_status_metrics_or_dead_letters(
    way: str, tmp_path: Path, sock_dir: Path, nursery: trio.Nursery, captured_log: io.StringIO
) -> None:
    flags, env, file = token_ways(tmp_path)[way]
    port = free_port()
    with EchoMaster() as master:
        userinfo = f"bot:{PASSWORD}@" if env.pop("PFCOLLECTOR_MASTER_URL", None) else ""
        flags = flags | {
            "socket_path": sock_dir / "pf.sock",
            "data_dir": tmp_path / "data",
            "master_url": master.url(userinfo),
            "bot_id": "bot-1",
            "coalesce": False,
            "flush_interval": 0.1,
            "retry_base": 0.01,
            "retry_cap": 0.02,
            "metrics_addr": f"127.0.0.1:{port}",
        }
        config = load(flags, config_file=file, env=env).config
        expected = f"Basic {base64.b64encode(f'bot:{PASSWORD}'.encode()).decode()}"
        if not userinfo:
            assert config.token == TOKEN  # stripped
            expected = f"Bearer {TOKEN}"
        daemon = await start_daemon(nursery, config)
        client = await RawClient.connect(config.socket_path)
        await client.hello()
        await client.send(event(1, Kind.CRASH))
        with trio.fail_after(15):
            while not daemon.spool.dead_letters(10):
                await trio.sleep(0.02)
        assert master.seen[0] == expected  # the secret did reach the master
        status = await daemon.status()
        assert status["delivery"]["sender"]["last_error"]["text"]  # the echo of the 500
        peer = ConnectionInfo(0, 1, 0, 0, 0.0)
        rows = await daemon.control("dead_letters", {}, peer)
        assert "echo" in rows[0]["error"] and "***" in rows[0]["error"]
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        await client.aclose()
        daemon.stop()
    assert "master refused" in captured_log.getvalue()  # the dead letter was logged
    assert_no_secret("the log", captured_log.getvalue())
    assert_no_secret("status", json.dumps(status))
    assert_no_secret("dead letters (reply)", json.dumps(rows))
    assert_no_secret("dead letters (spool)", json.dumps(daemon.spool.dead_letters(10)))
    assert_no_secret("metrics", metrics)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("as_json", [False, True])
def test_no_secret_in_config_show(way: str, as_json: bool, tmp_path: Path) -> None:
    flags, env, file = token_ways(tmp_path)[way]
    env.pop("PFCOLLECTOR_MASTER_URL", None)
    args = ["config", "show", "--master", f"http://bot:{PASSWORD}@master:8080", "--bot-id", "b"]
    if "token_file" in flags:
        args += ["--token-file", str(flags["token_file"])]
    if file is not None:
        args += ["--config", str(file)]
    if as_json:
        args.append("--json")
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "***" in result.output
    assert_no_secret("config show", result.output)


def test_the_token_flag_is_gone() -> None:
    """``--token`` showed the secret in ``ps``; the file or the variable replace it."""
    result = CliRunner().invoke(app, ["config", "show", "--token", TOKEN])
    assert result.exit_code == 2
    assert "--token-file" in CliRunner().invoke(app, ["serve", "--help"]).output


@pytest.mark.parametrize(
    ("value", "what"),
    [("tök\u00e9n", "non-ASCII"), ("two words", "white space"), ("a,b", "a character")],
)
def test_a_bad_token_is_refused_naming_the_setting_not_the_value(value: str, what: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({}, env={"PFCOLLECTOR_TOKEN": value})
    message = str(info.value)
    assert message.startswith("token: ") and what in message
    assert "env PFCOLLECTOR_TOKEN" in message and value not in message


def test_a_bad_token_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "token"
    bad.write_bytes("tök\u00e9n\n".encode())
    with pytest.raises(ConfigError, match=r"^token_file: .*token: has a non-ASCII byte"):
        load({"token_file": bad}, env={})
    with pytest.raises(ConfigError, match="No such file"):
        load({"token_file": tmp_path / "missing"}, env={})


def test_the_token_is_not_in_the_configs_repr() -> None:
    config = Config(token=TOKEN)
    assert config.token == TOKEN and TOKEN not in repr(config)


def test_token_and_token_file_are_one_setting(tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text("from-the-file\n")
    env = {"PFCOLLECTOR_TOKEN": "from-the-env", "PFCOLLECTOR_TOKEN_FILE": str(secret_file)}
    with pytest.raises(ConfigError, match="set token or token_file, not both"):
        load({}, env=env)
    flag = load({"token_file": secret_file}, env={"PFCOLLECTOR_TOKEN": "from-the-env"}).config
    assert flag.token == "from-the-file"  # a flag beats a variable


def test_a_non_ascii_token_never_reaches_a_request() -> None:
    """It used to raise inside the sender; now it is refused where the headers are made."""
    with pytest.raises(ValueError, match=r"^token: has a non-ASCII character") as info:
        request_headers("bot", "tök\u00e9n")
    assert "tök" not in str(info.value)


async def test_an_http_library_error_with_the_secret_is_redacted() -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(
            f"cannot send {request.headers['Authorization']!r} to http://bot:{PASSWORD}@master "
            f"(token {TOKEN})"
        )

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(fail), base_url="http://m"
    ) as client:
        sender = Sender(
            client,
            bot_id="bot-1",
            breaker=CircuitBreaker(failure_threshold=100),
            retry=RetryPolicy(attempts=1, base=0.0, cap=0.0),
            token=TOKEN,
        )
        Config(master_url=f"http://bot:{PASSWORD}@master", bot_id="b")  # registers the password
        result = await sender.deliver(Batch(Kind.CRASH, "job-1", [make_event(Kind.CRASH)]))
    assert result.requeue and result.reason
    text = sender.stats.last_error or ""
    assert "ConnectError" in text and "***" in text
    assert_no_secret("last_error", text)
    assert_no_secret("requeue reason", result.reason)


@pytest.mark.parametrize(
    "text",
    [
        "Illegal header value b'Bearer abc.DEF-123\\n'",
        "Authorization: Basic Ym90OnB3",
        "{'authorization': 'Bearer zz9'}",
        "GET https://user:pa%40ss@host/x failed",
        "GET https://only-a-token@host/x failed",
    ],
)
def test_redact_masks_credentials_it_was_never_told_of(text: str) -> None:
    masked = redact(text)
    assert "***" in masked
    for secret in ("abc.DEF-123", "Ym90OnB3", "zz9", "pa%40ss", "only-a-token"):
        assert secret not in masked


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "token: must be a string; master http://127.0.0.1:8080 answered 503"
    assert redact(text) == text
    assert redact_url("http://u:p@host:1/x?q") == "http://***@host:1/x?q"
    assert redact_url("http://host:1/x") == "http://host:1/x"


def test_json_log_lines_are_redacted_too(captured_log: io.StringIO) -> None:
    setup_logging("info", "json", captured_log)
    logging.getLogger("pfcollector.test").warning(
        "answer: %s", f"Authorization: Bearer {TOKEN}", extra={"url": f"http://u:{PASSWORD}@h"}
    )
    line = json.loads(captured_log.getvalue())
    assert_no_secret("a json log line", json.dumps(line))
    assert line["msg"] == "answer: Authorization: Bearer ***"
