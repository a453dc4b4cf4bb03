"""Batch-ranking storage: the run ledger and its shards, shard writes by COPY into the run's own
partition, the atomic publish of the single pointer consumers follow, failure, retention, and the
lock that keeps one batch_rank per database."""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
from psycopg import sql

from recranker_core.db.connect import connect
from recranker_core.db.pool import Connections, connections_for
from recranker_core.errors import BatchRankBusyError, ConfigError, DataError, RunStateError

log = logging.getLogger(__name__)

Source = Literal["llm", "base"]
SOURCES: frozenset[str] = frozenset({"llm", "base"})

PARTITION_SCHEMA = "recranker_runs"
_PARTITION_PREFIX = "recommendations_"
# A partition is named after its run and PostgreSQL names hold 63 bytes.
_RUN_ID_MAX = 63 - len(_PARTITION_PREFIX)
RUN_ID_PATTERN = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_-]{{0,{_RUN_ID_MAX - 1}}}$")
# Any fixed number works; the other recranker locks use 7_310_001..7_310_003.
BATCH_RANK_LOCK = 7_310_005
_SMALLINT_MAX = 32767
_PARENT = sql.Identifier("recranker", "recommendations")
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


@dataclass
class RunState:
    """A started (or resumed) run: its id, the shard assignment and which shards are written."""

    run_id: str
    done_shards: set[int]
    shards: list[list[str]]
    resumed: bool

    @property
    def pending_shards(self) -> list[int]:
        return [i for i in range(len(self.shards)) if i not in self.done_shards]


def new_run_id(now: datetime | None = None) -> str:
    """A fresh run id that sorts by start time, e.g. `20261122T031500Z-1a2b3c4d`."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(4)}"


def partition_name(run_id: str) -> sql.Identifier:
    """The table holding one run's rows (a partition of recranker.recommendations)."""
    return sql.Identifier(PARTITION_SCHEMA, _PARTITION_PREFIX + run_id)


# --- start and resume -------------------------------------------------------------------------


def start_run(
    database_url: str,
    *,
    run_id: str | None,
    model_id: int,
    adapter_id: int | None,
    data_watermark: datetime | None,
    params: dict[str, Any],
    shards: list[list[str]],
) -> RunState:
    """Start a run, or resume one when `run_id` names an existing run.

    A new run gets its ledger row ('running'), one 'pending' row per shard and its partition,
    in one transaction. An existing run must be 'running', 'failed', 'cancelled' or 'complete'
    (it goes back to 'running') and must have been started with the same model, adapter, data
    watermark, parameters and shard assignment; ConfigError says what differs. A naive
    `data_watermark` is taken as UTC.
    """
    run_id = run_id or new_run_id()
    _check_run_id(run_id)
    _check_shards(shards)
    wanted_params = _json_params(params)
    watermark = _aware(data_watermark)
    with connect(database_url) as conn:
        row = conn.execute(
            "SELECT status, model_id, adapter_id, data_watermark, params "
            "FROM recranker.ranking_runs WHERE run_id = %s FOR UPDATE",
            (run_id,),
        ).fetchone()
        if row is None:
            _create_run(conn, run_id, model_id, adapter_id, watermark, wanted_params, shards)
            state = RunState(run_id, set(), [list(s) for s in shards], resumed=False)
            log.info("started ranking run %s: %d shards", run_id, len(shards))
            return state
        status, old_model, old_adapter, old_watermark, old_params = row
        if status not in ("running", "failed", "cancelled", "complete"):
            raise RunStateError(
                f"ranking run {run_id} is {status!r} and cannot be resumed; "
                "start a new run (without a run id)"
            )
        differences = _differences(
            {
                "model_id": (old_model, model_id),
                "adapter_id": (old_adapter, adapter_id),
                "data_watermark": (old_watermark, watermark),
            },
            old_params,
            wanted_params,
        )
        stored = _stored_shards(conn, run_id)
        differences += _shard_differences([users for users, _ in stored], shards)
        if differences:
            raise ConfigError(
                f"cannot resume ranking run {run_id}: " + "; ".join(differences) + ". Resume it "
                "with the settings and data it was started with, or start a new run"
            )
        conn.execute(
            "UPDATE recranker.ranking_runs SET status = 'running', error = NULL, "
            "finished_at = NULL WHERE run_id = %s",
            (run_id,),
        )
    done = {i for i, (_, is_done) in enumerate(stored) if is_done}
    log.info(
        "resuming ranking run %s (was %s): %d of %d shards already written",
        run_id,
        status,
        len(done),
        len(stored),
    )
    return RunState(run_id, done, [users for users, _ in stored], resumed=True)


