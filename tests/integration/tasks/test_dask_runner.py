"""Batch ranking with its shards on a Dask LocalCluster of 2 worker processes (prefect-dask's
DaskTaskRunner, real PostgreSQL, SeaweedFS, Prefect API, tiny tuned model): the published
recommendations equal those of the default threads runner on the same data and models, and a
worker process killed mid-run still ends in a complete, correct publish."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import psycopg
import pytest


def _rows(url: str, run_id: str) -> dict[tuple[str, int], tuple[str, str, float, int]]:
    with psycopg.connect(url) as conn:
        return {
            (user, rank): (item, source, score, base_rank)
            for user, rank, item, source, score, base_rank in conn.execute(
                "SELECT user_id, rank, item_id, source, score, base_rank "
                "FROM recranker.recommendations WHERE run_id = %s",
                (run_id,),
            )
        }


def _dask_workers() -> list[psutil.Process]:
    """The Dask worker processes of a LocalCluster started in this process: its nannies live
    here and spawn each worker with multiprocessing's spawn_main."""
    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if any("spawn_main" in part for part in proc.cmdline()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _shards_done(url: str) -> tuple[int, int]:
    """(done, all) shards of the running ranking run, (0, 0) when none runs."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE s.status = 'done'), count(*) "
            "FROM recranker.ranking_shards s JOIN recranker.ranking_runs r USING (run_id) "
            "WHERE r.status = 'running'"
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def test_dask_runner_publishes_the_same_run_and_survives_a_killed_worker(
    tiny_pipeline: dict[str, object], tune_promoted, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.batch_rank import batch_rank_flow

    url = str(tiny_pipeline["database_url"])
    tune_promoted(max_steps=1)
    monkeypatch.setenv("RECRANKER_RANK__SHARD_SIZE", "20")
    monkeypatch.setenv("RECRANKER_RANK__LLM_MAX_USERS", "24")
    # The hybrid re-ranks whatever the adapter's guard decided: the LLM runs on the workers.
    monkeypatch.setenv("RECRANKER_RANK__MODE", "hybrid")

    threads = batch_rank_flow(publish=False)
    assert threads["llm_users"] == 24 and threads["status"] == "complete"
    expected = _rows(url, threads["run_id"])

    monkeypatch.setenv("RECRANKER_RUNNER__KIND", "dask")
    monkeypatch.setenv("RECRANKER_RUNNER__WORKERS", "2")
    on_dask = batch_rank_flow()
    assert on_dask["status"] == "published"
    assert {k: v for k, v in on_dask.items() if k in ("users", "rows", "llm_users")} == {
        k: threads[k] for k in ("users", "rows", "llm_users")
    }
    got = _rows(url, on_dask["run_id"])
    assert got.keys() == expected.keys()
    for key, (item, source, score, base_rank) in expected.items():
        assert got[key][0] == item and got[key][1] == source and got[key][3] == base_rank, key
        assert got[key][2] == pytest.approx(score, abs=1e-4)

    # Kill one worker process once a shard is written and others remain; Dask reschedules the
    # killed worker's shard (its nanny restarts the process) and the run completes.
    monkeypatch.setenv("RECRANKER_RANK__SHARD_SIZE", "10")
    killed: list[tuple[int, int, int]] = []
    stop = threading.Event()

    def kill_one() -> None:
        # Mid-run: the cluster is working (a shard written) and shards remain.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not killed and not stop.is_set():
            done, total = _shards_done(url)
            workers = _dask_workers()
            if 1 <= done < total and len(workers) >= 2:
                victim = workers[-1]
                victim.send_signal(signal.SIGKILL)
                killed.append((victim.pid, done, total))
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    survived = batch_rank_flow()
    stop.set()
    killer.join(timeout=5)
    assert killed, "no Dask worker process was found to kill"
    assert survived["status"] == "published"
    with psycopg.connect(url) as conn:
        published = conn.execute("SELECT run_id FROM recranker.published").fetchone()
        per_user = conn.execute(
            "SELECT user_id, count(*), count(DISTINCT item_id) FROM "
            "recranker.recommendations_current GROUP BY user_id"
        ).fetchall()
    assert published is not None and published[0] == survived["run_id"]
    assert len(per_user) == survived["users"] and {(c, d) for _, c, d in per_user} == {(10, 10)}
    got = _rows(url, survived["run_id"])
    assert got.keys() == expected.keys()
    diff = {k: (got[k], expected[k]) for k in expected if got[k][:2] != expected[k][:2]}
    assert not diff, (len(diff), list(diff.items())[:5], killed)
