"""Fused ranking math against values computed by hand, the grid search's choice and ties, and
the cross-fitted guard: a ranker whose scores are noise gets the base order, one whose listwise
scores carry the held-out item gets the fusion."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recranker_core.batch_rank.fusion import (
    BASE_ONLY,
    FusedWeights,
    GuardDecision,
    ScoredUser,
    choose_fused_weights,
    cross_fit_guard,
    fused_grid,
    fused_order,
    fused_utilities,
    per_user_ndcg,
    users_hash,
)
from recranker_core.errors import ConfigError, DataError


def user(n, base, point, pair, listw, position):
    return ScoredUser(n, np.array(base), np.array(point), np.array(pair), np.array(listw), position)


def test_fused_utilities_by_hand():
    base, point = [3.0, 2.0, 1.0], [1.0, 1.0, 4.0]
    # z(base) = [1.2247, 0, -1.2247]; z(point): mean 2, std sqrt(2) -> [-0.7071, -0.7071, 1.4142]
    got = fused_utilities(
        base, point, [0.0, 0.0, 0.0], [5.0, 5.0, 5.0], FusedWeights(0.5, 0.5, 0, 0)
    )
    np.testing.assert_allclose(got, [0.2588190, -0.3535534, 0.0947343], rtol=1e-6)
    assert fused_order(
        base, point, [0, 0, 0], [5, 5, 5], FusedWeights(0.5, 0.5, 0, 0)
    ).tolist() == [
        0,
        2,
        1,
    ]
    # A constant or missing task adds nothing, whatever its weight.
    np.testing.assert_array_equal(
        fused_utilities(base, [np.nan] * 3, [2.0] * 3, [7.0] * 3, FusedWeights(0, 1, 1, 1)),
        [0.0, 0.0, 0.0],
    )
    with pytest.raises(DataError, match="one value per candidate"):
        fused_utilities(base, [1.0, 2.0], [0.0] * 3, [0.0] * 3, BASE_ONLY)


def test_base_only_keeps_the_base_order_ties_included():
    base = [3.0, 2.0, 2.0, 1.0]  # a tie between positions 1 and 2 keeps the base rank
    noise = [9.0, -1.0, 4.0, 0.5]
    assert fused_order(base, noise, noise, noise, BASE_ONLY).tolist() == [0, 1, 2, 3]
    # All weights on a constant task: every utility ties, the base rank decides.
    assert fused_order(base, [1.0] * 4, noise, noise, FusedWeights(0, 1, 0, 0)).tolist() == [
        0,
        1,
        2,
        3,
    ]


def test_per_user_ndcg_by_hand():
    users = [
        user(1, [3.0, 2.0, 1.0], [1.0, 1.0, 4.0], [0.0] * 3, [0.0] * 3, 2),
        user(2, [3.0, 2.0, 1.0], [0.0] * 3, [0.0] * 3, [0.0] * 3, -1),  # a miss
        user(3, [3.0, 2.0, 1.0], [0.0] * 3, [0.0] * 3, [0.0] * 3, 0),
    ]
    # Base order: ranks 2, miss, 0 -> 1/log2(4) = 0.5, 0, 1.
    np.testing.assert_allclose(per_user_ndcg(users, None, 3), [0.5, 0.0, 1.0])
    # Fused (0.5, 0.5, 0, 0): user 1's order is [0, 2, 1] (above) -> rank 1 -> 1/log2(3).
    w = FusedWeights(0.5, 0.5, 0, 0)
    np.testing.assert_allclose(per_user_ndcg(users, w, 3), [1 / math.log2(3), 0.0, 1.0])
    np.testing.assert_allclose(per_user_ndcg(users, w, 1), [0.0, 0.0, 1.0])


def test_grid_search_agrees_with_the_order_of_each_user():
    """The vectorised search scores each weight as fused_order would, ties included."""
    rng = np.random.default_rng(4)
    users = []
    for n in range(60):
        size = int(rng.integers(3, 8))  # users with fewer candidates too
        base = np.sort(rng.integers(0, 4, size).astype(float))[::-1]  # with ties
        users.append(
            ScoredUser(
                n,
                base,
                rng.integers(0, 3, size).astype(float),
                rng.integers(-1, 2, size).astype(float),
                rng.integers(0, 2, size).astype(float),
                int(rng.integers(-1, size)),
            )
        )
    for w in fused_grid(0.25):
        expected = []
        for u in users:
            if u.position < 0:
                expected.append(0.0)
                continue
            order = fused_order(u.base_scores, u.pointwise, u.pairwise, u.listwise, w).tolist()
            rank = order.index(u.position)
            expected.append(1 / math.log2(rank + 2) if rank < 3 else 0.0)
        np.testing.assert_allclose(per_user_ndcg(users, w, 3), expected, err_msg=str(w))


def test_grid_covers_the_four_simplex():
    grid = fused_grid(0.5)
    assert len(grid) == 10  # C(2 + 3, 3)
    assert all(sum(w.as_list()) == pytest.approx(1.0) for w in grid)
    assert len(fused_grid(0.1)) == 286  # C(13, 3)
    with pytest.raises(ConfigError, match="divide 1"):
        fused_grid(0.3)


def test_choose_fused_weights_finds_the_only_weights_that_lift_the_item():
    # z(base) = [1.22, 0, -1.22]; z(list) = [-.71, -.71, 1.41] (the target, position 2);
    # z(point) = [1.41, -.71, -.71]; z(pair) = [-.71, 1.41, -.71]. On the 0.5 grid only
    # listwise alone puts the target first: (0, 0, .5, .5) ties it with position 1 at 0.354
    # (the base rank wins), (0, .5, 0, .5) ties it with position 0, (.5, 0, 0, .5) gives
    # [0.259, -0.354, 0.095].
    one = user(0, [3.0, 2.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], 2)
    weights, score = choose_fused_weights([one], k=3, step=0.5)
    assert weights == FusedWeights(0, 0, 0, 1) and score == pytest.approx(1.0)
    # A miss counts as 0 in the mean: the same weights, half the score.
    miss = user(1, [3.0, 2.0, 1.0], [0.0] * 3, [0.0] * 3, [0.0] * 3, -1)
    assert choose_fused_weights([one, miss], k=3, step=0.5) == (FusedWeights(0, 0, 0, 1), 0.5)


def test_a_flat_objective_keeps_the_base_order():
    flat = [user(n, [1.0, 1.0, 1.0], [2.0] * 3, [0.0] * 3, [5.0] * 3, 1) for n in range(3)]
    assert choose_fused_weights(flat, k=3, step=0.25)[0] == BASE_ONLY
    assert choose_fused_weights([], k=3)[0] == BASE_ONLY
    # Base at the top, a task that cannot move the item: still base only (largest base weight).
    top = [user(0, [3.0, 2.0, 1.0], [0.0, 1.0, 2.0], [0.0] * 3, [0.0] * 3, 0)]
    weights, score = choose_fused_weights(top, k=3, step=0.5)
    assert weights == BASE_ONLY and score == 1.0


def test_ties_between_weights_go_to_the_largest_base_weight_then_equal_task_weights():
    # The three tasks all point at position 2 (z = [-.71, -.71, 1.41]), the base order at
    # position 0 (z = [1.22, 0, -1.22]). Base 1/3 with tasks 2/3 lifts the item to the top
    # (-0.408 + 0.943 = 0.535 against 0.408 - 0.471 = -0.063); base 2/3 does not. Among the
    # base-1/3 weights every split of the tasks ties; the one closest to an equal split wins:
    # two tasks at 1/3 (distance 4/9 from 2/9 each) over one task at 2/3 (distance 8/9).
    u = user(0, [3.0, 2.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], 2)
    weights, score = choose_fused_weights([u], k=1, step=1 / 3)
    assert score == 1.0 and weights.base == pytest.approx(1 / 3)
    tasks = sorted([weights.pointwise, weights.pairwise, weights.listwise])
    assert tasks == pytest.approx([0, 1 / 3, 1 / 3])


def synthetic_users(rng, n, *, signal: float):
    """Users whose held-out item sits near the top of the base list more often than not (the
    base model is informative); the listwise score carries `signal` at the item."""
    p = 1 / np.arange(1, 11)
    users = []
    for u in range(n):
        position = int(rng.choice(10, p=p / p.sum()))
        listwise = rng.normal(size=10)
        listwise[position] += signal
        users.append(
            ScoredUser(
                u,
                np.sort(rng.normal(size=10))[::-1],
                rng.normal(size=10),
                rng.normal(size=10),
                listwise,
                position,
            )
        )
    return users


@pytest.mark.parametrize("seed", [2, 5, 6])
def test_guard_serves_the_base_order_for_noise(seed):
    users = synthetic_users(np.random.default_rng(seed), 100, signal=0.0)
    # On these seeds the search over all users is fooled by the noise (in sample, some fusion
    # beats the base order); measured out of sample, the guard is not.
    fooled, in_sample = choose_fused_weights(users, k=3, step=0.1)
    assert fooled != BASE_ONLY and in_sample > per_user_ndcg(users, None, 3).mean()
    decision = cross_fit_guard(users, 250, k=3, step=0.1, seed=seed, n_boot=300)
    assert decision.served == "base", decision.reason
    assert not decision.gain > decision.se
    assert "base order is served" in decision.reason
    assert decision.n_users == 250 and decision.n_hits == 100


def test_guard_serves_the_fusion_when_listwise_knows_the_item():
    users = synthetic_users(np.random.default_rng(0), 300, signal=2.5)
    decision = cross_fit_guard(users, 700, k=3, step=0.25, seed=0, n_boot=300)
    assert decision.served == "fused", decision.reason
    assert decision.gain > decision.se > 0
    assert decision.weights.listwise > 0
    assert decision.fused_ndcg - decision.base_ndcg == pytest.approx(decision.gain)
    # The base NDCG is over all 700 users: the 400 misses count as 0.
    assert decision.base_ndcg == pytest.approx(per_user_ndcg(users, None, 3).sum() / 700)
    assert decision.reason.endswith(": served") and "700 validation users" in decision.reason


def test_guard_is_deterministic_whatever_the_input_order_and_round_trips():
    users = synthetic_users(np.random.default_rng(3), 80, signal=1.0)
    a = cross_fit_guard(users, 100, step=0.5, n_boot=200)
    b = cross_fit_guard(users[::-1], 100, step=0.5, n_boot=200)
    assert a == b
    assert a.users_hash == users_hash(range(80)) != users_hash(range(81))
    assert GuardDecision.from_json(a.as_json()) == a
    with pytest.raises(DataError, match="tune-weights"):
        GuardDecision.from_json({"served": "fused"})


def test_guard_refuses_inconsistent_counts_and_serves_base_without_users():
    users = synthetic_users(np.random.default_rng(0), 5, signal=1.0)
    with pytest.raises(DataError, match="n_total"):
        cross_fit_guard(users, 4)
    alone = cross_fit_guard(users[:1], 10)
    assert alone.served == "base" and "too few" in alone.reason
    nobody = cross_fit_guard([], 10)
    assert nobody.served == "base" and nobody.n_hits == 0


def test_fused_weights_checks():
    with pytest.raises(ConfigError, match=">= 0"):
        FusedWeights(-0.1, 0.5, 0.3, 0.3)
    assert FusedWeights.from_list([0.4, 0, 0.1, 0.5]).tasks == ("pairwise", "listwise")
    with pytest.raises(ConfigError, match="four numbers"):
        FusedWeights.from_list([0.5, 0.5])
    w = FusedWeights(0.4, 0.1, 0.2, 0.3)
    assert FusedWeights.from_dict(w.as_dict()) == w
    with pytest.raises(DataError, match="listwise"):
        FusedWeights.from_dict({"base": 1, "pointwise": 0, "pairwise": 0})
