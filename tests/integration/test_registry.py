"""The model registry against a real PostgreSQL: one champion, the gate, promote and rollback."""

from __future__ import annotations

import psycopg
import pytest

from recranker_core import registry
from recranker_core.errors import ConfigError


def metrics(ndcg10: float) -> dict[str, dict[str, float]]:
    return {"valid": {"ndcg@10": ndcg10, "hr@10": 2 * ndcg10}, "test": {"ndcg@10": 0.0}}


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
