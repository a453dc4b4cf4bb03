"""Adaptive user sampling: each stage's distribution against its formula (large seeded draws,
bounds of a few standard errors), k-means on separable data, and sample_users' contract."""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt
import pytest

from recranker_core.config import SamplingSettings
from recranker_core.errors import ConfigError, DataError
from recranker_core.tune_ranker.sampling import (
    allocate_draws,
    cluster_draws,
    importance_draws,
    kmeans,
    penalty_draws,
    penalty_weights,
    sample_users,
)

BIG = 200_000


def assert_frequencies(
    drawn: npt.NDArray[np.integer], expected: npt.NDArray[np.float64], sigmas: float = 5.0
) -> None:
    """Empirical frequency of each value 0..len(expected)-1 within `sigmas` standard errors."""
    freq = np.bincount(drawn, minlength=expected.size)[: expected.size] / drawn.size
    se = np.sqrt(expected * (1 - expected) / drawn.size)
    assert np.all(np.abs(freq - expected) <= sigmas * se + 1e-12), (freq, expected)


def blobs(
    sizes: list[int], centres: list[list[float]], seed: int = 0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    x = np.concatenate(
        [rng.normal(c, 0.1, size=(s, len(c))) for s, c in zip(sizes, centres, strict=True)]
    )
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return x, truth


def settings(**kw: object) -> SamplingSettings:
    return SamplingSettings.model_validate(kw)


# --- importance stage ---------------------------------------------------------------------------


def test_importance_draws_follow_log_of_like_counts():
    counts = np.array([2, 3, 10, 100, 1000])
    drawn = importance_draws(counts, BIG, np.random.default_rng(1))
    assert drawn.dtype == np.int64 and drawn.size == BIG
    expected = np.log(counts) / np.log(counts).sum()
    assert_frequencies(drawn, expected)
    # ln, not the raw count: the 1000-like user would take 90% of raw-count draws, 44% here.
    assert np.mean(drawn == 4) < 0.5


def test_importance_draws_give_a_single_like_no_weight():
    drawn = importance_draws(np.array([1, 5, 1]), 10_000, np.random.default_rng(0))
    assert set(drawn.tolist()) == {1}


def test_importance_draws_refuse_unweighable_counts():
    with pytest.raises(DataError, match="no user with more than 1"):
        importance_draws(np.array([1, 1]), 5, np.random.default_rng(0))
    with pytest.raises(DataError, match="at least 1 train like"):
        importance_draws(np.array([0, 4]), 5, np.random.default_rng(0))


# --- cluster stage ------------------------------------------------------------------------------


def test_allocate_draws_by_largest_remainder():
    # quotas 10*[1,2,3,4]/10 are whole: no rounding at all
    assert allocate_draws(np.array([1, 2, 3, 4]), 10).tolist() == [1, 2, 3, 4]
    # quotas 3.33.. each: the one left over goes to the first (tie -> lower index)
    assert allocate_draws(np.array([5, 5, 5]), 10).tolist() == [4, 3, 3]
    # quotas 7*[1,2,4]/7 = [1,2,4]; 8*[1,2,4]/7 = [1.14, 2.29, 4.57]: the remainder goes to 4.57
    assert allocate_draws(np.array([1, 2, 4]), 8).tolist() == [1, 2, 5]
    assert allocate_draws(np.array([3, 0, 7]), 0).tolist() == [0, 0, 0]
    assert allocate_draws(np.array([3, 0, 7]), 5).tolist() == [2, 0, 3]  # 1.5, 0, 3.5 -> tie


@pytest.mark.parametrize("total", [1, 7, 599, 3000, 10_001])
def test_allocate_draws_sums_exactly_and_stays_within_one_of_the_quota(total: int):
    sizes = np.array([1, 13, 250, 7, 999, 42, 3])
    alloc = allocate_draws(sizes, total)
    assert int(alloc.sum()) == total
    quota = total * sizes / sizes.sum()
    assert np.all(np.abs(alloc - quota) < 1.0)


def test_cluster_draws_are_proportional_to_size_and_uniform_within():
    labels = np.repeat([0, 1, 2], [10, 30, 60])
    positions, alloc = cluster_draws(labels, BIG, np.random.default_rng(3))
    assert alloc.tolist() == [20_000, 60_000, 120_000]
    assert positions.size == BIG
    per_cluster = np.bincount(labels[positions], minlength=3)
    assert per_cluster.tolist() == alloc.tolist()  # exact, not just in expectation
    # within cluster 2 (positions 40..99), each member ~ 1/60 of its draws
    inside = positions[labels[positions] == 2] - 40
    assert_frequencies(inside, np.full(60, 1 / 60))


def test_kmeans_recovers_well_separated_blobs():
    x, truth = blobs([50, 80, 30], [[0, 0], [10, 0], [0, 10]])
    labels, centroids = kmeans(x, 3, iterations=50, seed=0)
    assert centroids.shape == (3, 2)
    # each true blob maps to one label, and the three labels differ
    mapping = {int(t): set(labels[truth == t].tolist()) for t in range(3)}
    assert all(len(m) == 1 for m in mapping.values())
    assert len(set().union(*mapping.values())) == 3
    for t, centre in enumerate([[0, 0], [10, 0], [0, 10]]):
        (label,) = mapping[t]
        assert np.allclose(centroids[label], centre, atol=0.1)


def test_kmeans_is_deterministic_and_clamps_k():
    x, _ = blobs([40, 40, 40, 40], [[0, 0], [5, 5], [5, 0], [0, 5]], seed=7)
    a = kmeans(x, 4, iterations=20, seed=11)
    b = kmeans(x, 4, iterations=20, seed=11)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # two distinct points, repeated: k=5 is clamped to 2, one cluster each
    dup = np.array([[1.0, 1.0]] * 6 + [[-1.0, 2.0]] * 4)
    labels, centroids = kmeans(dup, 5, iterations=10, seed=0)
    assert centroids.shape == (2, 2)
    assert sorted(np.bincount(labels).tolist()) == [4, 6]


def test_kmeans_refuses_bad_input():
    with pytest.raises(DataError, match="NaN"):
        kmeans(np.array([[0.0, np.nan], [1.0, 1.0]]), 2, iterations=5, seed=0)
    with pytest.raises(DataError, match="non-empty 2-D"):
        kmeans(np.zeros((0, 3)), 2, iterations=5, seed=0)
    with pytest.raises(ConfigError, match="k >= 1"):
        kmeans(np.ones((3, 2)), 0, iterations=5, seed=0)


# --- penalty stage ------------------------------------------------------------------------------


def test_penalty_weights_give_a_user_seen_c_times_c_times_penalty_power():
    pool = np.array([7, 3, 7, 9, 7, 3, 7])  # user 7 x4, user 3 x2, user 9 x1
    w = penalty_weights(pool, 0.95)
    assert w.tolist() == pytest.approx([0.95**3, 0.95, 0.95**3, 1.0, 0.95**3, 0.95, 0.95**3])
    for user, c in [(7, 4), (3, 2), (9, 1)]:
        assert w[pool == user].sum() == pytest.approx(c * 0.95 ** (c - 1))
    assert penalty_weights(pool, 1.0).tolist() == [1.0] * 7


def test_penalty_draws_match_the_per_user_weight():
    rng = np.random.default_rng(5)
    mult = {0: 1, 1: 5, 2: 20, 3: 60}
    pool = rng.permutation(np.repeat(list(mult), list(mult.values())))
    drawn = penalty_draws(pool, BIG, 0.95, np.random.default_rng(6))
    total = np.array([c * 0.95 ** (c - 1) for c in mult.values()])
    assert_frequencies(drawn, total / total.sum())
    # the penalty bites: user 3 is 60x as common in the pool, under 60*0.95^59 ~ 2.9x the weight
    assert np.mean(drawn == 3) < 3.5 * np.mean(drawn == 0)


def test_penalty_reverses_past_its_peak():
    # c * 0.95^(c-1) peaks near c = 1/ln(1/0.95) ~ 19.5: a user drawn 200 times into the pool
    # ends up rarer than one drawn 20 times. This is the method's formula, kept as written.
    pool = np.repeat([0, 1], [20, 200])
    drawn = penalty_draws(pool, 20_000, 0.95, np.random.default_rng(0))
    assert np.mean(drawn == 1) < 0.01


# --- sample_users -------------------------------------------------------------------------------


def test_adaptive_counts_are_consistent():
    x, _ = blobs([120, 60, 20], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    likes = np.random.default_rng(2).integers(2, 60, size=200)
    s = settings(users=1000, clusters=3, seed=4)
    result = sample_users(likes, x, s)
    assert result.method == "adaptive"
    assert result.users.dtype == np.int64 and result.users.size == 1000
    c = result.counts
    assert c["eligible"] == 200
    assert c["importance"] == 600 and c["cluster"] == 600 and c["pool"] == 1200
    assert c["final"] == 1000
    assert c["final_distinct"] == np.unique(result.users).size <= c["pool_distinct"] <= 200
    assert c["clusters"] == c["clusters_requested"] == 3
    assert sorted(result.cluster_sizes) == [20, 60, 120]
    assert sum(result.cluster_sizes) == c["eligible"]


def test_same_seed_same_sample_other_seed_other_sample():
    x, _ = blobs([50, 50], [[1, 0], [0, 1]])
    likes = np.arange(100) % 40 + 2
    a = sample_users(likes, x, settings(users=500, clusters=2, seed=9))
    b = sample_users(likes, x, settings(users=500, clusters=2, seed=9))
    other = sample_users(likes, x, settings(users=500, clusters=2, seed=10))
    assert np.array_equal(a.users, b.users) and a.counts == b.counts
    assert not np.array_equal(a.users, other.users)


def test_only_eligible_users_are_drawn():
    likes = np.array([0, 1, 2, 5, 9, 30, 1, 4])
    mask = np.array([True, True, True, True, False, True, True, True])
    x = np.random.default_rng(0).normal(size=(8, 4))
    for method in ("adaptive", "uniform"):
        # penalty 1: at ~600 pool entries per user the 0.95 penalty would starve all but
        # the least drawn users (see test_penalty_reverses_past_its_peak)
        s = settings(users=2000, clusters=2, method=method, penalty=1.0)
        result = sample_users(likes, x, s, eligible=mask)
        assert set(result.users.tolist()) == {2, 3, 5, 7}  # >= 2 likes and in the mask
        assert result.counts["eligible"] == 4


def test_adaptive_without_cluster_stage_and_penalty_follows_ln_counts():
    # With the cluster share at 0 and no penalty the final draw is uniform over the importance
    # pool, so its frequencies follow ln(count) end to end.
    likes = np.array([2, 4, 50, 1, 400])
    s = settings(users=BIG, cluster_ratio=0.0, penalty=1.0, seed=1)
    result = sample_users(likes, None, s)
    assert result.counts["cluster"] == 0 and result.counts["clusters"] == 0
    w = np.where(likes >= 2, np.log(np.maximum(likes, 1)), 0.0)
    assert_frequencies(result.users, w / w.sum())


def test_cluster_stage_follows_direction_not_norm():
    # Two taste directions, each with norms from 0.1 to 100 (as BPR norms track activity): the
    # clusters must split by direction, and with importance off and no penalty the final draw
    # gives each cluster its share of users (3:1).
    norms = np.geomspace(0.1, 100, 300)
    a = norms[:, None] * np.array([[1.0, 0.2]])
    b = np.geomspace(0.1, 100, 100)[:, None] * np.array([[0.2, 1.0]])
    x = np.concatenate([a, b])
    likes = np.full(400, 5)
    s = settings(users=BIG, importance_ratio=0.0, penalty=1.0, clusters=2, seed=2)
    result = sample_users(likes, x, s)
    assert sorted(result.cluster_sizes) == [100, 300]
    share_a = np.mean(result.users < 300)
    assert abs(share_a - 0.75) < 5 * np.sqrt(0.75 * 0.25 / BIG)


def test_without_embeddings_the_cluster_stage_is_one_uniform_cluster(
    caplog: pytest.LogCaptureFixture,
):
    likes = np.array([3] * 40)
    s = settings(users=BIG, importance_ratio=0.0, penalty=1.0, clusters=10)
    with caplog.at_level(logging.WARNING, logger="recranker_core.tune_ranker.sampling"):
        result = sample_users(likes, None, s)
    assert result.counts["clusters"] == 1 and result.counts["clusters_requested"] == 10
    assert result.cluster_sizes == [40]
    assert "no user embeddings" in caplog.text
    assert_frequencies(result.users, np.full(40, 1 / 40))


def test_uniform_ablation():
    likes = np.array([2, 500, 3, 1, 2, 1000])  # user 3 ineligible; skew would show if weighted
    result = sample_users(likes, None, settings(users=BIG, method="uniform", seed=3))
    assert result.method == "uniform" and result.cluster_sizes == []
    assert result.counts["importance"] == 0 and result.counts["pool"] == 0
    assert result.counts["final"] == BIG and result.counts["eligible"] == 5
    expected = np.array([0.2, 0.2, 0.2, 0.0, 0.2, 0.2])
    assert_frequencies(result.users, expected)


def test_the_run_log_gets_one_line_with_the_counts(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="recranker_core.tune_ranker.sampling"):
        sample_users(np.array([2, 3, 4]), None, settings(users=10, method="uniform"))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 1
    assert "eligible=3" in lines[0] and "final=10" in lines[0]


def test_errors_say_what_was_wrong():
    with pytest.raises(DataError, match="no user is eligible"):
        sample_users(np.array([0, 1, 1]), None, settings(users=10))
    with pytest.raises(DataError, match="eligible mask"):
        sample_users(np.array([5, 5]), None, settings(), eligible=np.array([False, False]))
    with pytest.raises(ConfigError, match="sampling.method"):
        sample_users(np.array([5, 5]), None, settings(method="stratified"))
    with pytest.raises(DataError, match="shape"):
        sample_users(np.array([5, 5]), None, settings(), eligible=np.array([True]))
    with pytest.raises(DataError, match="embeddings have shape"):
        sample_users(np.array([5, 5]), np.ones((3, 4)), settings(users=10))
    with pytest.raises(ConfigError, match="draw no user"):
        sample_users(
            np.array([5, 5]), None, settings(users=10, importance_ratio=0, cluster_ratio=0)
        )
