"""An adapter scores with the prompt template it was tuned with: one tuned with `rr-1` keeps its
wording after RECRANKER_PROMPTS__TEMPLATE moves on to `rr-3` (the default), and DMPO only starts
from an SFT adapter of the configured template. Real PostgreSQL, SeaweedFS, Prefect API, ONNX
champion and a tiny tuned Llama."""

from __future__ import annotations

import dataclasses
import logging

import pytest


def test_an_adapter_keeps_its_prompt_template(
    tiny_pipeline: dict[str, object],
    tune_promoted,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from recranker_core import registry
    from recranker_core.base.candidates import active_users, data_watermark, load_champion
    from recranker_core.batch_rank.rank import rank_shard
    from recranker_core.batch_rank.serving import cache_root, load_ranker
    from recranker_core.config import load_settings
    from recranker_core.errors import ConfigError
    from recranker_core.llm.prompts import Catalog
    from recranker_core.tune_ranker.adapter import sft_start_adapter
    from tasks.common import store_for

    url = str(tiny_pipeline["database_url"])
    monkeypatch.setenv("RECRANKER_PROMPTS__TEMPLATE", "rr-1")
    summary = tune_promoted(max_steps=1)
    adapter = registry.get_adapter(url, summary["adapter_id"])
    assert adapter.template_version == "rr-1"
    assert sft_start_adapter(url, "rr-1").adapter_id == adapter.adapter_id
    with pytest.raises(ConfigError, match="no SFT adapter for prompt template rr-2"):
        sft_start_adapter(url, "rr-2")

    monkeypatch.delenv("RECRANKER_PROMPTS__TEMPLATE")
    monkeypatch.setenv("RECRANKER_RANK__MODE", "hybrid")  # the LLM scores whatever the guard says
    settings = load_settings()
    assert settings.prompts.template == "rr-3"
    store = store_for(settings)
    champion = load_champion(url, store, cache_root(settings))
    with caplog.at_level(logging.INFO, logger="recranker_core.batch_rank.serving"):
        ranker = load_ranker(url, store, settings)
    assert "tuned with prompt template rr-1" in caplog.text
    assert ranker is not None and ranker.adapter.adapter_id == adapter.adapter_id
    catalog = Catalog.from_database(url, champion.item_ids)
    watermark = data_watermark(url)
    users = active_users(url, watermark, None)[:6]

    def scores(ranker: object, settings: object) -> dict[tuple[str, int], tuple[str, float]]:
        result = rank_shard(url, champion, ranker, catalog, users, watermark, settings)
        assert result.llm_users == len(users)
        return {(r.user_id, r.rank): (r.item_id, r.score) for r in result.rows}

    served = scores(ranker, settings)
    # The rr-1 wording scored them: the same as with the setting at rr-1, not as rr-2 would.
    as_configured = load_settings()
    as_configured.prompts.template = "rr-1"
    assert served == scores(ranker, as_configured)
    relabelled = dataclasses.replace(
        ranker, adapter=dataclasses.replace(adapter, template_version="rr-2")
    )
    other = scores(relabelled, settings)
    assert {k: v[1] for k, v in other.items()} != {k: v[1] for k, v in served.items()}
