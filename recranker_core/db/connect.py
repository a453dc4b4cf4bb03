"""Connections to PostgreSQL: psycopg for our own SQL and COPY, SQLAlchemy URLs for Great
Expectations. Nothing here holds a global connection; callers own what they open."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg


def redact_url(url: str) -> str:
    """The URL (or connection string) with every credential replaced by ***: `redact`, the one
    masking function, under the name its callers know.

    >>> redact_url("postgresql://app:s3cret@db:5432/rec?password=s3cret")
    'postgresql://app:***@db:5432/rec?password=***'
    """
    from recranker_core.redact import redact

    return redact(url)


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


def set_memory(conn: psycopg.Connection, name: str, size: str, *, local: bool = True) -> None:
    """Set a memory parameter (`work_mem`, `maintenance_work_mem`) to `size` (a PostgreSQL size
    such as '256MB', sent as a literal): for the rest of the current transaction (SET LOCAL), or
    for the session with `local=False`."""
    from psycopg import sql

    if name not in ("work_mem", "maintenance_work_mem"):
        raise ValueError(f"not a memory parameter: {name!r}")
    conn.execute(
        sql.SQL("SET LOCAL {} = {}" if local else "SET {} = {}").format(
            sql.SQL(name), sql.Literal(size)
        )
    )
