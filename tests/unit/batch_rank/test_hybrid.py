"""Hybrid ranking math: normalisation, weighted utilities, ties by base rank, single-task modes,
the weight grid and the validation-only weight choice."""

from __future__ import annotations

import numpy as np
import pytest

from recranker_core.batch_rank.hybrid import (
    Weights,
    choose_weights,
    normalise,
    order_for_mode,
    rerank,
    target_rank,
    utilities,
    weight_grid,
)
from recranker_core.errors import ConfigError


def test_normalise_is_a_z_score_and_constant_or_missing_gives_zeros():
    np.testing.assert_allclose(normalise([1.0, 2.0, 3.0]), [-1.2247449, 0.0, 1.2247449], rtol=1e-6)
    assert np.all(normalise([2.0, 2.0, 2.0]) == 0)
    assert np.all(normalise([np.nan, 1.0, np.nan]) == 0)
    out = normalise([np.nan, 1.0, 3.0])
    assert out[0] == 0 and out[1] == -1 and out[2] == 1


def test_utilities_weigh_each_task_after_normalising():
    point, pair, listw = [1.0, 5.0, 3.0], [0.0, 0.0, 0.0], [-0.1, -5.0, -2.0]
    # Listwise prefers candidate 0 strongly, pointwise candidate 1; on a common scale the
    # raw magnitudes (5 vs 0.1) do not decide.
    only_list = utilities(point, pair, listw, Weights(0, 0, 1))
    assert rerank(only_list).tolist() == [0, 2, 1]
    only_point = utilities(point, pair, listw, Weights(1, 0, 0))
    assert rerank(only_point).tolist() == [1, 2, 0]
    both = utilities(point, pair, listw, Weights(0.5, 0, 0.5))
    np.testing.assert_allclose(both, 0.5 * normalise(point) + 0.5 * normalise(listw))


def test_ties_are_broken_by_base_rank():
    assert rerank([0.0, 1.0, 1.0, 0.0]).tolist() == [1, 2, 0, 3]
    assert order_for_mode("hybrid", [3, 3, 3], [0, 0, 0], [1, 1, 1], Weights()).tolist() == [
        0,
        1,
        2,
    ]


def test_modes():
    point, pair, listw = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [2.0, 3.0, 1.0]
    assert order_for_mode("base", point, pair, listw, Weights()).tolist() == [0, 1, 2]
    assert order_for_mode("pointwise", point, pair, listw, Weights()).tolist() == [2, 1, 0]
    assert order_for_mode("pairwise", point, pair, listw, Weights()).tolist() == [0, 1, 2]
    assert order_for_mode("listwise", point, pair, listw, Weights()).tolist() == [1, 0, 2]
    with pytest.raises(ConfigError, match="ranking mode"):
        order_for_mode("magic", point, pair, listw, Weights())


def test_weight_grid_covers_the_simplex():
    grid = weight_grid(0.25)
    assert len(grid) == 15  # C(4 + 2, 2)
    for w in grid:
        assert min(w.as_dict().values()) >= 0
        assert sum(w.as_dict().values()) == pytest.approx(1.0)
    with pytest.raises(ConfigError):
        weight_grid(0.3)


def test_target_rank_and_misses():
    order = np.array([2, 0, 1])
    assert target_rank(order, 0, 99) == 1
    assert target_rank(order, -1, 99) == 99


def test_choose_weights_finds_the_informative_task():
    rng = np.random.default_rng(0)
    scored = []
    for _ in range(40):
        target = int(rng.integers(10))
        informative = rng.normal(size=10)
        informative[target] += 5.0  # listwise knows the answer
        scored.append((rng.normal(size=10), rng.normal(size=10), informative, target))
    weights, score = choose_weights(scored, n_users_total=100, step=0.5)
    assert weights.listwise == 1.0
    # 40 of 100 users found at rank 0, the rest misses.
    assert score == pytest.approx(0.4)


def test_choose_weights_prefers_equal_weights_when_flat():
    scored = [(np.zeros(3), np.zeros(3), np.zeros(3), 0)]
    weights, _ = choose_weights(scored, n_users_total=1, step=0.5)
    # With a flat objective the tie goes to the triple closest to (1/3, 1/3, 1/3).
    assert sorted(weights.as_dict().values()) == [0.0, 0.5, 0.5]
