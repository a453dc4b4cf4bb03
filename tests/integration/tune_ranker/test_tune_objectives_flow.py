"""The tune-ranker flow with each objective on a tiny random Llama (real PostgreSQL, SeaweedFS and
Prefect API): DMPO refuses to start without an SFT adapter, then SFT, ALRO and DMPO each register
an adapter under their objective, and DMPO's lineage names the SFT adapter it started from."""

from __future__ import annotations

import pytest

from recranker_core.config import Settings


def test_sft_then_alro_and_dmpo_through_the_flow(
    s3_settings: Settings, tiny_pipeline: dict[str, object], tune_promoted
) -> None:
    from pydantic import ValidationError

    from flows.params import TuneRankerParams
    from flows.tune_ranker import tune_ranker_flow
    from recranker_core import registry
    from recranker_core.errors import ConfigError
    from recranker_core.stack import s3_config
    from recranker_core.store import S3ArtifactStore

    url = str(tiny_pipeline["database_url"])
    with pytest.raises(ValidationError):
        TuneRankerParams(objective="ranknet")
    with pytest.raises(ConfigError, match="recranker tune --objective sft"):
        tune_ranker_flow(objective="dmpo", max_steps=2)
    assert registry.list_adapters(url) == []

    runs = {name: tune_promoted(objective=name, max_steps=2) for name in ("sft", "alro", "dmpo")}
    store = S3ArtifactStore(s3_config(s3_settings))
    adapters = {a.objective: a for a in registry.list_adapters(url)}
    assert set(adapters) == {"sft", "alro", "dmpo"}
    for name, summary in runs.items():
        adapter = adapters[name]
        assert adapter.adapter_id == summary["adapter_id"] and summary["steps"] == 2
        assert adapter.lineage["prefix"].startswith(f"adapters/{name}/")
        meta = store.read_manifest(adapter.lineage["prefix"]).meta
        assert meta["objective"] == name
        assert meta["hyperparameters"]["objective"] == name
        assert "fused_ndcg@3" in adapter.metrics["valid"]

    sft, dmpo = adapters["sft"], adapters["dmpo"]
    assert dmpo.lineage["init_adapter_id"] == sft.adapter_id
    assert dmpo.lineage["init_adapter_uri"] == sft.artifact_uri
    assert "init_adapter_id" not in adapters["alro"].lineage
    # DMPO's first validation is its starting point: the SFT adapter's own best score.
    assert runs["dmpo"]["history"][0]["fused_ndcg@3"] == pytest.approx(
        sft.metrics["valid"]["fused_ndcg@3"], abs=1e-6
    )
