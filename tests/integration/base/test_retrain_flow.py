"""The retrain-base flow end to end on a small generated catalogue: real PostgreSQL, SeaweedFS
and Prefect API; trained models are registered, stored with manifests, exported to ONNX that
serves candidates, and a corrupted artifact is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest

from recranker_core.config import Settings


@pytest.fixture()
def small_catalogue(tmp_path: Path, settings: Settings, clean_db: str) -> str:
    from recranker_core.datasets.sources import describe_file
    from recranker_core.datasets.synthetic import generate
    from recranker_core.ingest import ingest_file

    files = generate(tmp_path / "synth", users=150, items=120, interactions=6000, seed=3)
    ingest_file(describe_file(files.interactions, None), settings, clean_db)
    return clean_db


def test_retrain_registers_stores_and_promotes(
    prefect_api: str, s3_settings: Settings, small_catalogue: str, monkeypatch, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.retrain_base import retrain_base_flow
    from recranker_core import registry
    from recranker_core.base.onnx_export import OnnxScorer, pad_exclusions
    from recranker_core.errors import ArtifactIntegrityError
    from recranker_core.stack import s3_config
    from recranker_core.store import S3ArtifactStore, fetch_cached

    monkeypatch.setenv("RECRANKER_DATABASE_URL", small_catalogue)
    monkeypatch.setenv("RECRANKER_HOME", str(s3_settings.home))
    monkeypatch.setenv("RECRANKER_BASE__MF__EPOCHS", "3")
    monkeypatch.setenv("RECRANKER_BASE__MF__PATIENCE", "1")

    summary = retrain_base_flow(["mostpop", "mf"])
    models = registry.list_models(small_catalogue)
    assert sorted(m.kind for m in models) == ["mf", "mostpop"]
    champion = registry.champion(small_catalogue)
    assert champion is not None and summary["promoted"] == champion.model_id
    loser = next(m for m in models if m.model_id != champion.model_id)
    assert loser.status == "rejected" and "not the best of this run" in (loser.note or "")
    best_valid = max(m.metrics["valid"]["ndcg@10"] for m in models)
    assert champion.metrics["valid"]["ndcg@10"] == best_valid
    assert set(champion.metrics["test"]) == {f"{m}@{k}" for m in ("hr", "ndcg") for k in (3, 5, 10)}

    # The interface other tools rely on: `recranker models list --json`.
    listed = subprocess.run(
        [sys.executable, "-m", "flows", "models", "list", "--json"],
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = json.loads(listed.stdout)
    assert {(r["id"], r["kind"], r["status"]) for r in rows} == {
        (m.model_id, m.kind, m.status) for m in models
    }
    keys = {f"{m}@{k}" for m in ("hr", "ndcg") for k in (3, 5, 10)}
    assert all(set(r["metrics"]["valid"]) == keys == set(r["metrics"]["test"]) for r in rows)

    with get_client(sync_client=True) as client:
        promotion = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["base-model-promotion"]))
        )
    # The harness is shared by the session: other tests' retrains wrote this key too, so read
    # the newest one (this flow's).
    newest = max(promotion, key=lambda a: a.created) if promotion else None
    assert newest is not None
    assert f"**Promoted** model {champion.model_id} ({champion.kind})" in str(newest.data)

    # The champion's artifact: verified download, ONNX candidates without seen items.
    cfg = s3_config(s3_settings)
    store = S3ArtifactStore(cfg)
    prefix = champion.lineage["prefix"]
    local = fetch_cached(store, prefix, tmp_path / "cache")
    item_ids = json.loads((local / "item_ids.json").read_text())
    scorer = OnnxScorer(local / "model.onnx")
    seen = [np.array([0, 1, 2]), np.array([], dtype=np.int64)]
    scores, items = scorer.run(np.array([0, 1], dtype=np.int64), pad_exclusions(seen))
    assert items.shape == (2, 10) and not {0, 1, 2} & set(items[0].tolist())
    assert np.all(np.diff(scores, axis=1) <= 0) and items.max() < len(item_ids)

    # Candidates of every active user from the champion: N items each, none already seen.
    from recranker_core.base.candidates import (
        CandidateStats,
        active_users,
        champion_candidates,
        data_watermark,
        load_champion,
    )

    loaded = load_champion(small_catalogue, store, tmp_path / "cache")
    assert loaded.model_id == champion.model_id and loaded.k == 10
    watermark = data_watermark(small_catalogue)
    users = active_users(small_catalogue, watermark, None) + ["never-seen-user"]
    stats = CandidateStats()
    chunks = list(
        champion_candidates(small_catalogue, loaded, users, watermark, chunk_size=64, stats=stats)
    )
    got = {c.user_id: c for chunk in chunks for c in chunk}
    assert stats.cold == 1 and stats.cold_users == ["never-seen-user"]
    assert set(got) == set(users) - {"never-seen-user"} and stats.chunks == 3
    with psycopg.connect(small_catalogue) as conn:
        interacted: dict[str, set[str]] = {}
        for u, i in conn.execute("SELECT user_id, item_id FROM recranker.interactions"):
            interacted.setdefault(u, set()).add(i)
    for user_id, c in got.items():
        assert len(c.items) == 10 and len(set(c.items)) == 10
        assert not interacted[user_id] & set(c.items), user_id
        assert c.scores == sorted(c.scores, reverse=True)

    cli = subprocess.run(
        [sys.executable, "-m", "flows", "candidates", "--json", "--user", users[0]],
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(cli.stdout)["items"] == got[users[0]].items
    assert "1 users scored, 0 cold" in cli.stderr

    # Flip one byte of the stored ONNX file: loading refuses it.
    key = f"{prefix}/model.onnx"
    client = cfg.client()
    body = bytearray(client.get_object(Bucket=cfg.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=cfg.bucket, Key=key, Body=bytes(body))
    with pytest.raises(ArtifactIntegrityError, match="model.onnx"):
        store.get_directory(prefix, tmp_path / "fresh")


def test_retrain_on_an_empty_table_is_a_clear_error(
    prefect_api: str, s3_settings: Settings, clean_db: str, monkeypatch
):
    from flows.retrain_base import retrain_base_flow
    from recranker_core import registry
    from recranker_core.errors import DataError

    monkeypatch.setenv("RECRANKER_DATABASE_URL", clean_db)
    monkeypatch.setenv("RECRANKER_HOME", str(s3_settings.home))
    with pytest.raises(DataError, match="no interactions"):
        retrain_base_flow(["mostpop"])
    assert registry.list_models(clean_db) == []


def test_the_gate_re_measures_a_champion_measured_on_other_users(
    prefect_api: str, s3_settings: Settings, small_catalogue: str, monkeypatch
):
    """The champion's registered NDCG@10 was measured on other users than the candidate's (a
    sample of 40, or an earlier split): the retrain measures the champion again on the
    candidate's users before comparing, and the decision says both sample sizes and that it
    did; a champion measured on the candidate's users is compared as registered."""
    from flows.retrain_base import retrain_base_flow
    from recranker_core import registry

    monkeypatch.setenv("RECRANKER_DATABASE_URL", small_catalogue)
    monkeypatch.setenv("RECRANKER_HOME", str(s3_settings.home))
    monkeypatch.setenv("RECRANKER_BASE__BIASEDMF__EPOCHS", "2")
    # Every candidate passes: what the gate compares is under test, not which model wins.
    monkeypatch.setenv("RECRANKER_RETRAIN__PROMOTION_TOLERANCE", "1.0")
    with psycopg.connect(small_catalogue) as conn:
        row = conn.execute(
            "SELECT percentile_disc(0.7) WITHIN GROUP (ORDER BY event_ts) "
            "FROM recranker.interactions"
        ).fetchone()
    assert row is not None
    early = row[0]

    def gate_of(summary: dict[str, object]) -> dict[str, object]:
        model = registry.get_model(small_catalogue, summary["models"]["mostpop"])  # type: ignore[index]
        assert model.lineage["gate"] == summary["gate"]
        return model.lineage["gate"]

    # 1. The first champion: on a 40-user sample of the split as of an earlier watermark.
    monkeypatch.setenv("RECRANKER_BASE__EVAL_MAX_USERS", "40")
    first = retrain_base_flow(["mostpop"], watermark=early)
    a = registry.get_model(small_catalogue, first["promoted"])  # type: ignore[arg-type]
    assert a.metrics["sample"]["n_users"] == 40
    assert gate_of(first)["champion"] is None

    # 2. A candidate on every evaluable user of today's split: the champion is re-measured on
    # them (its users and items mapped by id across the two splits).
    monkeypatch.delenv("RECRANKER_BASE__EVAL_MAX_USERS")
    second = retrain_base_flow(["mostpop"])
    gate = gate_of(second)
    b = registry.get_model(small_catalogue, second["promoted"])  # type: ignore[arg-type]
    n_all = b.metrics["sample"]["n_users"]
    assert n_all > 40 and gate["candidate"]["sample"]["n_users"] == n_all
    assert gate["champion"]["model_id"] == a.model_id and gate["champion"]["remeasured"] is True
    assert gate["champion"]["sample"] == b.metrics["sample"]
    assert gate["champion"]["registered_sample"]["n_users"] == 40
    assert gate["champion"]["registered_value"] == a.metrics["valid"]["ndcg@10"]
    assert 0.0 <= gate["champion"]["value"] <= 1.0
    assert f"re-measured on the same {n_all} users" in (b.note or "")
    assert "was measured on 40 users of the split as of" in (b.note or "")

    # 3. A candidate on a 40-user sample of the same split: champion B (every user) is
    # re-measured on those 40. MostPop on the same split is the same model, so re-measured on
    # the same users it scores exactly what the candidate scores.
    monkeypatch.setenv("RECRANKER_BASE__EVAL_MAX_USERS", "40")
    third = retrain_base_flow(["mostpop"])
    gate = gate_of(third)
    c = registry.get_model(small_catalogue, third["promoted"])  # type: ignore[arg-type]
    assert gate["champion"]["model_id"] == b.model_id and gate["champion"]["remeasured"] is True
    assert gate["champion"]["registered_sample"]["n_users"] == n_all
    assert gate["candidate"]["sample"]["n_users"] == gate["champion"]["sample"]["n_users"] == 40
    assert gate["champion"]["value"] == pytest.approx(c.metrics["valid"]["ndcg@10"], abs=1e-12)

    # 4. The same sample again: the champion is compared as registered, not re-measured.
    fourth = retrain_base_flow(["mostpop"])
    gate = gate_of(fourth)
    assert gate["champion"]["model_id"] == c.model_id and gate["champion"]["remeasured"] is False
    assert gate["champion"]["value"] == c.metrics["valid"]["ndcg@10"]
    assert "on the same 40 users" in gate["reason"]
