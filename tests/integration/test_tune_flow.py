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
    from recranker_core.ranker.backbone import model_dir_hash
    from recranker_core.ranker.prompts import TEMPLATE_VERSION
    from recranker_core.ranker.tuning import fetch_adapter
    from recranker_core.stack import s3_config
    from recranker_core.store import S3ArtifactStore

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
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "hint_regressor.json",
        "hint_regressor.safetensors",
    } <= set(manifest.files)
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
