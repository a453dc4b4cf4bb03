"""The ranking-run ledger when processes end badly, with real `recranker rank` subprocesses: a run
whose process is killed (-9) is marked failed by the next run; resuming it records every row
and user, the earlier process's shards included; SIGTERM cancels a run and exits 143. One test,
so the trained pipeline is built once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import psycopg

from recranker_core.batch_rank.runs import BATCH_RANK_LOCK, current_run, run_summary


def _rank(run_id: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flows", "rank", "--run-id", run_id, "--mode", "base"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(what: str, check: Any, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"the process ended before {what}: {proc.communicate()[1][-3000:]}"
            )
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}")


def _one(conn: psycopg.Connection, query: str, *params: Any) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def _stall_mid_run(url: str, run_id: str, proc: subprocess.Popen[str]) -> psycopg.Connection:
    """Once the process has written a shard, lock its run's ledger row: its next shard write
    then waits for the lock, so it is caught mid-run. Returns the connection holding the lock."""
    with psycopg.connect(url, autocommit=True) as watch:
        _wait(
            "a shard is written",
            lambda: _one(
                watch,
                "SELECT count(*) FROM recranker.ranking_shards WHERE run_id = %s "
                "AND status = 'done'",
                run_id,
            ),
            proc,
        )
        blocker = psycopg.connect(url)
        blocker.execute(
            "SELECT 1 FROM recranker.ranking_runs WHERE run_id = %s FOR UPDATE", (run_id,)
        )
        _wait(
            "the process waits for the run's row",
            lambda: _one(
                watch,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'SELECT status FROM recranker.%%'",
            ),
            proc,
        )
    return blocker


def test_killed_runs_fail_resumed_runs_count_everything_stopped_runs_cancel(
    tiny_pipeline: dict[str, object], prefect_api: str, monkeypatch
):
    from flows.batch_rank import batch_rank_flow

    url = str(tiny_pipeline["database_url"])
    monkeypatch.setenv("RECRANKER_RANK__SHARD_SIZE", "4")
    env = {**os.environ, "PREFECT_API_URL": prefect_api}

    proc = _rank("killed-run", env)
    blocker = _stall_mid_run(url, "killed-run", proc)
    proc.kill()  # SIGKILL: nothing of the process runs any more
    proc.wait(timeout=30)
    blocker.rollback()
    blocker.close()
    with psycopg.connect(url, autocommit=True) as conn:
        # The dead process's connections end (and its batch-rank lock with them).
        _wait(
            "the killed process's lock is gone",
            lambda: (
                not _one(
                    conn,
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s",
                    BATCH_RANK_LOCK,
                )
            ),
        )
    killed = run_summary(url, "killed-run")
    assert killed["status"] == "running"  # nobody could say otherwise
    done_before = killed["shards"]["done"]
    assert 1 <= done_before < killed["shards"]["total"]

    # The next run notices: the run is no longer 'running' but failed, with the reason.
    other = batch_rank_flow(None, "base", False)
    assert other["status"] == "complete" and other["run_id"] != "killed-run"
    killed = run_summary(url, "killed-run")
    assert killed["status"] == "failed" and "abandoned" in killed["error"]

    # Resumed, it records all of its rows and users, not only the shards written now.
    resumed = batch_rank_flow("killed-run", "base", True)
    assert resumed["resumed_shards"] == done_before
    summary = run_summary(url, "killed-run")
    with psycopg.connect(url) as conn:
        rows = _one(
            conn, "SELECT count(*) FROM recranker.recommendations WHERE run_id = %s", "killed-run"
        )
        users = _one(
            conn, "SELECT sum(users) FROM recranker.ranking_shards WHERE run_id = %s", "killed-run"
        )
    assert summary["status"] == "published" and current_run(url) == "killed-run"
    assert summary["counts"]["rows"] == resumed["rows"] == rows == other["rows"]
    assert summary["counts"]["users"] == resumed["users"] == users == other["users"]
    assert rows > 0

    # SIGTERM mid-run: the run is cancelled, nothing more is published, the process exits 143.
    proc = _rank("stopped-run", env)
    blocker = _stall_mid_run(url, "stopped-run", proc)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    blocker.rollback()  # let the shard in progress finish its write (or see the stop)
    blocker.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert time.monotonic() - signalled < 30
    stopped = run_summary(url, "stopped-run")
    assert stopped["status"] == "cancelled" and stopped["error"] == "stopped by SIGTERM"
    assert stopped["shards"]["done"] < stopped["shards"]["total"]
    assert current_run(url) == "killed-run"
