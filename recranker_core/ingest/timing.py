"""How long an ingest's steps take: the names IngestResult.seconds gives them, the timer that laps
them, and statements logged when they are slow."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

if TYPE_CHECKING:
    from recranker_core.ingest.run import IngestResult

log = logging.getLogger(__name__)

# The steps of an ingest, as IngestResult.seconds names them when each is done: the merge reads,
# classifies and inserts in one pass. Parts of the merge are added as they end: `classify` (the
# time spent typing rows), `key` (a primary key built again), `validate` and `validate_table`.
_STAGES = ("hash", "stage", "merge")


def _exec(conn: psycopg.Connection, statement: Any, params: Any = None) -> psycopg.Cursor[Any]:
    """Execute, and log statements slow enough for an operator to wonder where the time went."""
    t0 = time.perf_counter()
    cur = conn.execute(statement, params)
    took = time.perf_counter() - t0
    if took > 1.0:
        text = statement.as_string(conn) if isinstance(statement, sql.Composable) else statement
        log.info("%.1fs, %s rows: %s", took, cur.rowcount, " ".join(text.split())[:90])
    return cur


class _Timer:
    def __init__(self) -> None:
        self._t = time.perf_counter()

    def lap(self, result: IngestResult, name: str) -> None:
        now = time.perf_counter()
        result.seconds[name] = round(now - self._t, 3)
        self._t = now
