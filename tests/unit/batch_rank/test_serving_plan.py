"""What a batch-ranking run serves in each mode: mode `fused` follows the champion adapter's
stored guard decision (base order and no LLM, or the fused order with its weights), an
override of the weights is recorded, and weights with nothing on the LLM need no LLM."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from recranker_core.batch_rank.fusion import FusedWeights, GuardDecision
from recranker_core.batch_rank.serving import plan_serving, served_weights
from recranker_core.errors import ConfigError, DataError
from recranker_core.registry import AdapterRecord


def adapter(fusion: dict | None) -> AdapterRecord:
    metrics: dict = {"valid": {"ndcg@10": 0.1}}
    if fusion is not None:
        metrics["fusion"] = fusion
    return AdapterRecord(
        adapter_id=7,
        objective="sft",
        status="champion",
        backbone_id="tiny",
        backbone_hash="0" * 64,
        template_version="rr-2",
        base_model_id=1,
        metrics=metrics,
        hyperparameters={},
        data_watermark=None,
        artifact_uri="s3://b/a",
        files={},
        lineage={},
        note=None,
        created_at=datetime.now(UTC),
        promoted_at=None,
    )


def decision(served: str, weights: FusedWeights) -> dict:
    return GuardDecision(
        served,
        0.012,
        0.004,
        weights,
        3,
        200,
        90,
        0.05,
        0.062,
        "a" * 64,
        f"fused +0.0120 (se 0.0040) over the base order on 200 validation users: {served}",
    ).as_json()


def test_a_stored_base_decision_serves_the_base_order_without_the_llm():
    plan = plan_serving("fused", adapter(decision("base", FusedWeights(0.5, 0, 0, 0.5))))
    assert not plan.llm and plan.fused is None and plan.served == "base"
    assert "no LLM time" in plan.note and "adapter 7" in plan.note
    assert plan.fusion is not None
    assert plan.fusion["served"] == "base" and plan.fusion["guard"] == "base"
    assert plan.fusion["gain"] == 0.012 and plan.fusion["adapter_id"] == 7


def test_no_stored_decision_serves_the_base_order_and_says_how_to_measure():
    plan = plan_serving("fused", adapter(None))
    assert not plan.llm and "recranker tune-weights" in plan.note
    assert plan.fusion == {
        "adapter_id": 7,
        "guard": None,
        "source": "none stored",
        "served": "base",
        "weights": None,
    }


def test_a_stored_fused_decision_re_ranks_with_its_weights():
    w = FusedWeights(0.6, 0.0, 0.1, 0.3)
    record = adapter(decision("fused", w))
    plan = plan_serving("fused", record)
    assert plan.llm and plan.fused == w and plan.served == "fused"
    assert plan.fusion is not None and plan.fusion["weights"] == [0.6, 0.0, 0.1, 0.3]
    assert served_weights(record) == w
    assert w.tasks == ("pairwise", "listwise")  # pointwise prompts are not scored


def test_the_override_replaces_the_stored_weights_and_is_recorded():
    plan = plan_serving(
        "fused", adapter(decision("base", FusedWeights(1, 0, 0, 0))), [0.2, 0.2, 0.2, 0.4]
    )
    assert plan.llm and plan.fused == FusedWeights(0.2, 0.2, 0.2, 0.4)
    assert plan.fusion is not None and plan.fusion["source"] == "RECRANKER_RANK__FUSED_WEIGHTS"
    assert plan.fusion["guard"] == "base" and "overrides" in plan.note
    # Weights with nothing on the LLM tasks are the base order: no LLM needed.
    only_base = plan_serving("fused", adapter(None), [1, 0, 0, 0])
    assert not only_base.llm and only_base.served == "base"


def test_other_modes_and_errors():
    assert plan_serving("hybrid", adapter(None)).llm
    assert not plan_serving("base", adapter(None)).llm
    none = plan_serving("fused", None)
    assert not none.llm and "no champion adapter" in none.note
    with pytest.raises(ConfigError, match="use one of fused"):
        plan_serving("magic", None)
    with pytest.raises(DataError, match="tune-weights"):
        plan_serving("fused", adapter({"served": "fused"}))  # a truncated decision
