"""Stopping on SIGTERM and SIGINT against real services: a real signal to a real `recranker
ingest` subprocess mid-merge rolls the batch back, records it as cancelled, is not retried and
ends the process with 143; the stop handler itself maps SIGINT to 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from recranker_core.config import Settings
from recranker_core.datasets.sources import describe_file
from recranker_core.datasets.synthetic import generate
from recranker_core.ingest import ingest_file
from recranker_core.interrupts import Stopped, check_stop, stop_on_signals, stop_requested


def _counts(url: str) -> tuple[int, int, int]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM recranker.interactions),"
            " (SELECT count(*) FROM recranker.users),"
            " (SELECT count(*) FROM recranker.quarantine)"
        ).fetchone()
    assert row is not None
    return row


def test_sigterm_mid_merge_cancels_the_batch_and_exits_143(
    tmp_path: Path, settings: Settings, clean_db: str, prefect_api: str
):
    files = generate(tmp_path / "synth", users=4000, items=1500, interactions=150_000, seed=7)
    # A first batch, so "as before" is not simply "empty".
    first = tmp_path / "first"
    first.mkdir()
    (first / "items.csv").write_bytes(files.items.read_bytes())
    (first / "first.csv").write_text("user_id,item_id,rating,timestamp\nu_x,i00001,4,1000000000\n")
    ingest_file(describe_file(first / "first.csv", None), settings, clean_db)
    before = _counts(clean_db)

    env = {
        **os.environ,
        "RECRANKER_DATABASE_URL": clean_db,
        "RECRANKER_HOME": str(settings.home),
        "PREFECT_API_URL": prefect_api,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows", "ingest", str(files.interactions), "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    signalled = None
    deadline = time.monotonic() + 240
    with psycopg.connect(clean_db, autocommit=True) as watch:
        while time.monotonic() < deadline and proc.poll() is None:
            # This database only: the server may be running other sessions' tests too.
            if watch.execute(
                "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'recranker-ingest' AND state = 'active' "
                "AND query LIKE 'INSERT INTO recranker.interactions%'"
            ).fetchone():
                proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                break
            time.sleep(0.01)
    assert signalled is not None, "the ingest never reached its merge"
    out, err = proc.communicate(timeout=120)
    stopped_after = time.monotonic() - signalled

    assert proc.returncode == 143, err[-3000:]
    assert stopped_after < 30, f"the process lived {stopped_after:.0f} s after SIGTERM"
    assert "stopped by SIGTERM" in err
    assert _counts(clean_db) == before  # nothing of the batch was merged
    with psycopg.connect(clean_db) as conn:
        ledger = conn.execute(
            "SELECT status, rows_read, rows_merged, rows_duplicate, rows_quarantined, error "
            "FROM recranker.ingest_batches WHERE file_name = %s",
            (files.interactions.name,),
        ).fetchall()
        staging = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'recranker_staging'"
        ).fetchone()
    # One attempt (no retry), recorded as cancelled with balanced, zero counts.
    assert [row[:5] for row in ledger] == [("cancelled", 0, 0, 0, 0)]
    assert "stopped by SIGTERM during merge" in ledger[0][5], err[-6000:]
    assert staging == (0,)

    # The same file ingests whole afterwards: the cancelled batch does not block it.
    result = ingest_file(describe_file(files.interactions, None), settings, clean_db)
    assert (result.status, result.rows_read) == ("merged", 150_000)
    assert result.rows_merged + result.rows_duplicate + result.rows_quarantined == 150_000


def test_stop_handler_raises_in_the_main_thread_and_sets_the_flag():
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(Stopped) as info, stop_on_signals():
        assert not stop_requested()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler interrupts the sleep
    assert (info.value.code, str(info.value)) == (130, "stopped by SIGINT")
    assert stop_requested()  # work in other threads sees it
    with pytest.raises(Stopped):
        check_stop()
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored
    with stop_on_signals():  # a new scope starts clear
        assert not stop_requested()
        check_stop()
