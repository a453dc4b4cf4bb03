"""Retention of ranking runs: the rows of runs older than `RECRANKER_RANK__RETENTION_DAYS` dropped
(never the published run's), their partitions detached without blocking readers."""

from __future__ import annotations

import logging
import math

import psycopg
from psycopg import sql

from recranker_core.batch_rank.runs import (
    _PARENT,
    _PARTITION_PREFIX,
    PARTITION_SCHEMA,
    partition_name,
)
from recranker_core.db.connect import connect
from recranker_core.errors import ConfigError

log = logging.getLogger(__name__)


# --- retention ----------------------------------------------------------------------------------


def drop_old_runs(database_url: str, retention_days: float) -> list[str]:
    """Drop the rows of runs started more than `retention_days` ago, except the published one;
    their ledger rows stay, marked 'dropped'. Returns the run ids dropped by this call.

    Partitions are detached CONCURRENTLY, so consumers reading the view are never blocked.
    A partition left behind by an interrupted call is removed by the next one.
    """
    if not math.isfinite(retention_days) or retention_days < 0:
        raise ConfigError(f"retention_days must be a number >= 0, got {retention_days}")
    with connect(database_url, autocommit=True) as conn:
        with conn.transaction():
            # SHARE: no publish can make one of these runs current while they are marked.
            conn.execute("LOCK TABLE recranker.published IN SHARE MODE")
            dropped = [
                r[0]
                for r in conn.execute(
                    """UPDATE recranker.ranking_runs
                       SET status = 'dropped', dropped_at = now()
                       WHERE status <> 'dropped'
                         AND started_at < now() - make_interval(secs => %s)
                         AND run_id IS DISTINCT FROM (SELECT run_id FROM recranker.published)
                       RETURNING run_id""",
                    (retention_days * 86400.0,),
                )
            ]
            conn.execute(
                "UPDATE recranker.ranking_shards SET user_ids = '{}' WHERE run_id = ANY(%s)",
                (dropped,),
            )
        leftovers = [
            r[0]
            for r in conn.execute(
                "SELECT run_id FROM recranker.ranking_runs WHERE status = 'dropped' "
                "AND to_regclass(format('%%I.%%I', %s::text, %s::text || run_id)) IS NOT NULL "
                "ORDER BY run_id",
                (PARTITION_SCHEMA, _PARTITION_PREFIX),
            )
        ]
        for run_id in leftovers:
            _drop_partition(conn, run_id)
    if dropped:
        log.info(
            "dropped %d ranking run(s) older than %s days: %s",
            len(dropped),
            retention_days,
            dropped,
        )
    return sorted(dropped)


def _drop_partition(conn: psycopg.Connection, run_id: str) -> None:
    """Detach (outside any transaction, as CONCURRENTLY requires) and drop one run's table."""
    part = partition_name(run_id)
    row = conn.execute(
        "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = to_regclass(%s)",
        (part.as_string(conn),),
    ).fetchone()
    if row is not None:
        mode = sql.SQL("FINALIZE" if row[0] else "CONCURRENTLY")
        conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {} {}").format(_PARENT, part, mode))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(part))
