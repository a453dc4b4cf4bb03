"""A run's rows and its end: shard writes by COPY into the run's own partition, finish, the atomic
publish of the single pointer consumers follow, failure and cancellation."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg import sql

from recranker_core.batch_rank.runs import _run_status, partition_name
from recranker_core.db.connect import connect
from recranker_core.db.pool import Connections, connections_for
from recranker_core.errors import DataError, RunStateError

log = logging.getLogger(__name__)


Source = Literal["llm", "base"]
SOURCES: frozenset[str] = frozenset({"llm", "base"})
_SMALLINT_MAX = 32767
_COLUMNS = ("run_id", "user_id", "rank", "item_id", "score", "base_rank", "source")
_COPY_TYPES = ["text", "text", "int2", "text", "float4", "int2", "text"]


@dataclass(frozen=True, slots=True)
class RecommendationRow:
    """One recommended item of one user: `rank` 1..k after re-ranking, `base_rank` its place
    in the base model's candidate list, `source` who ordered it."""

    user_id: str
    rank: int
    item_id: str
    score: float
    base_rank: int
    source: Source


# --- shard writes -------------------------------------------------------------------------------


def write_shard(
    db: str | Connections,
    run_id: str,
    shard: int,
    rows: Iterable[RecommendationRow],
    *,
    users: list[str],
    llm_users: int,
    base_users: int,
    seconds: float,
    counts: dict[str, int] | None = None,
) -> int:
    """Write one shard's recommendations in one transaction; returns the rows written.

    The run's existing rows of `users` are deleted first, so a retried or duplicated shard
    replaces its rows instead of adding to them. `users` must be the shard's users as assigned
    by start_run. Rows are checked on the way (DataError names the user and the field): the
    user belongs to the shard, ranks are 1..k without gaps or repeats, no item twice, a finite
    score, source 'llm' or 'base'. `counts` are the shard's other tallies (cold users, LLM
    failures, ...), kept with it so that finish_run sums them over every shard of the run.
    """
    wanted = set(users)
    with connections_for(db).connection() as conn:
        # FOR SHARE lets shards be written in parallel but keeps finish/publish/drop out.
        status = _run_status(conn, run_id, lock="FOR SHARE")
        if status != "running":
            raise RunStateError(
                f"ranking run {run_id} is {status!r}: shards are only written while it is "
                "'running' (resume it with start_run and the same run id)"
            )
        # FOR UPDATE: a duplicate writer of the same shard waits, then replaces these rows.
        stored = conn.execute(
            "SELECT user_ids FROM recranker.ranking_shards WHERE run_id = %s AND shard = %s "
            "FOR UPDATE",
            (run_id, shard),
        ).fetchone()
        if stored is None:
            raise RunStateError(f"ranking run {run_id} has no shard {shard}")
        if set(stored[0]) != wanted or len(users) != len(wanted):
            raise DataError(
                f"ranking run {run_id} shard {shard}: the users given ({len(users)}) are not the "
                f"{len(stored[0])} users start_run assigned to it; write each shard with "
                "RunState.shards[shard]"
            )
        if llm_users < 0 or base_users < 0 or llm_users + base_users > len(users):
            raise DataError(
                f"ranking run {run_id} shard {shard}: llm_users={llm_users} and "
                f"base_users={base_users} do not fit its {len(users)} users"
            )
        part = partition_name(run_id)
        conn.execute(
            sql.SQL("DELETE FROM {} WHERE user_id = ANY(%s::text[])").format(part), (users,)
        )
        checker = _RowChecker(run_id, shard, wanted)
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            part, sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
        )
        with conn.cursor() as cur, cur.copy(copy_sql) as copy:
            copy.set_types(_COPY_TYPES)
            for row in rows:
                checker.check(row)
                copy.write_row(
                    (
                        run_id,
                        row.user_id,
                        row.rank,
                        row.item_id,
                        row.score,
                        row.base_rank,
                        row.source,
                    )
                )
        checker.finish()
        conn.execute(
            """UPDATE recranker.ranking_shards
               SET status = 'done', rows = %s, llm_users = %s, base_users = %s, seconds = %s,
                   counts = %s, finished_at = now()
               WHERE run_id = %s AND shard = %s""",
            (
                checker.rows,
                llm_users,
                base_users,
                seconds,
                json.dumps(counts or {}),
                run_id,
                shard,
            ),
        )
    log.debug("run %s shard %d: %d rows for %d users", run_id, shard, checker.rows, len(users))
    return checker.rows