def _create_run(
    conn: psycopg.Connection,
    run_id: str,
    model_id: int,
    adapter_id: int | None,
    watermark: datetime | None,
    params: dict[str, Any],
    shards: list[list[str]],
) -> None:
    if not conn.execute(
        "SELECT 1 FROM recranker.models WHERE model_id = %s", (model_id,)
    ).fetchone():
        raise ConfigError(f"no model {model_id} in recranker.models (see `recranker models list`)")
    if (
        adapter_id is not None
        and not conn.execute(
            "SELECT 1 FROM recranker.adapters WHERE adapter_id = %s", (adapter_id,)
        ).fetchone()
    ):
        raise ConfigError(
            f"no adapter {adapter_id} in recranker.adapters (see `recranker adapters list`)"
        )
    try:
        conn.execute(
            """INSERT INTO recranker.ranking_runs
                   (run_id, status, model_id, adapter_id, data_watermark, params, n_shards)
               VALUES (%s, 'running', %s, %s, %s, %s, %s)""",
            (run_id, model_id, adapter_id, watermark, json.dumps(params), len(shards)),
        )
    except psycopg.errors.UniqueViolation as exc:
        raise RunStateError(
            f"ranking run {run_id} was started by another process at the same moment"
        ) from exc
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO recranker.ranking_shards (run_id, shard, user_ids, users) "
            "VALUES (%s, %s, %s::text[], %s)",
            [(run_id, i, users, len(users)) for i, users in enumerate(shards)],
        )
    part = partition_name(run_id)
    exists = conn.execute("SELECT to_regclass(%s)", (part.as_string(conn),)).fetchone()
    if exists and exists[0] is not None:
        # Only possible when ledger rows were deleted by hand: the rows have no run any more.
        log.warning("dropping orphaned partition %s left without a ledger row", part.as_string())
        conn.execute(sql.SQL("DROP TABLE {}").format(part))
    # CREATE TABLE .. PARTITION OF would lock the parent against every reader of the view until
    # commit; ATTACH PARTITION only needs SHARE UPDATE EXCLUSIVE, which readers do not conflict
    # with.
    conn.execute(
        sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
            part, _PARENT
        )
    )
    conn.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES IN ({})").format(
            _PARENT, part, sql.Literal(run_id)
        )
    )


def _stored_shards(conn: psycopg.Connection, run_id: str) -> list[tuple[list[str], bool]]:
    return [
        (list(users), status == "done")
        for users, status in conn.execute(
            "SELECT user_ids, status FROM recranker.ranking_shards WHERE run_id = %s "
            "ORDER BY shard",
            (run_id,),
        )
    ]


def _differences(
    fields: dict[str, tuple[Any, Any]], old_params: dict[str, Any], new_params: dict[str, Any]
) -> list[str]:
    found = [
        f"{name} is {old!r} in the run, {new!r} now"
        for name, (old, new) in fields.items()
        if old != new
    ]
    for key in sorted(set(old_params) | set(new_params)):
        old, new = old_params.get(key, "<unset>"), new_params.get(key, "<unset>")
        if old != new:
            found.append(f"params.{key} is {old!r} in the run, {new!r} now")
    return found


def _shard_differences(stored: list[list[str]], given: list[list[str]]) -> list[str]:
    if len(stored) != len(given):
        return [f"the run has {len(stored)} shards, {len(given)} given now"]
    # Order inside a shard does not matter (the same users, fetched in another order).
    for i, (old, new) in enumerate(zip(stored, given, strict=True)):
        if set(old) != set(new):
            missing = sorted(set(old) - set(new))[:3]
            extra = sorted(set(new) - set(old))[:3]
            return [
                f"shard {i} had other users (not given now: {missing}, new: {extra}); "
                "the set of users changed since the run started"
            ]
    return []


def _check_run_id(run_id: str) -> None:
    if not RUN_ID_PATTERN.match(run_id):
        raise ConfigError(
            f"invalid run id {run_id!r}: use letters, digits, '_' and '-' (starting with a letter "
            f"or digit), at most {_RUN_ID_MAX} characters, "
            "or let recranker choose one"
        )


def _check_shards(shards: list[list[str]]) -> None:
    seen: dict[str, int] = {}
    for i, users in enumerate(shards):
        for user in users:
            if not isinstance(user, str) or not user:
                raise DataError(f"shard {i}: user id {user!r} is not a non-empty string")
            if user in seen:
                raise DataError(
                    f"user {user!r} is in shard {seen[user]} and shard {i}; every user must "
                    "belong to exactly one shard"
                )
            seen[user] = i


