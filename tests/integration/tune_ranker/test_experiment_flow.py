"""`recranker experiment objectives` as a flow on a tiny random Llama (real PostgreSQL,
SeaweedFS, Prefect API): SFT, ALRO and DMPO tuned on the same sampled users and budget, DMPO from
this experiment's SFT adapter; all three registered as candidates (the champion untouched), each
evaluated and stored, the position bias measured, and the comparison written with every row."""

from __future__ import annotations

import json
import math
from pathlib import Path

import psycopg
import pytest


def test_objectives_experiment_tunes_evaluates_and_compares(
    tiny_pipeline: dict[str, object], tune_promoted
) -> None:
    from flows.experiment import experiment_objectives_flow
    from recranker_core import registry
    from recranker_core.errors import ConfigError

    url = str(tiny_pipeline["database_url"])
    with pytest.raises(ConfigError, match="objectives must be distinct names"):
        experiment_objectives_flow(objectives=["sft", "ranknet"])
    champion = tune_promoted(objective="sft", max_steps=1)["adapter_id"]

    result = experiment_objectives_flow(max_steps=2, max_users=30, shuffles=2, bias_users=4)

    by_objective = {r["objective"]: r for r in result["results"]}
    assert list(by_objective) == ["sft", "alro", "dmpo"]
    adapters = {a.adapter_id: a for a in registry.list_adapters(url)}
    assert registry.champion_adapter(url).adapter_id == champion  # type: ignore[union-attr]
    for name, r in by_objective.items():
        adapter = adapters[r["adapter_id"]]
        assert (adapter.objective, adapter.status) == (name, "candidate")
        assert adapter.lineage["experiment"] == result["experiment"]
        assert r["tuning"]["steps"] == 2
        for method in ("base", "pointwise", "pairwise", "listwise", "hybrid"):
            for split in ("valid", "test"):
                assert set(r["table"][method][split]) >= {"hr@3", "ndcg@3", "ndcg@10"}
        bias = r["position_bias"]
        assert bias["shuffles"] == 2 and 1 <= bias["prompts"] <= 4
        assert -1.0 <= bias["mean_spearman"] <= 1.0 and 0.0 <= bias["top1_agreement"] <= 1.0
        assert r["inference_tokens_per_user"] > 0
    # DMPO starts from (and keeps as reference) this experiment's SFT adapter, not the champion.
    dmpo = adapters[by_objective["dmpo"]["adapter_id"]]
    assert dmpo.lineage["init_adapter_id"] == by_objective["sft"]["adapter_id"] != champion
    # The base rows do not depend on the objective: same users, same candidates.
    bases = {json.dumps(r["table"]["base"], sort_keys=True) for r in by_objective.values()}
    assert len(bases) == 1

    with psycopg.connect(url) as conn:
        stored = conn.execute(
            "SELECT adapter_id, params->>'objective' FROM recranker.ranker_evaluations "
            "WHERE params->>'experiment' = 'objectives' ORDER BY evaluation_id"
        ).fetchall()
    assert stored == [(by_objective[o]["adapter_id"], o) for o in ("sft", "alro", "dmpo")]

    markdown = Path(result["markdown"]).read_text()
    for name in ("sft", "alro", "dmpo"):
        assert f"| {name} | hybrid | test |" in markdown
        assert f"| {name} | {by_objective[name]['adapter_id']} |" in markdown
    saved = json.loads(Path(result["json"]).read_text())
    assert [r["objective"] for r in saved["results"]] == ["sft", "alro", "dmpo"]
    assert not math.isnan(saved["results"][0]["position_bias"]["mean_spearman"])
