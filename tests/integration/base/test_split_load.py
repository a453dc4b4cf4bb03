"""load_split against a real PostgreSQL: streaming the interactions out in small chunks into
compact arrays gives exactly the split that build_split gives on the same rows read at once, and
the arrays are the compact types the scale targets rely on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psycopg


def test_chunked_load_equals_the_split_of_all_rows(tmp_path: Path, settings, clean_db: str) -> None:  # type: ignore[no-untyped-def]
    from recranker_core.base.split import build_split, load_split
    from recranker_core.datasets.sources import describe_file
    from recranker_core.datasets.synthetic import generate
    from recranker_core.ingest import ingest_file

    files = generate(tmp_path / "synth", users=60, items=45, interactions=2500, seed=11)
    ingest_file(describe_file(files.interactions, None), settings, clean_db)
    with psycopg.connect(clean_db) as conn:
        # Ids that CSV must quote (comma, quote, newline), written as a loader might have.
        conn.execute(
            "INSERT INTO recranker.interactions (user_id, item_id, rating, event_ts, batch_id) "
            "SELECT u, i, 5, '2020-01-01'::timestamptz + n * interval '1 day', "
            "(SELECT min(batch_id) FROM recranker.interactions) FROM (VALUES "
            "('odd,\"user\"', 'item\nwith newline', 1), ('odd,\"user\"', 'x,\"\"y', 2), "
            "('odd,\"user\"', 'plain', 3), ('z', 'item\nwith newline', 4)) AS t(u, i, n)"
        )
        rows = conn.execute(
            "SELECT user_id, item_id, rating, extract(epoch FROM event_ts)::float8 "
            "FROM recranker.interactions"
        ).fetchall()
        watermark = conn.execute("SELECT max(event_ts) FROM recranker.interactions").fetchone()[0]
    users, items, ratings, ts = (list(c) for c in zip(*rows, strict=True))
    expected = build_split(users, items, ratings, ts, watermark=watermark)

    # A few hundred bytes a chunk: dozens of chunks, rows cut at every possible place.
    got = load_split(clean_db, chunk_bytes=300)

    assert got.watermark == watermark
    assert got.user_ids == expected.user_ids and got.item_ids == expected.item_ids
    assert got.stats == expected.stats and got.stats["interactions"] == 2504
    assert 'odd,"user"' in got.user_ids and "item\nwith newline" in got.item_ids
    for name in (
        "train_indptr",
        "train_indices",
        "rating_users",
        "rating_items",
        "rating_values",
        "valid_item",
        "test_item",
        "seen_valid_indptr",
        "seen_valid_indices",
        "seen_test_indptr",
        "seen_test_indices",
    ):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)
    assert len(got.train_sequences) == len(expected.train_sequences)
    for a, b in zip(got.train_sequences, expected.train_sequences, strict=True):
        np.testing.assert_array_equal(a, b)
    assert got.train_indices.dtype == np.int32 and got.rating_users.dtype == np.int32
    assert got.rating_values.dtype == np.float32

    # As of an earlier watermark, only the rows up to it count.
    with psycopg.connect(clean_db) as conn:
        middle, before = conn.execute(
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY event_ts), "
            "count(*) FILTER (WHERE event_ts <= (SELECT percentile_disc(0.5) WITHIN GROUP "
            "(ORDER BY event_ts) FROM recranker.interactions)) FROM recranker.interactions"
        ).fetchone()
    assert load_split(clean_db, watermark=middle, chunk_bytes=1000).stats["interactions"] == before
