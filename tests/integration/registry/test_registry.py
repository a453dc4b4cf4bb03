"""The model registry against a real PostgreSQL: one champion, the gate, promote and rollback."""

from __future__ import annotations

import dataclasses

import psycopg
import pytest

from recranker_core import registry
from recranker_core.errors import ConfigError

# Every model of these tests measured on the same users: the gate compares them as registered.
SAMPLE = {"n_users": 100, "users_hash": "0" * 64, "data_watermark": None, "like_threshold": 4.0}


def metrics(ndcg10: float) -> dict[str, object]:
    return {
        "valid": {"ndcg@10": ndcg10, "hr@10": 2 * ndcg10},
        "test": {"ndcg@10": 0.0},
        "sample": SAMPLE,
    }


def add(url: str, kind: str, ndcg10: float) -> int:
    return registry.register_model(
        url,
        kind=kind,
        hyperparameters={"dim": 64},
        metrics=metrics(ndcg10),
        data_watermark=None,
        artifact_uri=f"s3://b/models/{kind}",
        files={"model.onnx": "00"},
        lineage={"split": 1},
    )


def test_gate_promote_and_rollback(clean_db: str):
    first = add(clean_db, "mf_bpr", 0.050)
    decision = registry.gate(metrics(0.050), registry.champion(clean_db), tolerance=0.002)
    assert decision.promote and "no champion yet" in decision.reason
    registry.promote(clean_db, first, decision.reason)

    worse = add(clean_db, "lightgcn", 0.040)
    decision = registry.gate(metrics(0.040), registry.champion(clean_db), tolerance=0.002)
    assert not decision.promote and "below champion" in decision.reason
    registry.reject(clean_db, worse, decision.reason)
    assert registry.champion(clean_db).model_id == first  # a worse retrain leaves it serving

    close = add(clean_db, "sasrec", 0.049)
    assert registry.gate(metrics(0.049), registry.champion(clean_db), tolerance=0.002).promote
    registry.promote(clean_db, close, "within tolerance")
    statuses = {m.model_id: m.status for m in registry.list_models(clean_db)}
    assert statuses == {first: "retired", worse: "rejected", close: "champion"}

    restored = registry.rollback(clean_db)
    assert restored.model_id == first and registry.champion(clean_db).model_id == first
    assert registry.get_model(clean_db, close).status == "retired"
    assert registry.list_models(clean_db)[0].as_json()["metrics"]["valid"]["ndcg@10"] == 0.049


def test_one_champion_is_enforced_by_the_database(clean_db: str):
    a, b = add(clean_db, "mf_bpr", 0.05), add(clean_db, "mf_bpr", 0.06)
    registry.promote(clean_db, a, "first")
    with psycopg.connect(clean_db) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("UPDATE recranker.models SET status = 'champion' WHERE model_id = %s", (b,))


def test_unknown_model_and_empty_rollback_are_clear_errors(clean_db: str):
    with pytest.raises(ConfigError, match="no model 999"):
        registry.promote(clean_db, 999, "x")
    with pytest.raises(ConfigError, match="no earlier champion"):
        registry.rollback(clean_db)


def test_an_adapter_carries_its_fusion_decision(clean_db: str):
    from recranker_core.batch_rank.fusion import FusedWeights, GuardDecision

    model = add(clean_db, "mf_bpr", 0.05)
    adapter = registry.register_adapter(
        clean_db,
        objective="sft",
        backbone_id="tiny",
        backbone_hash="0" * 64,
        template_version="rr-2",
        base_model_id=model,
        hyperparameters={},
        metrics={"valid": {"ndcg@10": 0.1}},
        data_watermark=None,
        artifact_uri="s3://b/adapters/sft/x",
        files={},
        lineage={},
    )
    assert registry.get_adapter(clean_db, adapter).fusion is None
    decision = GuardDecision(
        "fused",
        0.01,
        0.004,
        FusedWeights(0.6, 0.1, 0.0, 0.3),
        3,
        200,
        80,
        0.05,
        0.06,
        "f" * 64,
        "fused +0.0100 (se 0.0040) over the base order on 200 validation users: served",
    )
    registry.update_adapter_fusion(clean_db, adapter, decision)
    stored = registry.get_adapter(clean_db, adapter)
    assert stored.fusion == decision
    assert stored.metrics["valid"] == {"ndcg@10": 0.1}  # the other metrics stay
    assert stored.as_json()["fusion"]["served"] == "fused"
    # A new measurement replaces the old one.
    registry.update_adapter_fusion(clean_db, adapter, dataclasses.replace(decision, served="base"))
    assert registry.get_adapter(clean_db, adapter).fusion.served == "base"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="no adapter 999"):
        registry.update_adapter_fusion(clean_db, 999, decision)
