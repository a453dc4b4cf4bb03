"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recranker_core.metrics import coverage, hit_rate, mean_popularity, ndcg, rank_metrics


def test_hit_rate_counts_top_k_only():
    ranks = np.array([0, 1, 2, 3, -1])
    assert hit_rate(ranks, 1) == pytest.approx(1 / 5)
    assert hit_rate(ranks, 3) == pytest.approx(3 / 5)
    assert hit_rate(ranks, 10) == pytest.approx(4 / 5)  # -1 (not in the list) is always a miss


def test_ndcg_by_hand():
    ranks = np.array([0, 1, 4, -1])
    # rank 0 -> 1, rank 1 -> 1/log2(3), rank 4 -> 1/log2(6) (only for k > 4), -1 -> 0
    assert ndcg(ranks, 3) == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert ndcg(ranks, 5) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)


def test_rank_metrics_keys_and_empty_input():
    assert list(rank_metrics([0], (3, 10))) == ["hr@3", "ndcg@3", "hr@10", "ndcg@10"]
    assert rank_metrics([], (3,)) == {"hr@3": 0.0, "ndcg@3": 0.0}


def test_perfect_and_worst_ranking():
    assert rank_metrics(np.zeros(7, dtype=int))["ndcg@10"] == 1.0
    assert rank_metrics(np.full(7, -1))["hr@10"] == 0.0


def test_coverage_and_popularity():
    lists = np.array([[0, 1, -1], [1, 2, -1]])
    assert coverage(lists, 4) == pytest.approx(0.75)
    assert mean_popularity(lists, np.array([4, 2, 6, 100])) == pytest.approx((4 + 2 + 2 + 6) / 4)
