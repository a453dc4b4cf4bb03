"""Batch-ranking storage: the run ledger and its shards (start, resume, read), each run's own
partition of recranker.recommendations, and the lock that keeps one batch_rank per database."""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from recranker_core.db.connect import connect
from recranker_core.errors import BatchRankBusyError, ConfigError, DataError, RunStateError

log = logging.getLogger(__name__)


PARTITION_SCHEMA = "recranker_runs"
_PARTITION_PREFIX = "recommendations_"
# A partition is named after its run and PostgreSQL names hold 63 bytes.
_RUN_ID_MAX = 63 - len(_PARTITION_PREFIX)
RUN_ID_PATTERN = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_-]{{0,{_RUN_ID_MAX - 1}}}$")
# Any fixed number works; the other recranker locks use 7_310_001..7_310_003.
BATCH_RANK_LOCK = 7_310_005
_PARENT = sql.Identifier("recranker", "recommendations")


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
