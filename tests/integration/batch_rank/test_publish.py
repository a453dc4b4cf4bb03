"""Ranking runs against a real PostgreSQL: shard writes and retries, resume, the atomic publish
that consumers see through recommendations_current, failure, retention, the read-only role, the
example queries through the real psql, and the one-batch_rank lock."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from recranker_core import registry
from recranker_core.batch_rank.publish import (
    RecommendationRow,
    fail_run,
    finish_run,
    publish_run,
    write_shard,
)
from recranker_core.batch_rank.retention import drop_old_runs
from recranker_core.batch_rank.runs import (
    BATCH_RANK_LOCK,
    PARTITION_SCHEMA,
    batch_rank_lock,
    current_run,
    new_run_id,
    partition_name,
    run_summary,
    start_run,
)
from recranker_core.db.connect import libpq_url
from recranker_core.errors import BatchRankBusyError, ConfigError, DataError, RunStateError

WATERMARK = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
PARAMS: dict[str, Any] = {"k": 3, "mode": "hybrid", "weights": [0.5, 0.25, 0.25]}


@pytest.fixture()
def model_id(clean_db: str) -> Iterator[int]:
    """A registered model to rank with; the runs' partitions are dropped afterwards, since
    clean_db only empties them and every later test would pay for truncating them."""
    yield registry.register_model(
        clean_db,
        kind="mf_bpr",
        hyperparameters={},
        metrics={},
        data_watermark=WATERMARK,
        artifact_uri="s3://b/models/mf",
        files={},
        lineage={},
    )
    with psycopg.connect(clean_db, autocommit=True) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", (PARTITION_SCHEMA,)
            )
        ]
        for name in names:
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(PARTITION_SCHEMA, name)))


def recs(users: list[str], k: int, tag: str) -> list[RecommendationRow]:
    """k rows per user; items carry the tag so a test can tell runs and rewrites apart; the last
    user of a shard falls back to the base ranking."""
    return [
        RecommendationRow(
            user_id=user,
            rank=rank,
            item_id=f"{tag}-{rank}",
            score=float(k - rank) + 0.5,
            base_rank=k + 1 - rank,
            source="base" if user == users[-1] else "llm",
        )
        for user in users
        for rank in range(1, k + 1)
    ]


def write(url: str, run_id: str, shard: int, users: list[str], k: int, tag: str) -> int:
    return write_shard(
        url,
        run_id,
        shard,
        recs(users, k, tag),
        users=users,
        llm_users=len(users) - 1,
        base_users=1,
        seconds=0.01,
    )


def complete_run(url: str, model: int, shards: list[list[str]], k: int, tag: str, **kw: Any) -> str:
    state = start_run(
        url,
        run_id=None,
        model_id=model,
        adapter_id=kw.get("adapter_id"),
        data_watermark=WATERMARK,
        params=PARAMS,
        shards=shards,
    )
    for i, users in enumerate(state.shards):
        write(url, state.run_id, i, users, k, tag)
    finish_run(url, state.run_id, timings={"total": 1})
    return state.run_id


def view(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT run_id, user_id, rank, item_id, source FROM recranker.recommendations_current "
            "ORDER BY user_id, rank"
        ).fetchall()


def rows_of(url: str, run_id: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM recranker.recommendations WHERE run_id = %s", (run_id,)
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_run_ids_sort_by_start_time():
    early = new_run_id(datetime(2026, 11, 22, 3, 15, tzinfo=UTC))
    assert re.fullmatch(r"20261122T031500Z-[0-9a-f]{8}", early)
    assert new_run_id(datetime(2026, 11, 22, 3, 15, 1, tzinfo=UTC)) > early


def test_publish_switches_the_view_and_a_half_written_run_stays_invisible(
    clean_db: str, model_id: int
):
    adapter = registry.register_adapter(
        clean_db,
        objective="sft",
        backbone_id="tiny",
        backbone_hash="00",
        template_version="v1",
        base_model_id=model_id,
        hyperparameters={},
        metrics={},
        data_watermark=WATERMARK,
        artifact_uri="s3://b/adapters/1",
        files={},
        lineage={},
    )
    first = complete_run(clean_db, model_id, [["u1", "u2"], ["u3"]], 3, "a", adapter_id=adapter)
    assert view(clean_db) == []  # complete is not published
    assert publish_run(clean_db, first) is None
    assert current_run(clean_db) == first
    first_rows = view(clean_db)
    assert len(first_rows) == 9 and {r[0] for r in first_rows} == {first}
    assert [r[1:] for r in first_rows[:3]] == [
        ("u1", 1, "a-1", "llm"),
        ("u1", 2, "a-2", "llm"),
        ("u1", 3, "a-3", "llm"),
    ]
    assert {r[4] for r in first_rows if r[1] in ("u2", "u3")} == {"base"}

    second = start_run(
        clean_db,
        run_id=None,
        model_id=model_id,
        adapter_id=None,
        data_watermark=WATERMARK,
        params=PARAMS,
        shards=[["u1", "u4"], ["u2", "u5"]],
    )
    write(clean_db, second.run_id, 0, ["u1", "u4"], 2, "b")
    assert view(clean_db) == first_rows
    with pytest.raises(RunStateError, match="only a complete run"):
        publish_run(clean_db, second.run_id)
    with pytest.raises(RunStateError, match=r"1 shard\(s\) not written \(first: \[1\]\)"):
        finish_run(clean_db, second.run_id, timings={})
    write(clean_db, second.run_id, 1, ["u2", "u5"], 2, "b")
    assert view(clean_db) == first_rows
    counts = finish_run(clean_db, second.run_id, timings={"total": 2.0})
    # Counted in the database, whichever process wrote each shard.
    assert counts == {"users": 4, "rows": 8, "llm_users": 2, "base_users": 2}
    assert view(clean_db) == first_rows

    assert publish_run(clean_db, second.run_id) == first
    second_rows = view(clean_db)
    assert len(second_rows) == 8 and {r[0] for r in second_rows} == {second.run_id}
    assert {r[1] for r in second_rows} == {"u1", "u2", "u4", "u5"}
    assert publish_run(clean_db, second.run_id) == second.run_id  # a retried publish is a no-op

    old, new = run_summary(clean_db, first), run_summary(clean_db, second.run_id)
    assert (old["status"], old["current"], old["adapter_id"]) == ("published", False, adapter)
    assert (new["status"], new["current"], new["adapter_id"]) == ("published", True, None)
    assert new["shards"] == {"total": 2, "done": 2, "pending": []}
    assert (new["rows_written"], new["llm_users_written"], new["base_users_written"]) == (8, 2, 2)
    assert new["counts"] == counts and new["timings"] == {"total": 2.0}
    assert datetime.fromisoformat(new["data_watermark"]) == WATERMARK

    # A late retry of a shard must not change what consumers read.
    with pytest.raises(RunStateError, match="is 'published'"):
        write(clean_db, second.run_id, 0, ["u1", "u4"], 2, "late")
    assert view(clean_db) == second_rows

    # Publishing an earlier run that was not dropped is a rollback.
    assert publish_run(clean_db, first) == second.run_id
    assert view(clean_db) == first_rows


def test_retried_shard_replaces_its_rows_and_resume_keeps_the_assignment(
    clean_db: str, model_id: int
):
    shards = [["u1", "u2", "u3"], ["u4", "u5"]]
    run_id = new_run_id()
    state = start_run(
        clean_db,
        run_id=run_id,
        model_id=model_id,
        adapter_id=None,
        data_watermark=WATERMARK,
        params=PARAMS,
        shards=shards,
    )
    assert (state.resumed, state.done_shards, state.pending_shards) == (False, set(), [0, 1])
    assert write(clean_db, run_id, 0, shards[0], 3, "try1") == 9
    assert write(clean_db, run_id, 0, shards[0], 3, "try2") == 9
    assert rows_of(clean_db, run_id) == 9
    with psycopg.connect(clean_db) as conn:
        items = {r[0] for r in conn.execute("SELECT item_id FROM recranker.recommendations")}
    assert items == {"try2-1", "try2-2", "try2-3"}

    # The same users in another order (e.g. re-read from the database) resume the same run.
    again: dict[str, Any] = dict(
        run_id=run_id,
        model_id=model_id,
        adapter_id=None,
        data_watermark=WATERMARK.replace(tzinfo=None),  # naive is read as UTC
        params=dict(reversed(list(PARAMS.items()))),
        shards=[list(reversed(shards[0])), shards[1]],
    )
    resumed = start_run(clean_db, **again)
    assert (resumed.resumed, resumed.done_shards, resumed.pending_shards) == (True, {0}, [1])
    assert resumed.shards == shards

    with pytest.raises(ConfigError, match=r"params\.k is 3 in the run, 5 now"):
        start_run(clean_db, **{**again, "params": {**PARAMS, "k": 5}})
    with pytest.raises(ConfigError, match=r"model_id is \d+ in the run, 999 now"):
        start_run(clean_db, **{**again, "model_id": 999})
    with pytest.raises(ConfigError, match="data_watermark"):
        start_run(
            clean_db,
            **{**again, "data_watermark": datetime(2026, 2, 1, tzinfo=UTC)},
        )
    with pytest.raises(ConfigError, match="shard 1 had other users"):
        start_run(clean_db, **{**again, "shards": [shards[0], ["u4", "u6"]]})

    fail_run(clean_db, run_id, "worker lost")
    assert run_summary(clean_db, run_id)["status"] == "failed"
    assert run_summary(clean_db, run_id)["error"] == "worker lost"
    resumed = start_run(clean_db, **again)
    assert resumed.done_shards == {0}
    summary = run_summary(clean_db, run_id)
    assert (summary["status"], summary["error"]) == ("running", None)
    assert summary["shards"] == {"total": 2, "done": 1, "pending": [1]}

    with pytest.raises(DataError, match="not the 2 users start_run assigned"):
        write(clean_db, run_id, 1, ["u4"], 3, "x")
    with pytest.raises(RunStateError, match="has no shard 7"):
        write(clean_db, run_id, 7, ["u4"], 3, "x")


def test_bad_run_ids_models_and_shards_are_refused(clean_db: str, model_id: int):
    base: dict[str, Any] = dict(
        run_id=None, model_id=model_id, adapter_id=None, data_watermark=None, params={}, shards=[]
    )
    with pytest.raises(ConfigError, match="invalid run id"):
        start_run(clean_db, **{**base, "run_id": "x; DROP TABLE y"})
    with pytest.raises(ConfigError, match="no model 4242"):
        start_run(clean_db, **{**base, "model_id": 4242})
    with pytest.raises(ConfigError, match="no adapter 77"):
        start_run(clean_db, **{**base, "adapter_id": 77})
    with pytest.raises(DataError, match="'u1' is in shard 0 and shard 1"):
        start_run(clean_db, **{**base, "shards": [["u1"], ["u1"]]})
    with psycopg.connect(clean_db) as conn:
        assert conn.execute("SELECT count(*) FROM recranker.ranking_runs").fetchone() == (0,)


def _row(user: str, rank: int, **changes: Any) -> RecommendationRow:
    fields: dict[str, Any] = dict(
        user_id=user, rank=rank, item_id=f"i{rank}", score=1.0, base_rank=rank, source="llm"
    )
    return RecommendationRow(**{**fields, **changes})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([_row("u1", 1), _row("u1", 3)], r"user 'u1': rank values \[1, 3\] are not 1\.\.2"),
        ([_row("u1", 1), _row("u1", 1, item_id="j")], "user 'u1': rank 1 is given twice"),
        ([_row("u1", 0)], "user 'u1': rank 0 is outside"),
        ([_row("u1", 1, source="gpt")], "user 'u1': source 'gpt' is not one of"),
        ([_row("u1", 1), _row("u1", 2, item_id="i1")], "user 'u1': item_id 'i1' is recommended"),
        ([_row("u1", 1, score=float("nan"))], "user 'u1': score nan"),
        ([_row("u1", 1, base_rank=None)], "user 'u1': base_rank None is not an integer"),
        ([_row("u9", 1)], "user 'u9': user_id is not one of the shard's users"),
    ],
)
def test_invalid_rows_are_refused_and_nothing_is_written(
    clean_db: str, model_id: int, bad: list[RecommendationRow], message: str
):
    state = start_run(
        clean_db,
        run_id=None,
        model_id=model_id,
        adapter_id=None,
        data_watermark=None,
        params={},
        shards=[["u1", "u2"]],
    )
    good = [_row("u2", 1), _row("u2", 2)]
    with pytest.raises(DataError, match=message):
        write_shard(
            clean_db,
            state.run_id,
            0,
            good + bad,
            users=["u1", "u2"],
            llm_users=2,
            base_users=0,
            seconds=0.0,
        )
    assert rows_of(clean_db, state.run_id) == 0
    assert run_summary(clean_db, state.run_id)["shards"]["pending"] == [0]


def test_a_failed_run_leaves_the_previous_run_published(clean_db: str, model_id: int):
    first = complete_run(clean_db, model_id, [["u1"], ["u2"]], 2, "a")
    publish_run(clean_db, first)
    before = view(clean_db)
    broken = start_run(
        clean_db,
        run_id=None,
        model_id=model_id,
        adapter_id=None,
        data_watermark=WATERMARK,
        params=PARAMS,
        shards=[["u1"], ["u2"]],
    )
    write(clean_db, broken.run_id, 0, ["u1"], 2, "b")
    fail_run(clean_db, broken.run_id, "shard 1: CUDA out of memory")
    assert current_run(clean_db) == first and view(clean_db) == before
    with pytest.raises(RunStateError, match="is 'failed'"):
        publish_run(clean_db, broken.run_id)
    with pytest.raises(RunStateError, match="is 'failed'"):
        write(clean_db, broken.run_id, 1, ["u2"], 2, "b")
    summary = run_summary(clean_db, broken.run_id)
    assert (summary["status"], summary["error"]) == ("failed", "shard 1: CUDA out of memory")
    fail_run(clean_db, first, "a late error handler")  # never un-publishes the current run
    assert run_summary(clean_db, first)["status"] == "published"
    assert current_run(clean_db) == first


def test_readers_never_see_a_mix_or_nothing_while_runs_are_published(clean_db: str, model_id: int):
    a = complete_run(clean_db, model_id, [[f"u{i}" for i in range(30)]], 5, "a")
    b = complete_run(clean_db, model_id, [[f"u{i}" for i in range(40)]], 5, "b")
    publish_run(clean_db, a)
    expected = {a: 150, b: 200}
    seen: list[list[tuple[str, int]]] = []
    stop = threading.Event()

    def read() -> None:
        with psycopg.connect(clean_db, autocommit=True) as conn:
            while not stop.is_set():
                seen.append(
                    conn.execute(
                        "SELECT run_id, count(*) FROM recranker.recommendations_current "
                        "GROUP BY run_id"
                    ).fetchall()
                )

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(20):
            publish_run(clean_db, b if i % 2 == 0 else a)
    finally:
        stop.set()
        reader.join(timeout=30)
    assert len(seen) > 20
    assert all(len(obs) == 1 and obs[0][1] == expected[obs[0][0]] for obs in seen), seen
    assert {obs[0][0] for obs in seen} == {a, b}


@pytest.fixture()
def reader_url(database_url: str) -> Iterator[str]:
    """A login role that is a member of recranker_reader (roles are cluster-wide: unique name,
    dropped afterwards)."""
    role = f"recranker_test_reader_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE recranker_reader").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    try:
        yield make_conninfo(libpq_url(database_url), user=role, password=password)
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture()
def published_runs(clean_db: str, model_id: int) -> tuple[str, str]:
    """An older published run and the current one (different items), for consumer queries."""
    old = complete_run(clean_db, model_id, [["u1", "u2"]], 3, "old")
    publish_run(clean_db, old)
    new = complete_run(clean_db, model_id, [["u1", "u2"], ["u3"]], 3, "new")
    publish_run(clean_db, new)
    return old, new


def test_reader_role_can_select_the_view_and_nothing_else(
    reader_url: str, published_runs: tuple[str, str]
):
    _, new = published_runs
    denied = psycopg.errors.InsufficientPrivilege
    with psycopg.connect(reader_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT run_id, count(*) FROM recranker.recommendations_current GROUP BY run_id"
        ).fetchall()
        assert rows == [(new, 9)]
        for table in (
            "recranker.interactions",
            "recranker.recommendations",
            "recranker.published",
            "recranker.ranking_runs",
            "recranker.models",
            partition_name(new).as_string(conn),
        ):
            with pytest.raises(denied):
                conn.execute(f"SELECT * FROM {table} LIMIT 1")
        for statement in (
            "INSERT INTO recranker.interactions VALUES ('u', 'i', 5, now(), 1)",
            "INSERT INTO recranker.recommendations VALUES ('r', 'u', 1, 'i', 1, 1, 'llm')",
            "UPDATE recranker.published SET run_id = 'x'",
            "DELETE FROM recranker.ranking_runs",
            "CREATE TABLE recranker.mine (x int)",
            "TRUNCATE recranker.recommendations",
        ):
            with pytest.raises(denied):
                conn.execute(statement)
        # The view is a join, so PostgreSQL refuses writes through it before checking rights;
        # were it ever made updatable, the missing grants would refuse them.
        for statement in (
            "INSERT INTO recranker.recommendations_current (run_id, user_id, rank, item_id, "
            "score, base_rank, source) VALUES ('r', 'u', 1, 'i', 1, 1, 'llm')",
            "UPDATE recranker.recommendations_current SET score = 0",
            "DELETE FROM recranker.recommendations_current",
        ):
            with pytest.raises((denied, psycopg.errors.ObjectNotInPrerequisiteState)):
                conn.execute(statement)
        assert conn.execute(
            "SELECT count(*) FROM recranker.recommendations_current"
        ).fetchone() == (9,)


def run_example(reader_url: str, name: str, **variables: str) -> list[list[str]]:
    psql = shutil.which("psql") or "/usr/bin/psql"
    # The consumer examples must run through the real client: a missing psql is a failure.
    assert shutil.which(psql), (
        "the psql client is not installed (apt-get install postgresql-client)"
    )
    with resources.as_file(resources.files("sql") / "examples" / name) as path:
        args = [psql, "-X", "-q", "-A", "-t", "-F", "|", "-v", "ON_ERROR_STOP=1"]
        for key, value in variables.items():
            args += ["-v", f"{key}={value}"]
        done = subprocess.run(
            [*args, "-f", str(path), "-d", reader_url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    return [line.split("|") for line in done.stdout.splitlines() if line]


def test_example_queries_run_through_psql_as_the_reader(
    reader_url: str, published_runs: tuple[str, str], clean_db: str
):
    _, new = published_runs
    top = run_example(reader_url, "top_k_for_user.sql", user_id="u1")
    assert [(r[0], r[1], r[4], r[5]) for r in top] == [
        ("1", "new-1", "llm", new),
        ("2", "new-2", "llm", new),
        ("3", "new-3", "llm", new),
    ]
    assert [r[1] for r in run_example(reader_url, "top_k_for_user.sql", user_id="u1", k="2")] == [
        "new-1",
        "new-2",
    ]
    assert run_example(reader_url, "top_k_for_user.sql", user_id="nobody") == []

    got = run_example(reader_url, "users_who_got_item.sql", item_id="new-2")
    assert [(r[0], r[1], r[3], r[4]) for r in got] == [
        ("u1", "2", "llm", new),
        ("u2", "2", "base", new),
        ("u3", "2", "base", new),
    ]
    assert run_example(reader_url, "users_who_got_item.sql", item_id="old-2") == []

    (current,) = run_example(reader_url, "current_run.sql")
    assert current[0] == new == current_run(clean_db)
    assert datetime.fromisoformat(current[1]) == datetime.fromisoformat(
        run_summary(clean_db, new)["published_at"]
    )


def test_drop_old_runs_keeps_the_current_run(clean_db: str, model_id: int):
    old = complete_run(clean_db, model_id, [["u1"]], 2, "old")
    publish_run(clean_db, old)
    current = complete_run(clean_db, model_id, [["u1"]], 2, "cur")
    publish_run(clean_db, current)
    failed = start_run(
        clean_db,
        run_id=None,
        model_id=model_id,
        adapter_id=None,
        data_watermark=None,
        params={},
        shards=[["u1"]],
    ).run_id
    fail_run(clean_db, failed, "boom")
    recent = complete_run(clean_db, model_id, [["u1"]], 2, "recent")
    with psycopg.connect(clean_db) as conn:
        conn.execute(
            "UPDATE recranker.ranking_runs SET started_at = now() - interval '30 days' "
            "WHERE run_id = ANY(%s)",
            ([old, current, failed],),
        )

    assert drop_old_runs(clean_db, 7) == sorted([old, failed])
    assert current_run(clean_db) == current
    assert {r[0] for r in view(clean_db)} == {current}
    with psycopg.connect(clean_db) as conn:
        for run_id, exists in ((old, False), (failed, False), (current, True), (recent, True)):
            found = conn.execute(
                "SELECT to_regclass(%s)", (partition_name(run_id).as_string(conn),)
            ).fetchone()
            assert (found is not None and found[0] is not None) == exists, run_id
    assert run_summary(clean_db, old)["status"] == "dropped"
    assert run_summary(clean_db, recent)["status"] == "complete"
    with pytest.raises(RunStateError, match="is 'dropped'"):
        publish_run(clean_db, old)
    with pytest.raises(RunStateError, match="cannot be resumed"):
        start_run(
            clean_db,
            run_id=failed,
            model_id=model_id,
            adapter_id=None,
            data_watermark=None,
            params={},
            shards=[["u1"]],
        )
    assert drop_old_runs(clean_db, 7) == []  # nothing left to drop; the current run survives
    assert drop_old_runs(clean_db, 0) == [recent]
    assert current_run(clean_db) == current and len(view(clean_db)) == 2
    with pytest.raises(ConfigError, match="retention_days"):
        drop_old_runs(clean_db, -1)


def test_drop_removes_a_partition_an_interrupted_call_left_behind(clean_db: str, model_id: int):
    run_id = complete_run(clean_db, model_id, [["u1"]], 2, "x")
    with psycopg.connect(clean_db, autocommit=True) as conn:
        part = partition_name(run_id).as_string(conn)
        # What a call killed between marking and detaching leaves: marked, table still there.
        conn.execute(
            "UPDATE recranker.ranking_runs SET status = 'dropped', "
            "started_at = now() - interval '30 days' WHERE run_id = %s",
            (run_id,),
        )
    assert drop_old_runs(clean_db, 7) == []
    with psycopg.connect(clean_db) as conn:
        assert conn.execute("SELECT to_regclass(%s)", (part,)).fetchone() == (None,)


def test_batch_rank_lock_admits_one_holder(database_url: str):
    with batch_rank_lock(database_url):
        busy = pytest.raises(BatchRankBusyError, match="another batch_rank is running")
        with busy as info, batch_rank_lock(database_url):
            pytest.fail("a second holder got the lock")
        assert "held by backend pid" in str(info.value)
    with batch_rank_lock(database_url):  # released on exit
        pass

    # Held by a process whose connection dies: gone with the connection.
    conn = psycopg.connect(database_url, autocommit=True)
    conn.execute("SELECT pg_advisory_lock(%s)", (BATCH_RANK_LOCK,))
    with pytest.raises(BatchRankBusyError), batch_rank_lock(database_url):
        pass
    conn.close()
    with batch_rank_lock(database_url):
        pass
