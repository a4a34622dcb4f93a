"""The bearer token and the master URL's credentials: where they come from, what they may be.

The token is set by ``token_file`` (``--token-file``, ``PFCOLLECTOR_TOKEN_FILE``, the settings
file), or by ``token`` (``PFCOLLECTOR_TOKEN`` or the settings file; never a flag: flags show in
``ps``). A token file is the usual shape of a mounted secret and ends with a newline: the value
is stripped of surrounding white space, then must be an RFC 6750 ``b64token`` (letters, digits,
``-._~+/``, then ``=`` padding), so that it always makes a valid ASCII header. Errors name the
setting and never the value. Every secret found is handed to :func:`pfcollector.redact.remember`.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .redact import remember

__all__ = ["MAX_TOKEN_BYTES", "check_token", "read_token_file", "remember_url_secrets"]

#: A token file larger than this is not a token.
MAX_TOKEN_BYTES = 16 * 1024
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def check_token(value: str) -> str:
    """The token, stripped, once it is known to be a valid RFC 6750 ``b64token``.

    Raises:
        ValueError: It is empty or has other characters; the message does not show it.
    """
    token = value.strip()
    if not token:
        raise ValueError("is empty")
    if not _B64TOKEN.fullmatch(token):
        bad = next((c for c in token if not _B64TOKEN.fullmatch(c) and c != "="), None)
        what = "white space" if bad is not None and bad.isspace() else "a character"
        if bad is not None and not bad.isascii():
            what = "a non-ASCII character"
        raise ValueError(
            f"has {what} a bearer token cannot hold (RFC 6750: letters, digits, -._~+/ then "
            "'=' padding); the value is not shown"
        )
    remember(token)
    return token


def read_token_file(path: Path) -> str:
    """The token kept in ``path`` (surrounding white space, the final newline, stripped).

    Raises:
        ValueError: The file cannot be read, is too large, or holds no valid token.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path}: not a regular file")
        raw = os.read(fd, MAX_TOKEN_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_TOKEN_BYTES:
        raise ValueError(f"{path}: larger than {MAX_TOKEN_BYTES} bytes, not a token")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: has a non-ASCII byte a bearer token cannot hold") from None
    try:
        return check_token(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def remember_url_secrets(url: str) -> None:
    """Register the user and password of ``url`` (if any) for redaction."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return
    userinfo = parts.netloc.rpartition("@")[0]
    user, _, password = userinfo.partition(":")
    # httpx sends them as Basic auth: the base64 form is as secret as the password.
    basic = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    remember(userinfo, unquote(userinfo), password, unquote(password), basic)
    if password:
        return
    remember(user)  # http://TOKEN@host: the user is the secret
