"""What the one-pass ingest adds, against a real PostgreSQL: the bulk merge (primary key dropped
and built again) steps aside for a reader of the table, and a user file that cannot be read
still rejects the batch with file, line and field, though it is staged during the merge."""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg
import pytest

from recranker_core.config import Settings
from recranker_core.datasets.sources import describe_file
from recranker_core.ingest import IngestResult, ingest_outcome

HEADER = "user_id,item_id,rating,timestamp\n"
ITEMS = "item_id,title\ni1,One\ni2,Two\n"


def bulk(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"ingest": settings.ingest.model_copy(update={"bulk_load_min_rows": 1})}
    )


def run(path: Path, settings: Settings, url: str) -> IngestResult:
    return ingest_outcome(describe_file(path, None), settings, url)


def primary_key(url: str) -> tuple[str, ...] | None:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'recranker.interactions'::regclass AND contype = 'p'"
        ).fetchone()


def test_a_reader_of_the_table_keeps_its_key_and_gets_its_rows(
    tmp_path: Path, settings: Settings, clean_db: str, caplog: pytest.LogCaptureFixture
):
    (tmp_path / "items.csv").write_text(ITEMS)
    day = tmp_path / "day.csv"
    day.write_text(HEADER + "u1,i1,4,1000000000\nu2,i2,5,1000000001\n")
    with psycopg.connect(clean_db) as reader, caplog.at_level(logging.INFO):
        # A long read of the table in an open transaction, as load_split or a ranking run does.
        reader.execute("SELECT count(*) FROM recranker.interactions").fetchone()
        result = run(day, bulk(settings), clean_db)
        assert reader.execute("SELECT 1").fetchone() == (1,)  # never kept waiting, never cut
    assert (result.status, result.rows_merged) == ("merged", 2)
    assert "recranker.interactions is in use" in caplog.text
    assert primary_key(clean_db) == ("PRIMARY KEY (user_id, item_id, event_ts)",)


def test_bulk_merge_rebuilds_the_key_and_refuses_nothing_valid(
    tmp_path: Path, settings: Settings, clean_db: str
):
    (tmp_path / "items.csv").write_text(ITEMS)
    day = tmp_path / "day.csv"
    day.write_text(HEADER + "".join(f"u{n},i{1 + n % 2},4,{1000000000 + n}\n" for n in range(50)))
    result = run(day, bulk(settings), clean_db)
    assert (result.status, result.rows_merged) == ("merged", 50)
    assert primary_key(clean_db) == ("PRIMARY KEY (user_id, item_id, event_ts)",)
    with psycopg.connect(clean_db) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute(
            "INSERT INTO recranker.interactions (user_id, item_id, rating, event_ts, batch_id) "
            "VALUES ('u1', 'i2', 1, to_timestamp(1000000001), 0)"
        )


def test_an_unreadable_user_file_rejects_the_batch_with_file_line_and_field(
    tmp_path: Path, settings: Settings, clean_db: str
):
    (tmp_path / "items.csv").write_text(ITEMS)
    (tmp_path / "users.csv").write_text("user_id,age\nu1,30\n u2,40\n")
    day = tmp_path / "day.csv"
    day.write_text(HEADER + "u1,i1,4,1000000000\nu2,i2,5,1000000001\n")
    for current in (settings, bulk(settings)):
        result = run(day, current, clean_db)
        assert result.status == "rejected"
        assert "users.csv, line 3: user_id ' u2'" in (result.error or "")
        assert (result.rows_read, result.rows_merged, result.rows_quarantined) == (0, 0, 0)
        with psycopg.connect(clean_db) as conn:
            counts = conn.execute(
                "SELECT (SELECT count(*) FROM recranker.interactions),"
                " (SELECT count(*) FROM recranker.users),"
                " (SELECT count(*) FROM recranker.quarantine),"
                " (SELECT count(*) FROM pg_tables WHERE schemaname = 'recranker_staging')"
            ).fetchone()
            ledger = conn.execute(
                "SELECT status, rows_read, error FROM recranker.ingest_batches WHERE batch_id = %s",
                (result.batch_id,),
            ).fetchone()
        assert counts == (0, 0, 0, 0)
        assert ledger is not None and ledger[:2] == ("rejected", 0) and "users.csv" in ledger[2]
    assert primary_key(clean_db) == ("PRIMARY KEY (user_id, item_id, event_ts)",)