@dataclass
class _RowChecker:
    run_id: str
    shard: int
    users: set[str]
    rows: int = 0
    ranks: dict[str, set[int]] = field(default_factory=dict)
    items: set[tuple[str, str]] = field(default_factory=set)

    def fail(self, row: RecommendationRow, what: str) -> DataError:
        return DataError(
            f"ranking run {self.run_id} shard {self.shard}, user {row.user_id!r}: {what}; "
            "nothing of this shard was written"
        )

    def check(self, row: RecommendationRow) -> None:
        if not isinstance(row.user_id, str) or row.user_id not in self.users:
            raise self.fail(row, "user_id is not one of the shard's users")
        if not isinstance(row.item_id, str) or not row.item_id:
            raise self.fail(row, f"item_id {row.item_id!r} is not a non-empty string")
        for name in ("rank", "base_rank"):
            value = getattr(row, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.fail(row, f"{name} {value!r} is not an integer")
            if not 1 <= value <= _SMALLINT_MAX:
                raise self.fail(row, f"{name} {value} is outside 1..{_SMALLINT_MAX}")
        if not isinstance(row.score, int | float) or not math.isfinite(row.score):
            raise self.fail(row, f"score {row.score!r} of item {row.item_id!r} is not finite")
        if row.source not in SOURCES:
            raise self.fail(row, f"source {row.source!r} is not one of {sorted(SOURCES)}")
        if (row.user_id, row.item_id) in self.items:
            raise self.fail(row, f"item_id {row.item_id!r} is recommended twice")
        ranks = self.ranks.setdefault(row.user_id, set())
        if row.rank in ranks:
            raise self.fail(row, f"rank {row.rank} is given twice")
        self.items.add((row.user_id, row.item_id))
        ranks.add(row.rank)
        self.rows += 1

    def finish(self) -> None:
        for user, ranks in self.ranks.items():
            # Distinct ranks from 1 up: no gap exactly when the largest equals the count.
            if max(ranks) != len(ranks):
                raise DataError(
                    f"ranking run {self.run_id} shard {self.shard}, user {user!r}: rank values "
                    f"{sorted(ranks)} are not 1..{len(ranks)} without gaps; "
                    "nothing of this shard was written"
                )


# --- finish, publish, fail ----------------------------------------------------------------------


def finish_run(database_url: str, run_id: str, *, timings: dict[str, Any]) -> dict[str, int]:
    """Mark a run 'complete' once every shard is written, with its timings and its counts, and
    return the counts. They are read from the database, not from the caller: rows in the run's
    partition, and users, LLM/base users and each shard's other tallies summed over all of its
    shards, so a resumed run counts the shards an earlier process wrote too."""
    with connect(database_url) as conn:
        status = _run_status(conn, run_id, lock="FOR UPDATE")
        if status not in ("running", "complete"):
            raise RunStateError(
                f"ranking run {run_id} is {status!r}; only a running run can be finished"
            )
        pending = [
            r[0]
            for r in conn.execute(
                "SELECT shard FROM recranker.ranking_shards "
                "WHERE run_id = %s AND status <> 'done' ORDER BY shard",
                (run_id,),
            )
        ]
        if pending:
            raise RunStateError(
                f"ranking run {run_id} has {len(pending)} shard(s) not written "
                f"(first: {pending[:10]}); resume the run with the same run id to write them"
            )
        counts = _run_counts(conn, run_id)
        conn.execute(
            """UPDATE recranker.ranking_runs
               SET status = 'complete', counts = %s, timings = %s, finished_at = now(),
                   error = NULL
               WHERE run_id = %s""",
            (json.dumps(counts), json.dumps(timings), run_id),
        )
        # Fresh statistics, so the first consumer queries after publish get good plans.
        conn.execute(sql.SQL("ANALYZE {}").format(partition_name(run_id)))
    log.info("ranking run %s complete: %s", run_id, counts)
    return counts


def _run_counts(conn: psycopg.Connection, run_id: str) -> dict[str, int]:
    row = conn.execute(
        "SELECT coalesce(sum(users), 0), coalesce(sum(llm_users), 0), "
        "coalesce(sum(base_users), 0) FROM recranker.ranking_shards WHERE run_id = %s",
        (run_id,),
    ).fetchone()
    rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(partition_name(run_id)))
    total = rows.fetchone()
    assert row is not None and total is not None
    counts = {
        key: int(value)
        for key, value in conn.execute(
            "SELECT key, sum(value::bigint) FROM recranker.ranking_shards, "
            "jsonb_each_text(counts) WHERE run_id = %s GROUP BY key ORDER BY key",
            (run_id,),
        )
    }
    counts.update(
        users=int(row[0]), rows=int(total[0]), llm_users=int(row[1]), base_users=int(row[2])
    )
    return counts


