"""The tune-ranker flow end to end with a tiny random Llama: real PostgreSQL, SeaweedFS and
Prefect API. The champion base model feeds sampling and hints; the dataset and the adapter land
in S3 with manifests; the adapter is registered and gated; a corrupted adapter file and an adapter
for another backbone are refused; a rerun resumes from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recranker_core.config import Settings


def test_tune_flow_stores_registers_and_refuses_bad_adapters(
    s3_settings: Settings, tiny_pipeline: dict[str, object], tmp_path: Path
):
    from flows.tune_ranker import tune_ranker_flow
    from recranker_core import registry
    from recranker_core.errors import ArtifactIntegrityError
    from recranker_core.llm.backbone import model_dir_hash
    from recranker_core.llm.prompts import TEMPLATE_VERSION
    from recranker_core.stack import s3_config
    from recranker_core.store import S3ArtifactStore
    from recranker_core.tune_ranker.adapter import fetch_adapter

    url = str(tiny_pipeline["database_url"])
    summary = tune_ranker_flow()
    adapters = registry.list_adapters(url)
    assert [a.adapter_id for a in adapters] == [summary["adapter_id"]]
    adapter = adapters[0]
    # The first adapter has no champion to beat: the guard alone decides (its fused ranking
    # against the base order on validation users early stopping did not read).
    fusion = adapter.metrics["fusion"]
    assert fusion["served"] in ("fused", "base") and fusion["n_users"] > 0
    assert fusion["users_hash"] and set(fusion["weights"]) == {
        "base",
        "pointwise",
        "pairwise",
        "listwise",
    }
    assert (adapter.status == "champion") == (fusion["served"] == "fused") == summary["promoted"]
    assert adapter.status in ("champion", "rejected")
    assert adapter.template_version == TEMPLATE_VERSION and adapter.objective == "sft"
    assert adapter.lineage["prompts"]["template"] == TEMPLATE_VERSION
    assert adapter.lineage["training_data"] == "served"
    assert adapter.base_model_id == registry.champion(url).model_id  # type: ignore[union-attr]
    assert adapter.backbone_hash == model_dir_hash(Path(str(tiny_pipeline["tiny"])))
    assert set(adapter.metrics["valid"]) >= {"fused_ndcg@3", "base_ndcg@3", "gain", "se"}
    assert summary["steps"] > 0 and len(summary["history"]) >= 2
    # A run that kept its starting point says so in words (and only then).
    assert (summary["note"] is not None) == (summary["best_step"] == 0)

    cfg = s3_config(s3_settings)
    store = S3ArtifactStore(cfg)
    manifest = store.read_manifest(adapter.lineage["prefix"])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(manifest.files)
    # The pointwise hint's rating model is the champion's (stored by its retrain), named in the
    # lineage, not copied into the adapter.
    assert not [f for f in manifest.files if f.startswith("hint_regressor")]
    assert adapter.lineage["rating_model"]["model_id"] == adapter.base_model_id
    # Nothing in a new adapter needs unpickling, and the registry row lists every file.
    assert not [f for f in manifest.files if f.endswith((".pt", ".bin", ".pkl"))]
    assert adapter.files == {rel: e.sha256 for rel, e in manifest.files.items()}
    assert manifest.meta["backbone_hash"] == adapter.backbone_hash
    assert manifest.meta["sampled_users"] == 24
    dataset_prefix = summary["dataset"].split(f"{cfg.bucket}/", 1)[1]
    lines = (
        cfg.client()
        .get_object(Bucket=cfg.bucket, Key=f"{dataset_prefix}/prompts.jsonl")["Body"]
        .read()
        .decode()
        .splitlines()
    )
    tasks = {json.loads(line)["task"] for line in lines}
    assert tasks == {"pointwise", "pairwise", "listwise"}

    local = fetch_adapter(adapter, store, tmp_path / "cache", adapter.backbone_hash)
    assert (local / "adapter_model.safetensors").exists()
    with pytest.raises(ArtifactIntegrityError, match="backbone"):
        fetch_adapter(adapter, store, tmp_path / "cache2", "0" * 64)
    key = f"{adapter.lineage['prefix']}/adapter_model.safetensors"
    client = cfg.client()
    body = bytearray(client.get_object(Bucket=cfg.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=cfg.bucket, Key=key, Body=bytes(body))
    with pytest.raises(ArtifactIntegrityError, match="adapter_model"):
        fetch_adapter(adapter, store, tmp_path / "cache3", adapter.backbone_hash)

    # A second run over the same data and settings resumes from the finished checkpoint: no
    # new optimizer steps, and its adapter competes with the champion through the gate.
    again = tune_ranker_flow()
    assert again["resumed_from"] == summary["steps"] and again["steps"] == summary["steps"]
    second = registry.get_adapter(url, again["adapter_id"])
    assert second.status in ("champion", "rejected") and second.note


def test_tuning_reuses_the_rating_model_the_retrain_stored_with_the_champion(
    s3_settings: Settings,
    tiny_pipeline: dict[str, object],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    """The retrain flow trains the rating model behind the pointwise hint and stores it with the
    champion (in the manifest and the registry row, digest-checked on load); tuning reuses it
    without a rating-model fit and records it in the adapter's lineage; serving reads that one
    even after another base model became champion. A champion stored without one (an older
    retrain) makes tuning fit its own, say why, and store it with the adapter."""
    import hashlib
    import logging
    import shutil

    from flows.tune_ranker import tune_ranker_flow
    from recranker_core import registry
    from recranker_core.base.candidates import fetch_model
    from recranker_core.batch_rank.serving import load_ranker
    from recranker_core.config import load_settings
    from recranker_core.store.manifest import MANIFEST_NAME
    from tasks.common import store_for

    url = str(tiny_pipeline["database_url"])
    settings = load_settings()
    store = store_for(settings)
    champion = registry.champion(url)
    assert champion is not None
    rating_files = {"rating_model.json", "rating_model.safetensors"}
    assert rating_files <= set(champion.files)
    manifest = store.read_manifest(champion.lineage["prefix"])
    assert {f: manifest.files[f].sha256 for f in rating_files} == {
        f: champion.files[f] for f in rating_files
    }
    rating = champion.lineage["rating_model"]
    assert rating["kind"] == "biasedmf" and 0 < rating["rmse"] < 5
    local = fetch_model(champion, store, tmp_path / "cache")  # every file verified
    weights = (local / "rating_model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == champion.files["rating_model.safetensors"]

    # Tuning reuses it: the line that says so, and no rating-model fit (`train_rating_model`'s
    # line is absent; the served-task data's shadow models are fitted on another split).
    with caplog.at_level(logging.INFO, logger="recranker_core"):
        summary = tune_ranker_flow(max_steps=1)
    said = [r.getMessage() for r in caplog.records]
    assert any(f"reused champion model {champion.model_id}'s" in m for m in said)
    assert not any("rating model (biasedmf) for the pointwise hint" in m for m in said)
    assert not any("stored without a rating model" in m for m in said)
    reused = {
        "source": "base_model",
        "model_id": champion.model_id,
        "file": "rating_model.safetensors",
        "sha256": champion.files["rating_model.safetensors"],
        "rmse": rating["rmse"],
    }
    assert summary["rating_model"] == reused
    tuned = registry.get_adapter(url, int(summary["adapter_id"]))
    assert tuned.lineage["rating_model"] == reused
    assert not [f for f in tuned.files if f.startswith("hint_regressor")]

    # An older champion: the same model stored without a rating model, as retrains before this
    # change stored it. Tuning on it fits one, says why, and the adapter carries it.
    older = tmp_path / "older"
    shutil.copytree(local, older, ignore=shutil.ignore_patterns(MANIFEST_NAME, "rating_model.*"))
    stored = store.put_directory(older, f"{champion.lineage['prefix']}-older")
    older_lineage = {k: v for k, v in champion.lineage.items() if k != "rating_model"}
    older_id = registry.register_model(
        url,
        kind=champion.kind,
        hyperparameters=champion.hyperparameters,
        metrics=champion.metrics,
        data_watermark=champion.data_watermark,
        artifact_uri=stored.uri,
        files={rel: e.sha256 for rel, e in stored.manifest.files.items()},
        lineage={**older_lineage, "prefix": stored.prefix},
    )
    registry.promote(url, older_id, "test: a champion stored before the rating model was")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="recranker_core"):
        again = tune_ranker_flow(max_steps=1)
    said = [r.getMessage() for r in caplog.records]
    assert any(f"champion model {older_id} was stored without a rating model" in m for m in said), (
        said
    )
    assert any("rating model (biasedmf) for the pointwise hint" in m for m in said)
    assert again["rating_model"]["source"] == "tuning"
    carried = registry.get_adapter(url, int(again["adapter_id"]))
    assert {"hint_regressor.json", "hint_regressor.safetensors"} <= set(carried.files)

    # Serving: each adapter with the rating model it was tuned with.
    serve = settings.model_copy(update={"home": tmp_path / "serve"})
    own = load_ranker(url, store, serve, carried)
    assert own is not None and own.rating.source == {"adapter_id": carried.adapter_id}
    first = load_ranker(url, store, serve, tuned)  # its base model is not the champion now
    assert first is not None and first.rating.source == reused
