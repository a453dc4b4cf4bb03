"""Connections to PostgreSQL: psycopg for our own SQL and COPY, SQLAlchemy URLs for Great
Expectations. Nothing here holds a global connection; callers own what they open."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import psycopg


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, safe for logs and status lines.

    >>> redact_url("postgresql://app:s3cret@db:5432/rec")
    'postgresql://app:***@db:5432/rec'
    >>> redact_url("postgresql://localhost/rec")
    'postgresql://localhost/rec'
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def libpq_url(url: str) -> str:
    """A URL libpq accepts: SQLAlchemy-style driver suffixes (postgresql+psycopg://) removed."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme.split('+', 1)[0]}{sep}{rest}"


def sqlalchemy_url(url: str) -> str:
    """The same database as a SQLAlchemy URL using the psycopg 3 driver."""
    return "postgresql+psycopg://" + libpq_url(url).partition("://")[2]


def connect(
    url: str, *, autocommit: bool = False, application_name: str = "recranker"
) -> psycopg.Connection:
    """Open a psycopg connection; the caller closes it (use it as a context manager)."""
    import psycopg

    return psycopg.connect(libpq_url(url), autocommit=autocommit, application_name=application_name)
