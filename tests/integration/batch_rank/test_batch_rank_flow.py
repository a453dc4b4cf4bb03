"""Batch ranking end to end with a tiny random Llama: tune an adapter, rank every active user,
publish, read the consumer view; a second run switches the view atomically; a run without an
adapter publishes base rankings; the evaluation table and HTML report are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg

from recranker_core.config import Settings


def current_rows(url: str) -> list[tuple[str, str, int, str, str]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT run_id, user_id, rank, item_id, source FROM recranker.recommendations_current "
            "ORDER BY user_id, rank"
        ).fetchall()


def test_rank_publish_switch_and_evaluate(
    s3_settings: Settings,
    tiny_pipeline: dict[str, object],
    prefect_api: str,
    tune_promoted,
    monkeypatch,
):
    from flows.batch_rank import batch_rank_flow
    from flows.evaluate_ranker import evaluate_ranker_flow

    url = str(tiny_pipeline["database_url"])
    # No adapter yet: the run publishes the base model's lists, every row source 'base'.
    base_run = batch_rank_flow()
    rows = current_rows(url)
    assert {r[0] for r in rows} == {base_run["run_id"]} and {r[4] for r in rows} == {"base"}
    assert base_run["llm_users"] == 0 and base_run["base_users"] == base_run["users"]

    tune_promoted(max_steps=4)
    # A user who arrived after the base model's watermark: cold, served the popular items.
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO recranker.interactions (user_id, item_id, rating, event_ts, batch_id) "
            "SELECT 'brand-new-user', item_id, 5, ts + interval '1 day', batch_id FROM ("
            "  SELECT item_id, event_ts AS ts, batch_id FROM recranker.interactions "
            "  ORDER BY event_ts DESC LIMIT 1) latest"
        )
        conn.commit()
    monkeypatch.setenv("RECRANKER_RANK__SHARD_SIZE", "50")
    monkeypatch.setenv("RECRANKER_RANK__LLM_MAX_USERS", "30")
    # The hybrid ablation re-ranks with the LLM whatever the adapter's guard decided (mode
    # `fused`, the default, is tested in test_fused_serving.py).
    monkeypatch.setenv("RECRANKER_RANK__MODE", "hybrid")
    run = batch_rank_flow()
    assert run["previous"] == base_run["run_id"] and run["status"] == "published"
    from recranker_core import registry
    from recranker_core.batch_rank.runs import run_summary

    # The ledger names the wording the adapter scored with.
    adapter = registry.champion_adapter(url)
    assert adapter is not None
    params = run_summary(url, run["run_id"])["params"]
    assert params["prompts"]["template"] == adapter.template_version == "rr-3"
    rows = current_rows(url)
    assert {r[0] for r in rows} == {run["run_id"]}  # the view switched whole
    users = {r[1] for r in rows}
    assert len(users) == run["users"] and run["cold_users"] == 1
    cold = [r for r in rows if r[1] == "brand-new-user"]
    assert len(cold) == 10 and {r[4] for r in cold} == {"base"}
    per_user: dict[str, list[tuple[int, str, str]]] = {}
    for _, user, rank, item, source in rows:
        per_user.setdefault(user, []).append((rank, item, source))
    with psycopg.connect(url) as conn:
        seen: dict[str, set[str]] = {}
        for u, i in conn.execute("SELECT user_id, item_id FROM recranker.interactions"):
            seen.setdefault(u, set()).add(i)
    sources = {}
    for user, items in per_user.items():
        assert [r for r, _, _ in items] == list(range(1, 11)), user
        assert len({i for _, i, _ in items}) == 10 and not seen[user] & {i for _, i, _ in items}
        sources[user] = {s for _, _, s in items}
        assert len(sources[user]) == 1  # a user's list comes from one source
    assert sum(s == {"llm"} for s in sources.values()) == run["llm_users"] == 30
    # The LLM re-orders the base candidates: same items as the base run for the same user.
    base_items: dict[str, set[str]] = {}
    with psycopg.connect(url) as conn:
        for user, item in conn.execute(
            "SELECT user_id, item_id FROM recranker.recommendations WHERE run_id = %s",
            (base_run["run_id"],),
        ):
            base_items.setdefault(user, set()).add(item)
    assert all({i for _, i, _ in per_user[u]} == base_items[u] for u in base_items)

    # `recranker runs` shows both runs and marks the published one.
    listed = subprocess.run(
        [sys.executable, "-m", "flows", "runs", "--json"],
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert {r["run_id"] for r in json.loads(listed.stdout)} >= {run["run_id"], base_run["run_id"]}

    result = evaluate_ranker_flow(None, 60)
    table = result["table"]
    methods = ("base", "pointwise", "pairwise", "listwise", "hybrid", "hybrid_tuned")
    methods += ("fused", "published")
    assert set(table) >= {*methods, "guard", "diff_ci", "slices", "weights"}
    for mode in methods:
        assert set(table[mode]) == {"valid", "test"}
        # Re-rankers only re-order the base top-N: HR@10 is the same for every method.
        assert table[mode]["test"]["hr@10"] == table["base"]["test"]["hr@10"]
    # `published` follows the decision stored with the adapter (what a fused run serves); the
    # evaluation's own guard reading on its 60 users is reported beside it.
    guard = table["guard"]
    measured = table.get("guard_evaluation", guard)
    assert guard["served"] in ("fused", "base") and measured["n_users"] == 60
    assert guard["users_hash"] == registry.champion_adapter(url).fusion.users_hash  # type: ignore[union-attr]
    if guard["served"] == "base":
        assert table["published"]["test"] == table["base"]["test"]
    lo, hi = table["diff_ci"]["fused"]["test"]["ndcg@3"]
    diff = table["fused"]["test"]["ndcg@3"] - table["base"]["test"]["ndcg@3"]
    assert lo - 1e-9 <= diff <= hi + 1e-9
    likes = table["slices"]["train_likes"]
    assert sum(s["users"] for s in likes.values()) == 60
    assert "60 of" in result["sample"]  # a sample says so
    report = Path(result["report"])
    assert report.exists() and "<svg" in report.read_text()
    with psycopg.connect(url) as conn:
        stored = conn.execute(
            "SELECT metrics, params FROM recranker.ranker_evaluations WHERE evaluation_id = %s",
            (result["evaluation_id"],),
        ).fetchone()
    assert stored is not None and stored[0]["hybrid"]["test"] == table["hybrid"]["test"]
    assert stored[0]["guard"] == guard and stored[0]["diff_ci"] == table["diff_ci"]
    assert stored[1]["template"] == "rr-3"  # the wording the adapter was scored with
