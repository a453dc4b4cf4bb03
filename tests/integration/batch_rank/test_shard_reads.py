"""A ranking shard reads its users' interactions once, on a connection of the worker process's
pool (issue 17): the rows are the same as with a fresh connection per read, every exclusion
holds against the table itself, cold users get the popular items they have not seen, and a
pooled connection the server closed is replaced, not handed out. Real PostgreSQL, SeaweedFS and
the ONNX champion of the tiny pipeline."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest


def _rows(result: object) -> list[tuple[object, ...]]:
    return [
        (r.user_id, r.rank, r.item_id, round(r.score, 6), r.base_rank, r.source)
        for r in result.rows  # type: ignore[attr-defined]
    ]


def test_a_shard_ranks_the_same_with_pooled_and_fresh_connections(
    tiny_pipeline: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    from recranker_core.base.candidates import active_users, data_watermark, load_champion
    from recranker_core.batch_rank.rank import popular_items, rank_shard
    from recranker_core.batch_rank.serving import cache_root
    from recranker_core.config import load_settings
    from recranker_core.db.pool import close_pools, pooled
    from tasks.common import store_for

    url = str(tiny_pipeline["database_url"])
    watermark = data_watermark(url)
    # A user the champion never saw (interactions after its training), with one of the most
    # popular items: the cold list must skip it.
    popular = popular_items(url, watermark)
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO recranker.interactions (user_id, item_id, rating, event_ts, batch_id) "
            "SELECT 'cold-user', %s, 5, %s, max(batch_id) FROM recranker.ingest_batches",
            (popular[0], watermark - timedelta(days=1)),
        )
    settings = load_settings()
    champion = load_champion(url, store_for(settings), cache_root(settings))
    users = active_users(url, watermark, None)
    assert "cold-user" in users and "cold-user" not in champion.user_index
    monkeypatch.setenv("RECRANKER_RANK__CHUNK_SIZE", "16")  # several chunks, one read
    settings = load_settings()

    fresh = rank_shard(url, champion, None, None, users, watermark, settings, popular=popular)
    pool = pooled(url)
    try:
        first = rank_shard(pool, champion, None, None, users, watermark, settings, popular=popular)
        # The server closes the pooled connection (an idle timeout, a restart): the next shard
        # gets a new one.
        with psycopg.connect(url, autocommit=True) as admin:
            closed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'recranker' "
                "AND pid <> pg_backend_pid()"
            ).fetchone()
        assert closed is not None and closed[0] >= 1
        again = rank_shard(pool, champion, None, None, users, watermark, settings, popular=popular)
    finally:
        close_pools()

    assert _rows(fresh) == _rows(first) == _rows(again)
    assert (fresh.users, fresh.cold_users, fresh.base_users) == (len(users), 1, len(users) - 1)

    # Against the table itself: no user is recommended an item they interacted with, and the
    # cold user gets the popular items minus theirs.
    with psycopg.connect(url) as conn:
        seen = set(
            conn.execute(
                "SELECT user_id, item_id FROM recranker.interactions WHERE event_ts <= %s",
                (watermark,),
            ).fetchall()
        )
    assert all((r.user_id, r.item_id) not in seen for r in fresh.rows)
    cold = [r.item_id for r in fresh.rows if r.user_id == "cold-user"]
    assert cold == [i for i in popular if i != popular[0]][: settings.rank.k]
