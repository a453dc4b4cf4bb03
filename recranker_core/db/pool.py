"""Where a worker process gets its PostgreSQL connections: `Connections` opens a fresh one per
use (`FreshConnections`) or lends one from the process's pool (`pooled`), so that code running
once per shard (thousands of times in a run) does not pay a connection set-up each time."""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from recranker_core.db.connect import connect, libpq_url

if TYPE_CHECKING:
    import psycopg

# Connections a process's pool keeps at most: a thread runner's shards run this many at once at
# most (each uses one connection at a time), a Dask worker process runs one or two.
POOL_MAX_SIZE = 8


class Connections(Protocol):
    """A source of connections used as ``with source.connection() as conn``: the transaction
    commits at the end of the block and rolls back when it raises, as psycopg's own."""

    @property
    def url(self) -> str: ...

    def connection(self) -> AbstractContextManager[psycopg.Connection]: ...


@dataclass(frozen=True)
class FreshConnections:
    """A new connection for every use, closed at the end of the block."""

    url: str

    def connection(self) -> AbstractContextManager[psycopg.Connection]:
        return connect(self.url)


@dataclass(frozen=True)
class PooledConnections:
    """Connections lent by this process's pool for `url` (checked before lending: one the server
    closed meanwhile is replaced, not handed out)."""

    url: str
    pool: Any  # psycopg_pool.ConnectionPool

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        with self.pool.connection() as conn:
            yield conn


_POOLS: dict[tuple[int, str], PooledConnections] = {}
_LOCK = threading.Lock()


def pooled(url: str) -> PooledConnections:
    """This process's pool for `url`, opened on first use (a forked or spawned worker process
    opens its own: pools are keyed by process id)."""
    from psycopg_pool import ConnectionPool

    key = (os.getpid(), url)
    with _LOCK:
        found = _POOLS.get(key)
        if found is not None:
            return found
        pool = ConnectionPool(
            libpq_url(url),
            min_size=1,
            max_size=POOL_MAX_SIZE,
            kwargs={"application_name": "recranker"},
            check=ConnectionPool.check_connection,
            open=True,
            name="recranker",
        )
        _POOLS[key] = PooledConnections(url, pool)
        return _POOLS[key]


def connections_for(db: str | Connections) -> Connections:
    """`db` as a source of connections: a URL opens a fresh connection per use."""
    return FreshConnections(db) if isinstance(db, str) else db


@atexit.register
def close_pools() -> None:
    """Close this process's pools (at exit, and in tests that want a clean slate)."""
    with _LOCK:
        mine = [k for k in _POOLS if k[0] == os.getpid()]
        for key in mine:
            _POOLS.pop(key).pool.close()
