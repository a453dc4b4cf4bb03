"""The position-bias measure: Spearman with ties, mapping a shuffled prompt's scores back to its
items, and what a position-free and a position-only scorer score."""

from __future__ import annotations

import numpy as np
import pytest

from recranker_core.evaluate_ranker.bias import agreement, back_to_items, spearman


def test_spearman_matches_the_textbook_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]
    assert spearman([0, 1, 1, 2], [0, 1, 2, 3]) == pytest.approx(0.9486832980505138)
    assert spearman([3, 3, 3], [5, 5, 5]) == 1.0
    assert spearman([3, 3, 3], [1, 2, 3]) == 0.0
    with pytest.raises(ValueError, match="one length"):
        spearman([1, 2], [1, 2, 3])


def test_back_to_items_inverts_the_shown_order():
    items_scores = np.array([0.1, 0.9, 0.5, 0.3])
    perm = [2, 0, 3, 1]  # position j shows original position perm[j]
    shown = items_scores[perm]
    assert back_to_items(shown, perm).tolist() == items_scores.tolist()


def test_a_scorer_that_ignores_positions_agrees_and_one_that_reads_only_positions_does_not():
    rng = np.random.default_rng(0)
    item_scores = rng.normal(size=10)
    by_position = -np.arange(10, dtype=float)  # first shown wins, whatever the item
    rhos_free, rhos_biased = [], []
    for _ in range(20):
        perm = rng.permutation(10).tolist()
        rho, same = agreement(item_scores, item_scores[perm], perm)
        assert same and rho == pytest.approx(1.0)
        rhos_free.append(rho)
        rho_b, _ = agreement(by_position, by_position, perm)
        rhos_biased.append(rho_b)
    assert np.mean(rhos_free) == pytest.approx(1.0)
    assert abs(float(np.mean(rhos_biased))) < 0.5
    # the identity permutation changes nothing even for the position-only scorer
    assert agreement(by_position, by_position, list(range(10))) == (pytest.approx(1.0), True)
