"""The adapter promotion gate on the served metric: the candidate's guard must serve the fusion,
and against a champion measured on the same users its fused NDCG must be within tolerance; a
champion measured on other users is refused (the caller re-measures it)."""

from __future__ import annotations

import dataclasses

import pytest

from recranker_core.batch_rank.fusion import FusedWeights, GuardDecision
from recranker_core.errors import ConfigError
from recranker_core.registry import adapter_gate


def decision(served: str, fused: float, *, users: str = "a" * 64, n: int = 200) -> GuardDecision:
    return GuardDecision(
        served=served,
        gain=fused - 0.05,
        se=0.004,
        weights=FusedWeights(0.5, 0.0, 0.2, 0.3),
        k=3,
        n_users=n,
        n_hits=90,
        base_ndcg=0.05,
        fused_ndcg=fused,
        users_hash=users,
        reason=f"fused {fused - 0.05:+.4f} (se 0.0040) over the base order: {served}",
    )


def test_a_candidate_whose_guard_serves_base_is_not_promoted():
    gate = adapter_gate(decision("base", 0.052), None, 0.0)
    assert not gate.promote and "does not beat the base order" in gate.reason


def test_the_first_adapter_needs_only_to_beat_the_base_order():
    gate = adapter_gate(decision("fused", 0.07), None, 0.0)
    assert gate.promote and "no champion adapter" in gate.reason


def test_against_the_champion_on_the_same_users():
    champion = decision("fused", 0.070)
    better = adapter_gate(decision("fused", 0.071), champion, 0.0)
    assert better.promote and "0.0710 vs the champion's 0.0700" in better.reason
    within = adapter_gate(decision("fused", 0.069), champion, 0.002)
    assert within.promote and "within tolerance 0.002" in within.reason
    worse = adapter_gate(decision("fused", 0.065), champion, 0.002)
    assert not worse.promote and "below the champion's 0.0700" in worse.reason
    # A champion whose own guard served base still sets the bar with its fused NDCG.
    assert not adapter_gate(decision("fused", 0.060), decision("base", 0.061), 0.0).promote


@pytest.mark.parametrize("change", [{"users_hash": "b" * 64}, {"n_users": 300}, {"k": 10}], ids=str)
def test_a_champion_measured_on_other_users_must_be_re_measured(change):
    champion = dataclasses.replace(decision("fused", 0.06), **change)
    with pytest.raises(ConfigError, match="re-measure the champion"):
        adapter_gate(decision("fused", 0.07), champion, 0.0)
