"""A user the LLM cannot score keeps the base ranking; a group that fails together is scored user
by user so that only such users fall back.

The failure is a CUDA out-of-memory error on a forward pass too long for the GPU: this CPU-only
machine cannot produce one for real, so the tuned model is put behind a length cap that raises
torch.OutOfMemoryError where a GPU with that little memory would. This is the one fake in
the suite; everything else (PostgreSQL, SeaweedFS, the ONNX champion, the tuned adapter, the
scorer) is real."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch


class CappedModel(torch.nn.Module):
    """The tuned model, refusing any forward pass longer than `max_tokens` with the error CUDA
    raises when a batch does not fit (simulated, see the module docstring); records the longest
    pass it was asked for."""

    def __init__(self, inner: Any, max_tokens: int) -> None:
        super().__init__()
        self.inner = inner
        self.max_tokens = max_tokens
        self.refused = 0
        self.longest = 0

    @property
    def config(self) -> Any:
        return self.inner.config

    def forward(self, **kwargs: Any) -> Any:
        tokens = int(kwargs["input_ids"].shape[1])
        self.longest = max(self.longest, tokens)
        if tokens > self.max_tokens:
            self.refused += 1
            raise torch.OutOfMemoryError(
                f"CUDA out of memory (simulated: a pass of {tokens} > {self.max_tokens} tokens)"
            )
        return self.inner(**kwargs)


def test_unscorable_users_fall_back_and_failed_groups_are_split(
    tiny_pipeline: dict[str, object], tune_promoted, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recranker_core.base.candidates import active_users, data_watermark, load_champion
    from recranker_core.batch_rank.rank import rank_shard
    from recranker_core.batch_rank.serving import cache_root, load_ranker
    from recranker_core.config import load_settings
    from recranker_core.llm.prompts import Catalog
    from tasks.common import store_for

    url = str(tiny_pipeline["database_url"])
    tune_promoted(max_steps=1)
    monkeypatch.setenv("RECRANKER_RANK__USERS_PER_BATCH", "4")
    # Mode hybrid re-ranks with the LLM whatever the adapter's guard decided (`fused` could
    # serve the base order and never call the model).
    monkeypatch.setenv("RECRANKER_RANK__MODE", "hybrid")
    settings = load_settings()
    store = store_for(settings)
    champion = load_champion(url, store, cache_root(settings))
    ranker = load_ranker(url, store, settings)
    assert ranker is not None
    catalog = Catalog.from_database(url, champion.item_ids)
    watermark = data_watermark(url)
    users = active_users(url, watermark, None)[:8]

    def run(model: Any, who: list[str]) -> Any:
        capped = dataclasses.replace(ranker, model=model)
        return rank_shard(url, champion, capped, catalog, who, watermark, settings)

    reference = run(ranker.model, users)
    assert (reference.llm_users, reference.llm_failures, reference.llm_retries) == (8, 0, 0)
    expected = {(r.user_id, r.rank): (r.item_id, r.score) for r in reference.rows}

    # Each user's longest forward pass; a cap just below the longest makes that user's prompts
    # "not fit" while every other user's do.
    longest = {}
    for user in users:
        probe = CappedModel(ranker.model, max_tokens=10**9)
        run(probe, [user])
        longest[user] = probe.longest
    cap = max(longest.values()) - 1
    too_long = {u for u, n in longest.items() if n > cap}
    assert 1 <= len(too_long) < len(users)
    groups_hit = len({users.index(u) // 4 for u in too_long})

    capped = CappedModel(ranker.model, max_tokens=cap)
    result = run(capped, users)
    assert result.llm_failures == len(too_long)
    assert result.llm_retries == groups_hit  # each failed group was split, user by user
    assert result.llm_users == len(users) - len(too_long)
    for r in result.rows:
        if r.user_id in too_long:  # the champion's own list, marked as such
            assert (r.source, r.rank) == ("base", r.base_rank)
        else:  # re-ranked by the LLM exactly as without the failure
            item, score = expected[(r.user_id, r.rank)]
            assert (r.source, r.item_id) == ("llm", item)
            assert r.score == pytest.approx(score, abs=1e-4)
    assert {r.user_id for r in result.rows} == set(users)
    assert len(result.rows) == len(reference.rows)

    # Nothing fits: every user keeps the champion's ranking.
    refused = run(CappedModel(ranker.model, max_tokens=0), users)
    assert (refused.llm_users, refused.base_users, refused.llm_failures) == (0, 8, 8)
    assert refused.llm_retries == 2
    assert {r.source for r in refused.rows} == {"base"}
    assert all(r.rank == r.base_rank for r in refused.rows)


def test_candidate_chunks_inside_a_shard_change_nothing(
    tiny_pipeline: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard scores its users' candidates RECRANKER_RANK__CHUNK_SIZE at a time (memory is
    bounded by the chunk, not the shard): any chunk size gives the same rows."""
    from recranker_core.base.candidates import active_users, data_watermark, load_champion
    from recranker_core.batch_rank.rank import rank_shard
    from recranker_core.batch_rank.serving import cache_root
    from recranker_core.config import load_settings
    from tasks.common import store_for

    url = str(tiny_pipeline["database_url"])
    settings = load_settings()
    champion = load_champion(url, store_for(settings), cache_root(settings))
    watermark = data_watermark(url)
    users = active_users(url, watermark, None)
    rows = {}
    for chunk in (7, 10_000):
        monkeypatch.setenv("RECRANKER_RANK__CHUNK_SIZE", str(chunk))
        result = rank_shard(url, champion, None, None, users, watermark, load_settings())
        rows[chunk] = [(r.user_id, r.rank, r.item_id, r.base_rank, r.source) for r in result.rows]
    assert len(users) > 7 * 3 and len(rows[7]) == len(users) * 10
    assert rows[7] == rows[10_000]
