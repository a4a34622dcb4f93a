"""Secrets out of every text a person or a file can see: one place, used at the boundaries.

Two kinds of secret reach pfcollector: the bearer ``token`` and credentials in the master URL
(``http://bot:P4SSW0RD@master``). Either can come back in text pfcollector did not write: an
HTTP library's error (``Illegal header value b'Bearer ...'``), a proxy or master that echoes
the request in its answer, a traceback. So redaction is applied where text leaves the daemon,
not where it is made:

* every log line (:mod:`pfcollector.logs` formats, then calls :func:`redact`),
* the sender's ``last_error`` (``status``) and every error kept with a dead letter,
* ``status`` and ``config show`` (``Config.public`` masks the token and the URL's userinfo).

:func:`redact` replaces each secret the process knows (:func:`remember`: the configuration
registers its token and URL password when it is built, the HTTP headers their token), and,
for secrets it was never told of, anything that looks like a credential: the value after
``Bearer``/``Basic``/``Authorization:`` and the userinfo of a URL.
"""

from __future__ import annotations

import re
import threading
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit, urlunsplit

_T = TypeVar("_T")

__all__ = ["MASK", "forget_all", "redact", "redact_tree", "redact_url", "remember"]

#: What a secret is replaced with.
MASK = "***"
#: Secrets shorter than this are not searched for as plain text (a 1-character "token" would
#: mask every occurrence of that letter); the patterns below still catch them in headers.
_MIN_KNOWN = 4

_lock = threading.Lock()
_known: frozenset[str] = frozenset()

# "Authorization: Bearer x", "Bearer x", "Basic x", "authorization=x", "'Authorization': 'x'"
_AUTH = re.compile(
    r"(?i)(\b(?:bearer|basic)\s+|\bauthorization\b['\"]?\s*[:=]\s*['\"]?"
    r"(?:(?:bearer|basic)\s+)?)([^\s'\",;}]+)"
)
# scheme://user:password@host or scheme://token@host
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s@'\"]+)@")


def remember(*secrets: str | None) -> None:
    """Add secrets to be masked in every text :func:`redact` sees from now on."""
    global _known
    new = set()
    for secret in secrets:
        if not secret:
            continue
        for form in {secret, secret.strip(), unquote(secret), repr(secret)[1:-1]}:
            if len(form) >= _MIN_KNOWN:
                new.add(form)
    if new - _known:
        with _lock:
            _known = _known | new


def forget_all() -> None:
    """Forget every remembered secret (tests)."""
    global _known
    with _lock:
        _known = frozenset()


def redact(text: str) -> str:
    """``text`` with every known secret, credential header value and URL userinfo masked."""
    if not text:
        return text
    for secret in sorted(_known, key=len, reverse=True):  # longest first: no partial leftovers
        if secret in text:
            text = text.replace(secret, MASK)
    text = _AUTH.sub(lambda m: m.group(1) + MASK, text)
    return _USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)


def redact_tree(value: _T) -> _T:
    """A copy of a JSON-like document (dicts, lists, strings) with :func:`redact` applied to
    every string in it: a reply leaving the daemon (``status``, ``dead_letters``)."""
    return cast(_T, _redact_tree(value))


def _redact_tree(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_tree(v) for v in value]
    return value


def redact_url(url: str) -> str:
    """A URL fit to show: its userinfo (``user:password@``) replaced by ``***@``."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{MASK}@{host}"))