def publish_run(database_url: str, run_id: str) -> str | None:
    """Make `run_id` the run consumers see; returns the run that was current before (None when
    nothing was published, `run_id` itself when it already was current).

    One transaction moves the pointer in recranker.published and marks the run 'published'.
    A run replaced later keeps status 'published': only the pointer says which is current. So
    publishing an earlier published run that was not dropped yet is a rollback.
    """
    with connect(database_url) as conn:
        # EXCLUSIVE serialises publishers and retention; readers (ACCESS SHARE) carry on.
        conn.execute("LOCK TABLE recranker.published IN EXCLUSIVE MODE")
        status = _run_status(conn, run_id, lock="FOR UPDATE")
        row = conn.execute("SELECT run_id FROM recranker.published").fetchone()
        previous: str | None = row[0] if row else None
        if previous == run_id:
            log.info("ranking run %s is already the published run", run_id)
            return run_id
        if status not in ("complete", "published"):
            raise RunStateError(
                f"ranking run {run_id} is {status!r}; only a complete run (every shard written "
                "and finish_run done) can be published"
            )
        conn.execute(
            """INSERT INTO recranker.published (singleton, run_id, published_at)
               VALUES (true, %s, now())
               ON CONFLICT (singleton)
               DO UPDATE SET run_id = excluded.run_id, published_at = excluded.published_at""",
            (run_id,),
        )
        conn.execute(
            "UPDATE recranker.ranking_runs SET status = 'published', published_at = now() "
            "WHERE run_id = %s",
            (run_id,),
        )
    log.info("published ranking run %s (previously %s)", run_id, previous)
    return previous


def fail_run(database_url: str, run_id: str, error: str) -> None:
    """Record that a run failed, with the message; the published pointer is not touched.

    Meant for error handlers, so it never raises over the original error for a run that does
    not exist or is already published: it logs a warning instead.
    """
    _end_run(database_url, run_id, "failed", error)


def cancel_run(database_url: str, run_id: str, reason: str) -> None:
    """Record that a run was stopped (SIGINT, SIGTERM) before it was published; like fail_run,
    it can be resumed with the same run id, and it never raises over the stop."""
    _end_run(database_url, run_id, "cancelled", reason)


def _end_run(database_url: str, run_id: str, status: str, error: str) -> None:
    with connect(database_url) as conn:
        row = conn.execute(
            "SELECT status FROM recranker.ranking_runs WHERE run_id = %s FOR UPDATE", (run_id,)
        ).fetchone()
        if row is None or row[0] in ("published", "dropped"):
            log.warning(
                "not marking ranking run %s %s (%s): %s",
                run_id,
                status,
                "no such run" if row is None else f"it is {row[0]}",
                error,
            )
            return
        conn.execute(
            "UPDATE recranker.ranking_runs SET status = %s, error = %s, "
            "finished_at = now() WHERE run_id = %s",
            (status, error, run_id),
        )
    log.info("ranking run %s %s: %s", run_id, status, error)


def fail_abandoned_runs(database_url: str) -> list[str]:
    """Mark 'failed' every run still 'running' whose process is gone, and return their ids.

    Call it while holding batch_rank_lock: only a batch_rank holding that lock works on a run,
    and the lock goes away with its holder's connection, so while this process holds it no run
    can be in progress elsewhere. A process killed without a chance to record anything (kill -9,
    a lost machine) is noticed this way by the next run. Such a run can be resumed.
    """
    with connect(database_url) as conn:
        abandoned = [
            r[0]
            for r in conn.execute(
                """UPDATE recranker.ranking_runs
                   SET status = 'failed', finished_at = now(),
                       error = 'abandoned: its process ended without finishing the run (found by '
                               || 'the next batch_rank; the batch-rank lock was no longer held)'
                   WHERE status = 'running'
                   RETURNING run_id"""
            )
        ]
    for run_id in abandoned:
        log.warning(
            "ranking run %s was left 'running' by a process that is gone; marked failed "
            "(resume it with --run-id %s)",
            run_id,
            run_id,
        )
    return sorted(abandoned)
