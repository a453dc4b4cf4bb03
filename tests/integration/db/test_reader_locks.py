"""The read-only role cannot stop the pipeline (issue 16, item 3), against a real PostgreSQL: a
login role in recranker_reader tries every advisory-lock function with the pipeline's keys and is
refused; holding every lock it can get (ACCESS SHARE on the view, inside an open transaction), it
delays neither an ingest nor a batch-ranking run; it keeps exactly SELECT on the view."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from recranker_core.db.connect import libpq_url

# Every key the pipeline locks: migrations, the ingest merge, the registries, batch ranking.
PIPELINE_KEYS = (7_310_001, 7_310_002, 7_310_003, 7_310_004, 7_310_005)


@pytest.fixture()
def reader_url(database_url: str) -> Iterator[str]:
    """A consumer's login role, member of recranker_reader (roles are cluster-wide: a unique
    name, dropped afterwards)."""
    role = f"recranker_test_consumer_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE recranker_reader").format(sql.Identifier(role))
        )
    try:
        yield make_conninfo(libpq_url(database_url), user=role)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def advisory_calls(conn: psycopg.Connection) -> list[str]:
    """A call of every advisory-lock function PostgreSQL has, with each pipeline key."""
    calls = []
    for name, args in conn.execute(
        "SELECT p.proname, pg_get_function_identity_arguments(p.oid) FROM pg_proc p "
        "WHERE p.pronamespace = 'pg_catalog'::regnamespace "
        "AND p.proname ~ '^pg_(try_)?advisory_' ORDER BY 1, 2"
    ):
        if args == "":
            calls.append(f"SELECT {name}()")
        elif args == "bigint":
            calls += [f"SELECT {name}({key})" for key in PIPELINE_KEYS]
        else:
            assert args == "integer, integer", (name, args)
            calls += [f"SELECT {name}(0, {key})" for key in PIPELINE_KEYS]
            calls += [f"SELECT {name}({key}, {key})" for key in PIPELINE_KEYS]
    return calls


def test_the_reader_cannot_take_the_pipelines_locks_and_keeps_only_select_on_the_view(
    reader_url: str, clean_db: str
) -> None:
    with psycopg.connect(reader_url, autocommit=True) as conn:
        calls = advisory_calls(conn)
        # lock, lock_shared, unlock, unlock_shared, unlock_all, xact_lock(_shared), try_*: 11
        # names, two signatures each but unlock_all.
        assert len({c.split("(")[0] for c in calls}) == 11 and len(calls) > 100
        for call in calls:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(call)
        assert conn.execute(
            "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'"
        ).fetchone() == (0,)
        # What a consumer is for still works.
        assert conn.execute("SELECT count(*) FROM recranker.recommendations_current").fetchone()

    with psycopg.connect(clean_db, autocommit=True) as conn:
        granted = conn.execute(
            """SELECT c.oid::regclass::text, p.privilege
               FROM pg_class c
               CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE',
                                       'REFERENCES', 'TRIGGER']) AS p(privilege)
               WHERE c.relnamespace::regnamespace::text LIKE 'recranker%%'
                 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
                 AND has_table_privilege('recranker_reader', c.oid, p.privilege)"""
        ).fetchall()
        assert granted == [("recranker.recommendations_current", "SELECT")]
        # The pipeline's own role keeps its locks.
        assert conn.execute("SELECT pg_try_advisory_lock(7310005)").fetchone() == (True,)
        conn.execute("SELECT pg_advisory_unlock(7310005)")


def _within(seconds: float, fn: Any) -> Any:
    """fn() on a thread: its result, or a failure if it is still waiting after `seconds` (a
    lock the reader held would make it wait for ever)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still waiting after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_a_reader_holding_every_lock_it_can_delays_neither_ingest_nor_ranking(
    reader_url: str, clean_db: str, settings: Any, tmp_path: Path
) -> None:
    from recranker_core import registry
    from recranker_core.batch_rank.publish import (
        RecommendationRow,
        finish_run,
        publish_run,
        write_shard,
    )
    from recranker_core.batch_rank.runs import batch_rank_lock, current_run, start_run
    from recranker_core.datasets.sources import describe_file
    from recranker_core.ingest import ingest_file

    holder = psycopg.connect(reader_url, autocommit=True)
    attempts = psycopg.connect(reader_url, autocommit=True)
    try:
        for call in advisory_calls(attempts):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                attempts.execute(call)
        for statement in (
            "LOCK TABLE recranker.recommendations_current IN EXCLUSIVE MODE",
            "LOCK TABLE recranker.published IN ACCESS SHARE MODE",
            "LOCK TABLE recranker.ingest_batches IN ACCESS SHARE MODE",
            "SELECT * FROM recranker.recommendations_current FOR SHARE",
        ):
            with attempts.transaction(), pytest.raises(psycopg.Error):
                attempts.execute(statement)
        # What it can hold: the view (and through it the tables behind it) in ACCESS SHARE
        # mode, in a transaction left open, as a long consumer query would.
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE recranker.recommendations_current IN ACCESS SHARE MODE")
        holder.execute("SELECT count(*) FROM recranker.recommendations_current").fetchone()

        (tmp_path / "items.csv").write_text("item_id,title,year,genres\ni1,One,1999,Drama\n")
        day = tmp_path / "day.csv"
        day.write_text("user_id,item_id,rating,timestamp\nu1,i1,4,1000000000\n")
        result = _within(120, lambda: ingest_file(describe_file(day, None), settings, clean_db))
        assert (result.status, result.rows_merged) == ("merged", 1)

        model = registry.register_model(
            clean_db,
            kind="mf",
            hyperparameters={},
            metrics={},
            data_watermark=datetime(2026, 1, 1, tzinfo=UTC),
            artifact_uri="s3://b/models/mf",
            files={},
            lineage={},
        )

        def rank() -> str:
            with batch_rank_lock(clean_db):
                state = start_run(
                    clean_db,
                    run_id=None,
                    model_id=model,
                    adapter_id=None,
                    data_watermark=datetime(2026, 1, 1, tzinfo=UTC),
                    params={"k": 1},
                    shards=[["u1"]],
                )
                write_shard(
                    clean_db,
                    state.run_id,
                    0,
                    [RecommendationRow("u1", 1, "i1", 1.0, 1, "base")],
                    users=["u1"],
                    llm_users=0,
                    base_users=1,
                    seconds=0.0,
                )
                finish_run(clean_db, state.run_id, timings={})
                publish_run(clean_db, state.run_id)
                return state.run_id

        run_id = _within(60, rank)
        assert current_run(clean_db) == run_id
        # The reader's own transaction was never broken: it reads the new run.
        assert holder.execute(
            "SELECT run_id FROM recranker.recommendations_current"
        ).fetchall() == [(run_id,)]
    finally:
        holder.close()
        attempts.close()
