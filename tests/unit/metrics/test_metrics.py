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


def test_paired_bootstrap_identical_pair_is_zero():
    from recranker_core.metrics import paired_bootstrap

    a = np.array([0.0, 1.0, 0.5, 0.0, 0.63])
    out = paired_bootstrap(a, a.copy())
    assert (out["diff"], out["lo"], out["hi"], out["se"], out["n"]) == (0.0, 0.0, 0.0, 0.0, 5)


def test_paired_bootstrap_constant_shift_is_the_shift():
    from recranker_core.metrics import paired_bootstrap

    rng = np.random.default_rng(1)
    b = rng.random(50)
    out = paired_bootstrap(b + 0.25, b, n_boot=200)
    # Every user gains 0.25: every resample's mean is 0.25, the interval collapses onto it.
    assert out["diff"] == pytest.approx(0.25)
    assert out["lo"] == pytest.approx(0.25) and out["hi"] == pytest.approx(0.25)
    assert out["se"] == pytest.approx(0.0, abs=1e-12)


def test_paired_bootstrap_by_hand_and_input_checks():
    from recranker_core.metrics import paired_bootstrap

    # Differences [1, 0]: the resampled mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4,
    # so the standard error is sqrt(1/8) = 0.354 and the 95% interval [0, 1].
    out = paired_bootstrap([1.0, 0.0], [0.0, 0.0], n_boot=20000)
    assert out["diff"] == 0.5 and (out["lo"], out["hi"]) == (0.0, 1.0)
    assert out["se"] == pytest.approx(math.sqrt(1 / 8), rel=0.03)
    assert paired_bootstrap([], [])["n"] == 0
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap([1.0, 2.0], [1.0])


def test_paired_bootstrap_intervals_cover_the_true_difference():
    from recranker_core.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    covered, widths = 0, []
    for rep in range(200):
        base = rng.random(150)
        other = base + 0.05 + rng.normal(0, 0.3, 150)  # true mean difference 0.05
        out = paired_bootstrap(other, base, n_boot=400, seed=rep)
        covered += out["lo"] <= 0.05 <= out["hi"]
        widths.append(out["hi"] - out["lo"])
    assert 0.89 <= covered / 200 <= 0.99
    # Width about 2 * 1.96 * 0.3 / sqrt(150) = 0.096.
    assert np.mean(widths) == pytest.approx(0.096, rel=0.1)


def test_the_module_examples_hold():
    import doctest

    import recranker_core.metrics as metrics

    assert doctest.testmod(metrics).failed == 0
