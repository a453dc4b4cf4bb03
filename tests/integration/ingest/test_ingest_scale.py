"""Ingest at size: a file of 1,000,000 rows merges with its counts adding up, and a process
killed in the middle of its merge leaves no trace of a partial batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psycopg
import pytest

from recranker_core.config import Settings
from recranker_core.datasets.sources import describe_file
from recranker_core.datasets.synthetic import SynthFiles, generate
from recranker_core.ingest import ingest_file


@pytest.fixture(scope="module")
def million(tmp_path_factory: pytest.TempPathFactory) -> SynthFiles:
    out = tmp_path_factory.mktemp("million")
    return generate(out, users=20_000, items=5_000, interactions=1_000_000, seed=11)


def _counts(url: str) -> tuple[int, int, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM recranker.interactions),"
            " (SELECT count(*) FROM recranker.ingest_batches),"
            " (SELECT count(*) FROM recranker.quarantine)"
        ).fetchone()
    assert row is not None
    return row


@pytest.mark.slow
def test_killed_mid_merge_leaves_no_partial_batch(
    million: SynthFiles, settings: Settings, clean_db: str
):
    # A first small batch so "as it was before" is not simply "empty".
    first = million.directory / "first"
    first.mkdir()
    (first / "items.csv").write_bytes(million.items.read_bytes())
    (first / "first.csv").write_text("user_id,item_id,rating,timestamp\nu_x,i00001,4,1000000000\n")
    ingest_file(describe_file(first / "first.csv", None), settings, clean_db)
    before = _counts(clean_db)

    script = textwrap.dedent(
        f"""
        from recranker_core.config import Settings
        from recranker_core.datasets.sources import describe_file
        from recranker_core.ingest import ingest_file
        settings = Settings(home={str(settings.home)!r}, database_url={clean_db!r})
        ingest_file(describe_file(__import__('pathlib').Path({str(million.interactions)!r}), None),
                    settings, {clean_db!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    pid_in_db = None
    deadline = time.monotonic() + 240
    with psycopg.connect(clean_db, autocommit=True) as watch:
        while time.monotonic() < deadline and proc.poll() is None:
            row = watch.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'recranker-ingest' AND state = 'active' "
                "AND query LIKE 'INSERT INTO recranker.interactions%'"
            ).fetchone()
            if row:
                pid_in_db = row[0]
                break
            time.sleep(0.02)
        assert pid_in_db is not None, "the subprocess never reached the merge"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # The server rolls the transaction back once it notices its client is gone.
        while time.monotonic() < deadline:
            gone = watch.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid_in_db,)
            ).fetchone()
            if gone == (0,):
                break
            time.sleep(0.1)
    assert proc.returncode == -signal.SIGKILL
    assert _counts(clean_db) == before

    # The next run sweeps the dead run's staging tables and merges the whole file.
    result = ingest_file(describe_file(million.interactions, None), settings, clean_db)
    assert result.status == "merged"
    # Generated rows are all valid and unique, so every one of them must land.
    assert (result.rows_read, result.rows_merged, result.rows_quarantined) == (1_000_000,) * 2 + (
        0,
    )
    with psycopg.connect(clean_db) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'recranker_staging'"
        ).fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM recranker.interactions WHERE batch_id = %s", (result.batch_id,)
        ).fetchone() == (result.rows_merged,)