def _json_params(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters as they will read back from jsonb (tuples become lists, and so on)."""
    try:
        normalised: dict[str, Any] = json.loads(json.dumps(params, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"run parameters must be JSON values: {exc}") from exc
    return normalised


def _aware(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


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


# --- reading the ledger -------------------------------------------------------------------------


def current_run(database_url: str) -> str | None:
    """The published run's id (None when nothing was ever published)."""
    with connect(database_url) as conn:
        row = conn.execute("SELECT run_id FROM recranker.published").fetchone()
    return row[0] if row else None


def run_summary(database_url: str, run_id: str) -> dict[str, Any]:
    """A run's ledger row and shard progress as JSON-ready values, for the CLI and artifacts."""
    with connect(database_url) as conn:
        row = conn.execute(
            """SELECT r.status, r.model_id, r.adapter_id, r.data_watermark, r.params, r.n_shards,
                      r.counts, r.timings, r.error, r.started_at, r.finished_at, r.published_at,
                      r.dropped_at, p.run_id IS NOT NULL
               FROM recranker.ranking_runs r
               LEFT JOIN recranker.published p ON p.run_id = r.run_id
               WHERE r.run_id = %s""",
            (run_id,),
        ).fetchone()
        if row is None:
            raise ConfigError(f"no ranking run {run_id!r} in recranker.ranking_runs")
        shards = conn.execute(
            """SELECT count(*) FILTER (WHERE status = 'done'),
                      coalesce(array_agg(shard ORDER BY shard)
                               FILTER (WHERE status <> 'done'), '{}'),
                      coalesce(sum(users), 0), coalesce(sum(rows), 0),
                      coalesce(sum(llm_users), 0), coalesce(sum(base_users), 0),
                      coalesce(sum(seconds), 0)
               FROM recranker.ranking_shards WHERE run_id = %s""",
            (run_id,),
        ).fetchone()
    assert shards is not None
    done, pending, users, rows, llm_users, base_users, seconds = shards

    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "run_id": run_id,
        "status": row[0],
        "current": bool(row[13]),
        "model_id": row[1],
        "adapter_id": row[2],
        "data_watermark": iso(row[3]),
        "params": row[4],
        "counts": row[6],
        "timings": row[7],
        "error": row[8],
        "started_at": iso(row[9]),
        "finished_at": iso(row[10]),
        "published_at": iso(row[11]),
        "dropped_at": iso(row[12]),
        "shards": {"total": row[5], "done": int(done), "pending": list(pending)},
        "users": int(users),
        "rows_written": int(rows),
        "llm_users_written": int(llm_users),
        "base_users_written": int(base_users),
        "shard_seconds": float(seconds),
    }


def _run_status(conn: psycopg.Connection, run_id: str, *, lock: str) -> str:
    row = conn.execute(
        sql.SQL("SELECT status FROM recranker.ranking_runs WHERE run_id = %s {}").format(
            sql.SQL(lock)
        ),
        (run_id,),
    ).fetchone()
    if row is None:
        raise ConfigError(f"no ranking run {run_id!r} in recranker.ranking_runs")
    return str(row[0])


# --- one batch_rank at a time -------------------------------------------------------------------


@contextmanager
def batch_rank_lock(database_url: str) -> Iterator[None]:
    """Hold this database's batch-ranking lock for the block, or raise BatchRankBusyError.

    A session-level advisory lock on its own connection: it goes away with that connection,
    so a killed process never leaves it behind.
    """
    conn = connect(database_url, autocommit=True, application_name="recranker batch_rank")
    try:
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", (BATCH_RANK_LOCK,)).fetchone()
        if not got or not got[0]:
            raise BatchRankBusyError(
                f"another batch_rank is running on this database ({_lock_holder(conn)}); "
                "wait for it to finish (the lock is released when its connection closes), "
                "then run again"
            )
        try:
            yield
        finally:
            if not conn.closed:
                conn.execute("SELECT pg_advisory_unlock(%s)", (BATCH_RANK_LOCK,))
    finally:
        conn.close()


def _lock_holder(conn: psycopg.Connection) -> str:
    row = conn.execute(
        """SELECT a.pid, a.application_name, a.client_addr::text, a.backend_start
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
             AND l.classid = 0 AND l.objid = %s
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())""",
        (BATCH_RANK_LOCK,),
    ).fetchone()
    if row is None:
        return f"advisory lock {BATCH_RANK_LOCK} is held"
    pid, app, addr, since = row
    return (
        f"advisory lock {BATCH_RANK_LOCK} held by backend pid {pid} ({app or 'no name'}, "
        f"from {addr or 'a local socket'}) connected since {since:%Y-%m-%d %H:%M:%S %Z}"
    )


def list_runs(database_url: str, limit: int = 20) -> list[dict[str, Any]]:
    """The newest runs' ledger rows (status, lineage, counts, the mode and the guard's decision
    a `fused` run served), JSON-ready, newest first."""
    with connect(database_url) as conn:
        rows = conn.execute(
            """SELECT r.run_id, r.status, r.model_id, r.adapter_id, r.counts, r.started_at,
                      r.published_at, p.run_id IS NOT NULL, r.params->>'mode',
                      r.params->'fusion'
               FROM recranker.ranking_runs r
               LEFT JOIN recranker.published p ON p.run_id = r.run_id
               ORDER BY r.started_at DESC, r.run_id DESC LIMIT %s""",
            (limit,),
        ).fetchall()
    return [
        {
            "run_id": run_id,
            "status": status,
            "model_id": model_id,
            "adapter_id": adapter_id,
            "counts": counts,
            "started_at": started.isoformat() if started else None,
            "published_at": published.isoformat() if published else None,
            "current": bool(current),
            "mode": mode,
            "fusion": fusion,
        }
        for (
            run_id,
            status,
            model_id,
            adapter_id,
            counts,
            started,
            published,
            current,
            mode,
            fusion,
        ) in rows
    ]
