"""Mode `fused` (the default) end to end with a tiny tuned Llama, real PostgreSQL, SeaweedFS,
Prefect API and ONNX champion: an adapter whose stored guard decision is "base" publishes the
base lists without loading the backbone (its path is broken on purpose), and says so in the
run's params, `recranker runs` and its artifact; a "fused" decision re-ranks with the stored
weights, exactly as `fused_order` orders the base scores and the LLM's listwise utilities."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import psycopg
import pytest


def lists(url: str, run_id: str) -> dict[str, list[tuple[str, float, int, str]]]:
    """user -> [(item, score, base_rank, source)] in rank order."""
    out: dict[str, list[tuple[str, float, int, str]]] = {}
    with psycopg.connect(url) as conn:
        for user, item, score, base_rank, source in conn.execute(
            "SELECT user_id, item_id, score, base_rank, source FROM recranker.recommendations "
            "WHERE run_id = %s ORDER BY user_id, rank",
            (run_id,),
        ):
            out.setdefault(user, []).append((item, score, base_rank, source))
    return out


def artifact(flow_run_id: UUID, key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
    assert len(found) == 1, found
    return str(found[0].data)


def decision(served: str, weights: Any) -> Any:
    from recranker_core.batch_rank.fusion import GuardDecision

    return GuardDecision(
        served, 0.004, 0.006, weights, 3, 40, 12, 0.05, 0.054, "c" * 64,
        f"fused +0.0040 (se 0.0060) over the base order on 40 validation users: {served}",
    )  # fmt: skip


def test_fused_mode_serves_the_adapters_stored_decision(
    tiny_pipeline: dict[str, object],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cli.adapters import adapters_list
    from cli.ranker import tune_weights
    from flows.batch_rank import batch_rank_flow
    from flows.tune_ranker import tune_ranker_flow
    from recranker_core import registry
    from recranker_core.batch_rank.fusion import FusedWeights, fused_order
    from recranker_core.batch_rank.runs import list_runs, run_summary

    url = str(tiny_pipeline["database_url"])
    summary = tune_ranker_flow(max_steps=2)
    if not summary["promoted"]:  # a gate on a tiny random backbone decides by chance
        registry.promote_adapter(url, int(summary["adapter_id"]), "promoted by the test")
    adapter = registry.champion_adapter(url)
    assert adapter is not None

    # `recranker tune-weights` measures the guard on validation users and stores it.
    tune_weights(max_users=None, step=0.5)
    out = capsys.readouterr().out
    stored = registry.get_adapter(url, adapter.adapter_id).fusion
    assert stored is not None and f"guard: serves {stored.served.upper()}" in out
    assert f"stored on adapter {adapter.adapter_id}" in out
    assert sum(stored.weights.as_list()) == pytest.approx(1.0)
    adapters_list(limit=5, as_json=False)
    assert f"{stored.served} {stored.gain:+.4f}" in capsys.readouterr().out
    monkeypatch.setenv("RECRANKER_RANK__LLM_MAX_USERS", "20")
    base = lists(url, batch_rank_flow(mode="base", publish=False)["run_id"])

    # The guard said base: no backbone is loaded (its path leads nowhere) and no LLM runs.
    registry.update_adapter_fusion(
        url, adapter.adapter_id, decision("base", FusedWeights(0.5, 0, 0, 0.5))
    )
    monkeypatch.setenv("RECRANKER_BACKBONE__PATH", str(tmp_path / "no-such-backbone"))
    state = batch_rank_flow(return_state=True)
    run = state.result()
    assert run["mode"] == "fused" and run["served"] == "base" and run["llm_users"] == 0
    assert "guard" in run["serving"] and "no LLM time" in run["serving"]
    served = lists(url, run["run_id"])
    assert served == base  # the base model's lists, source 'base'
    assert {s for rows in served.values() for *_, s in rows} == {"base"}
    params = run_summary(url, run["run_id"])["params"]
    assert params["fusion"]["served"] == "base" and params["fusion"]["guard"] == "base"
    assert params["fusion"]["adapter_id"] == adapter.adapter_id
    listed = {r["run_id"]: r for r in list_runs(url)}[run["run_id"]]
    assert listed["fusion"]["served"] == "base" and listed["fusion"]["gain"] == 0.004
    markdown = artifact(state.state_details.flow_run_id, "batch-rank")
    assert "served **base**" in markdown and "no LLM time" in markdown

    monkeypatch.setenv("RECRANKER_BACKBONE__PATH", str(tiny_pipeline["tiny"]))
    # The listwise ablation: its scores are z(listwise utility) of every candidate (k = N).
    listwise = lists(url, batch_rank_flow(mode="listwise", publish=False)["run_id"])
    llm_users = [u for u, rows in listwise.items() if rows[0][3] == "llm"]
    assert len(llm_users) == 20

    # The guard said fused with all weight on listwise: the listwise ablation's lists.
    registry.update_adapter_fusion(
        url, adapter.adapter_id, decision("fused", FusedWeights(0, 0, 0, 1))
    )
    only_list = batch_rank_flow(publish=False)
    assert only_list["served"] == "fused" and only_list["llm_users"] == 20
    got = lists(url, only_list["run_id"])
    assert [[r[0] for r in got[u]] for u in llm_users] == [
        [r[0] for r in listwise[u]] for u in llm_users
    ]

    # Half base, half listwise: exactly fused_order of the base scores and the LLM's listwise.
    w = FusedWeights(0.5, 0, 0, 0.5)
    registry.update_adapter_fusion(url, adapter.adapter_id, decision("fused", w))
    run = batch_rank_flow()
    assert run["served"] == "fused" and run["llm_users"] == 20
    params = run_summary(url, run["run_id"])["params"]
    assert params["fusion"]["weights"] == [0.5, 0.0, 0.0, 0.5]
    assert params["fusion"]["source"] == "stored"
    fused = lists(url, run["run_id"])
    changed = 0
    for u in llm_users:
        items = [r[0] for r in base[u]]  # base order
        base_scores = np.array([r[1] for r in base[u]])
        z_list = np.zeros(len(items))
        for _, score, base_rank, _ in listwise[u]:
            z_list[base_rank - 1] = score
        nothing = np.full(len(items), np.nan)
        expected = [items[p] for p in fused_order(base_scores, nothing, nothing, z_list, w)]
        assert [r[0] for r in fused[u]] == expected, u
        assert {r[3] for r in fused[u]} == {"llm"}
        changed += expected != items
    assert changed > 0  # the fusion moved someone: this compares real re-rankings
    others = [u for u in fused if u not in llm_users]
    assert all(fused[u] == base[u] for u in others)  # beyond LLM_MAX_USERS: the base lists
