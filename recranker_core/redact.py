"""Credentials out of everything recranker prints or logs: `redact` is the one masking function
(URL passwords, password=/secret= parameters in URLs, connection strings and JSON, and the
secret values this process knows), and `install_log_masking` runs every log record through it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import traceback
from functools import lru_cache
from typing import Any
from urllib.parse import quote, unquote, urlsplit

MASK = "***"
# Known secret values shorter than this are not masked where they appear in free text: "abc"
# would be starred out of every word that contains it, a worse leak of its own.
MIN_SECRET_LENGTH = 4
# Environment variables whose values are secrets wherever they appear.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PGPASSWORD")
# Environment variables holding URLs or connection strings whose password is a secret.
URL_ENV = (
    "RECRANKER_DATABASE_URL",
    "RECRANKER_S3_ENDPOINT",
    "DATABASE_URL",
    "PREFECT_API_DATABASE_CONNECTION_URL",
)

# scheme://user:password@host -> scheme://user:***@host (the password may hold '@' or ':').
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*:)[^/?#\s]*(?=@)")
# password=..., "secret_key": "...", PGPASSWORD=..., in URLs, conninfo, JSON, env dumps, YAML.
_KEYS = (
    r"password|passwd|pgpassword|sslpassword|secret|secret[_-]?key|secret[_-]?access[_-]?key"
    r"|aws[_-]secret[_-]access[_-]key|session[_-]?token|aws[_-]session[_-]token|token"
    r"|api[_-]?key|access[_-]?token|private[_-]?key"
)
# An unquoted value runs to whitespace, '&' or a quote: a bracket right after it is masked too,
# never a piece of the secret left showing.
_PARAMETER = re.compile(
    rf"""(?P<key>(?<![A-Za-z0-9_])(?:{_KEYS})(?![A-Za-z0-9_])["']?\s*[=:]\s*)"""
    r"""(?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s&'"]+)""",
    re.IGNORECASE,
)

_registered: set[str] = set()
_lock = threading.Lock()


def redact(text: str) -> str:
    """``text`` with every credential replaced by ``***``: the password of a URL, the value of a
    password/secret/token parameter (URL query, ``key=value`` connection string, JSON, YAML),
    and any secret value this process knows (AWS and PG environment variables, the password of
    RECRANKER_DATABASE_URL, generated stack credentials).

    >>> redact("postgresql://app:s3cret@db:5432/rec")
    'postgresql://app:***@db:5432/rec'
    >>> redact("postgresql://app@db/rec?sslmode=require&password=s3cret")
    'postgresql://app@db/rec?sslmode=require&password=***'
    >>> redact("host=db user=app password='s3 cret' dbname=rec")
    'host=db user=app password=*** dbname=rec'
    >>> redact("postgresql://localhost/rec")
    'postgresql://localhost/rec'
    """
    if not text:
        return text
    masked = _USERINFO.sub(lambda m: m.group("head") + MASK, text)
    masked = _PARAMETER.sub(lambda m: m.group("key") + MASK, masked)
    for secret in _known_secrets():
        if secret in masked:
            masked = masked.replace(secret, MASK)
    return masked


def redact_value(value: Any) -> Any:
    """``value`` with `redact` applied to every string in it (dicts, lists, tuples)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v) for v in value)
    return value


def register_secret(value: str | None) -> None:
    """Mask ``value`` (and its URL-encoded form) wherever it appears from now on; for secrets
    that do not come from the environment (generated credentials)."""
    if value and len(value) >= MIN_SECRET_LENGTH:
        with _lock:
            _registered.update({value, quote(value, safe="")})


def _known_secrets() -> tuple[str, ...]:
    env = tuple(os.environ.get(name, "") for name in (*SECRET_ENV, *URL_ENV))
    with _lock:
        registered = tuple(sorted(_registered))
    return _secrets_of(env, registered)


@lru_cache(maxsize=8)
def _secrets_of(env: tuple[str, ...], registered: tuple[str, ...]) -> tuple[str, ...]:
    found = set(registered)
    plain = env[: len(SECRET_ENV)]
    found.update(v for v in plain if v)
    for url in env[len(SECRET_ENV) :]:
        found.update(_passwords_in(url))
    for value in list(found):
        found.add(quote(value, safe=""))
        found.add(unquote(value))
    # Longest first, so a secret containing another is masked whole.
    return tuple(sorted((s for s in found if len(s) >= MIN_SECRET_LENGTH), key=len, reverse=True))


def _passwords_in(url: str) -> set[str]:
    """The passwords a URL or a key=value connection string carries."""
    found: set[str] = set()
    if not url:
        return found
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        found.update({password, unquote(password)})
    for match in _PARAMETER.finditer(url):
        value = match.group("value")
        if value[:1] in "'\"" and value[-1:] == value[:1] and len(value) >= 2:
            value = value[1:-1].replace("\\" + value[:1], value[:1]).replace("\\\\", "\\")
        found.update({value, unquote(value)})
    return found


# ---------------------------------------------------------------------------------------------
# logging

_installed = False
_show_tracebacks = False


def show_tracebacks(enabled: bool) -> None:
    """Keep the tracebacks of expected failures (RecrankerError) in log records (`--debug`)."""
    global _show_tracebacks
    _show_tracebacks = enabled


def install_log_masking() -> None:
    """Run every log record this process creates through `redact`, whatever logger or handler
    (console, file, Prefect's API handler) it goes to: its message is formatted and masked at
    creation, its traceback too. A record about an expected failure (a RecrankerError, whose
    message says what to do) keeps one line and loses its traceback unless `show_tracebacks`.
    Idempotent."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
    base = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return mask_record(base(*args, **kwargs))

    logging.setLogRecordFactory(factory)


def mask_record(record: logging.LogRecord) -> logging.LogRecord:
    """The record with its message, traceback and stack masked (see `install_log_masking`)."""
    from recranker_core.errors import RecrankerError

    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken format string: logging reports it itself
        return record
    record.msg, record.args = redact(message), None
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        if isinstance(exc, RecrankerError) and not _show_tracebacks:
            # One line: the message says what to do; the traceback would only bury it.
            said = str(exc)
            if said not in message:
                record.msg = redact(f"{message}: {type(exc).__name__}: {said}")
            record.exc_text = None
        else:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
        # Handlers print exc_text; none of them can format the raw exception again.
        record.exc_info = None
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    return record
