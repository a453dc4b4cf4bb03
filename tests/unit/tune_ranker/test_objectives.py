"""The ALRO and DMPO loss math on hand-computable cases: smooth positions follow their formulas,
the Soft Lambda Loss matches hand-computed values (scores and slot logits, both pair weights),
prefers the ideal order and ignores how items are labelled, the permutation-sensitive loss is
zero exactly for an order-blind scorer, DMPO matches a hand-computed k = 2 case, is DPO at k = 1,
log 2 at the reference and below the mean pairwise DPO loss, gradients flow, and one forward
pass of a tiny Llama reads the same answer log-probabilities as running each prompt alone."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from recranker_core.errors import ConfigError, DataError
from recranker_core.tune_ranker.batches import IGNORE, Example, collate
from recranker_core.tune_ranker.objectives import (
    answer_logps,
    dmpo_loss,
    expected_positions,
    gather_answer_logps,
    permutation_sensitive_loss,
    rating_gains,
    single_token_answer_logps,
    slot_expected_positions,
    soft_lambda_loss,
    soft_ranks,
    to_original_order,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The tiny model's ops are too small to split across threads; with another busy process on
    # a 2-core machine, threads waiting for each other make the module many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def log2_1p_exp(x: float) -> float:
    return math.log2(1.0 + math.exp(x))


# --- expected positions -----------------------------------------------------------------------


def test_soft_ranks_follow_the_sigmoid_formula() -> None:
    got = soft_ranks(torch.tensor([[2.0, 1.0, 0.0]]), gamma=1.0)[0].tolist()
    want = [
        1 + sig(1 - 2) + sig(0 - 2),
        1 + sig(2 - 1) + sig(0 - 1),
        1 + sig(2 - 0) + sig(1 - 0),
    ]
    assert got == pytest.approx(want, abs=1e-6)
    # Equal scores share the middle rank; a sharp gamma gives the hard ranks.
    assert soft_ranks(torch.zeros(1, 4), gamma=1.0)[0].tolist() == pytest.approx([2.5] * 4)
    sharp = soft_ranks(torch.tensor([[0.0, 3.0, 1.0]]), gamma=50.0)[0].tolist()
    assert sharp == pytest.approx([3.0, 1.0, 2.0], abs=1e-6)


def test_slot_positions_follow_alro_soft_argmax() -> None:
    # Two slots, two items, no leftover slot: y = the per-slot candidate probabilities.
    slots = torch.log(torch.tensor([[[0.8, 0.2], [0.3, 0.7]]]))
    got = slot_expected_positions(slots, gamma=2.0)[0].tolist()
    first0 = math.exp(2 * 0.8) / (math.exp(2 * 0.8) + math.exp(2 * 0.3))
    first1 = math.exp(2 * 0.2) / (math.exp(2 * 0.2) + math.exp(2 * 0.7))
    assert got == pytest.approx([first0 + 2 * (1 - first0), first1 + 2 * (1 - first1)], abs=1e-6)


def test_slot_positions_send_unnamed_items_to_the_leftover_slot() -> None:
    # One slot over three items: the leftover slot sits at (1 + 1 + 3) / 2 = 2.5.
    slots = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]]))
    got = slot_expected_positions(slots, gamma=1.0)[0].tolist()
    want = []
    for y in (0.5, 0.3, 0.2):
        w = math.exp(y) / (math.exp(y) + math.exp(1 - y))
        want.append(w * 1 + (1 - w) * 2.5)
    assert got == pytest.approx(want, abs=1e-6)
    # A sharp model naming items 2, 0 in slots 1, 2 puts them there and the rest at (3+5)/2.
    sharp = torch.full((1, 2, 5), -30.0)
    sharp[0, 0, 2] = sharp[0, 1, 0] = 30.0
    positions = slot_expected_positions(sharp, gamma=60.0)[0].tolist()
    assert positions == pytest.approx([2.0, 4.0, 1.0, 4.0, 4.0], abs=1e-4)


def test_expected_positions_dispatch_on_shape_and_reject_bad_input() -> None:
    scores = torch.randn(2, 4)
    assert torch.equal(expected_positions(scores, 1.0), soft_ranks(scores, 1.0))
    slots = torch.randn(2, 3, 4)
    assert torch.equal(expected_positions(slots, 3.0), slot_expected_positions(slots, 3.0))
    with pytest.raises(DataError, match="shape"):
        expected_positions(torch.randn(4), 1.0)
    with pytest.raises(ConfigError, match="gamma"):
        soft_ranks(scores, 0.0)
    with pytest.raises(ConfigError, match="gamma"):
        slot_expected_positions(slots, -1.0)


# --- Soft Lambda Loss -------------------------------------------------------------------------

GAINS_3 = torch.tensor([[3.0, 1.0, 0.0]])  # ratings 2, 1, 0


def test_rating_gains_are_two_to_the_rating_minus_one() -> None:
    assert rating_gains(torch.tensor([0, 1, 4, 5])).tolist() == [0.0, 1.0, 15.0, 31.0]


def pair_weight(kind: str, r_i: float, r_j: float) -> float:
    """The Soft Lambda Loss pair discount of 1-based ranks r_i, r_j, D(r) = log2(1 + r)."""
    if kind == "lambdarank":
        return abs(1 / math.log2(1 + r_i) - 1 / math.log2(1 + r_j))
    apart = abs(r_i - r_j)
    return abs(1 / math.log2(1 + apart) - 1 / math.log2(2 + apart))


@pytest.mark.parametrize("pair_weights", ["paper", "lambdarank"])
def test_sll_of_a_uniform_scorer_equals_the_hand_computed_value(pair_weights: Any) -> None:
    # Equal positions: every ordered pair costs log2(1 + e^0) = 1, weighted by w_ij.
    g = [3.0, 1.0, 0.0]
    pairs = [(0, 1), (0, 2), (1, 2)]  # target ranks 1, 2, 3 = index + 1
    weight = sum(pair_weight(pair_weights, i + 1, j + 1) * abs(g[i] - g[j]) for i, j in pairs)
    idcg = sum(gain / math.log2(2 + r) for r, gain in enumerate(g))
    got = soft_lambda_loss(torch.zeros(1, 3), GAINS_3, gamma=1.0, pair_weights=pair_weights)
    assert float(got) == pytest.approx(weight / idcg, rel=1e-6)


@pytest.mark.parametrize("pair_weights", ["paper", "lambdarank"])
def test_sll_of_a_graded_order_equals_the_hand_computed_value(pair_weights: Any) -> None:
    scores = torch.tensor([[2.0, 1.0, 0.0]])
    p = [1 + sig(-1) + sig(-2), 2.0, 1 + sig(2) + sig(1)]
    g = [3.0, 1.0, 0.0]
    total = sum(
        pair_weight(pair_weights, i + 1, j + 1) * abs(g[i] - g[j]) * log2_1p_exp(p[i] - p[j])
        for i, j in [(0, 1), (0, 2), (1, 2)]
    )
    idcg = sum(gain / math.log2(2 + r) for r, gain in enumerate(g))
    got = soft_lambda_loss(scores, GAINS_3, gamma=1.0, pair_weights=pair_weights)
    assert float(got) == pytest.approx(total / idcg, rel=1e-5)


def test_sll_on_slot_logits_equals_the_hand_computed_value() -> None:
    # Three candidates A, B, C; the answer names two slots. Slot logits are log-probabilities,
    # so the per-slot candidate distributions y are these numbers:
    #   slot 1: A 0.7, B 0.2, C 0.1      slot 2: A 0.2, B 0.5, C 0.3
    # m = 2 < n = 3: a leftover slot at (m + 1 + n) / 2 = 3 takes 1 - sum_t y[t, i]:
    #   A 0.1, B 0.3, C 0.6.
    # gamma = 2: E[pos_i] = sum_k k e^(2 y_ki) / sum_k e^(2 y_ki) over slot positions 1, 2, 3:
    #   P_A = (1 e^1.4 + 2 e^0.4 + 3 e^0.2) / (e^1.4 + e^0.4 + e^0.2) = 1.581321
    #   P_B = (1 e^0.4 + 2 e^1.0 + 3 e^0.6) / (e^0.4 + e^1.0 + e^0.6) = 2.054755
    #   P_C = (1 e^0.2 + 2 e^0.6 + 3 e^1.2) / (e^0.2 + e^0.6 + e^1.2) = 2.329798
    # Ratings A 5, B unrated, C 4: gains 31, 0, 15; target ranks A 1, C 2, B 3.
    # The paper's delta_ij = |1/D(d) - 1/D(d + 1)|, D(r) = log2(1 + r), d = rank distance:
    #   d = 1: 1/log2(2) - 1/log2(3) = 0.369070     d = 2: 1/log2(3) - 1/log2(4) = 0.130930
    # Pairs (i above j): log2(1 + e^(P_i - P_j)) times delta_ij |G_i - G_j|:
    #   (A, B): d 2, |dG| 31, log2(1 + e^-0.473434) = 0.698538 -> 0.130930 * 31 * 0.698538
    #   (A, C): d 1, |dG| 16, log2(1 + e^-0.748477) = 0.558842 -> 0.369070 * 16 * 0.558842
    #   (C, B): d 1, |dG| 15, log2(1 + e^+0.275043) = 1.212001 -> 0.369070 * 15 * 1.212001
    #   sum = 2.835305 + 3.300019 + 6.709655 = 12.844979
    # IDCG = 31 / log2(2) + 15 / log2(3) + 0 = 40.463946; loss = 12.844979 / 40.463946.
    slots = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]]], dtype=torch.float64))
    gains = rating_gains(torch.tensor([[5.0, 0.0, 4.0]]))
    positions = slot_expected_positions(slots, gamma=2.0)[0].tolist()
    assert positions == pytest.approx([1.581321, 2.054755, 2.329798], abs=1e-6)
    got = soft_lambda_loss(slots, gains, gamma=2.0)
    assert float(got) == pytest.approx(0.3174426, abs=1e-7)
    assert float(got) == pytest.approx(12.844979 / 40.463946, rel=1e-6)
    # LambdaRank's weights on the same positions: |1/D(1) - 1/D(3)| = 0.5 for (A, B), etc.
    lambdarank = (
        0.5 * 31 * 0.698538 + 0.369070 * 16 * 0.558842 + 0.130930 * 15 * 1.212001
    ) / 40.463946
    got_lr = soft_lambda_loss(slots, gains, gamma=2.0, pair_weights="lambdarank")
    assert float(got_lr) == pytest.approx(lambdarank, rel=1e-5)


def slot_logits_naming(order: list[list[int]], n: int, sharp: float = 8.0) -> torch.Tensor:
    """Slot logits whose slot t names candidate order[b][t] (a sharp, not one-hot, choice)."""
    out = torch.zeros(len(order), len(order[0]), n)
    for b, row in enumerate(order):
        for t, item in enumerate(row):
            out[b, t, item] = sharp
    return out


# Five candidates shown shuffled: a 5-star at 3, a 5-star at 0, a 4-star at 4, unrated 1 and 2.
RATINGS_5 = torch.tensor([[5.0, 0.0, 0.0, 5.0, 4.0]])
IDEAL_5 = [3, 0, 4, 1, 2]  # one ideal order (the two 5-stars are interchangeable)


def orders_as_logits(formulation: str) -> dict[str, torch.Tensor]:
    n = RATINGS_5.shape[1]
    if formulation == "scores":
        ideal = torch.zeros(1, n)
        for rank, item in enumerate(IDEAL_5):
            ideal[0, item] = float(n - rank)
        return {"ideal": ideal, "uniform": torch.zeros(1, n), "reversed": -ideal}
    # Three answer slots over five candidates, as the listwise label names the top few.
    return {
        "ideal": slot_logits_naming([IDEAL_5[:3]], n),
        "uniform": torch.zeros(1, 3, n),
        "reversed": slot_logits_naming([IDEAL_5[::-1][:3]], n),
    }


@pytest.mark.parametrize("pair_weights", ["paper", "lambdarank"])
@pytest.mark.parametrize("weights", ["target", "predicted"])
@pytest.mark.parametrize("formulation", ["scores", "slots"])
def test_sll_is_lowest_for_the_ideal_order(
    formulation: str, weights: Any, pair_weights: Any
) -> None:
    gains = rating_gains(RATINGS_5)
    gamma = 1.0 if formulation == "scores" else 10.0
    loss = {
        name: float(
            soft_lambda_loss(logits, gains, gamma=gamma, weights=weights, pair_weights=pair_weights)
        )
        for name, logits in orders_as_logits(formulation).items()
    }
    assert loss["ideal"] < loss["uniform"] < loss["reversed"], loss


@pytest.mark.parametrize("pair_weights", ["paper", "lambdarank"])
@pytest.mark.parametrize("weights", ["target", "predicted"])
@pytest.mark.parametrize("shape", [(4, 6), (4, 3, 6), (4, 6, 6)])
def test_sll_is_invariant_to_relabelling_items(
    shape: tuple[int, ...], weights: Any, pair_weights: Any
) -> None:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(*shape, generator=gen, dtype=torch.float64)
    # Ties among the gains too: tied items must not get ranks from their labels.
    ratings = torch.randint(0, 3, (shape[0], shape[-1]), generator=gen) * 2
    gains = rating_gains(ratings)
    kw: dict[str, Any] = {"gamma": 3.0, "weights": weights, "pair_weights": pair_weights}
    before = soft_lambda_loss(logits, gains, **kw)
    assert float(before) > 0
    for _ in range(5):
        perm = torch.randperm(shape[-1], generator=gen)
        after = soft_lambda_loss(logits[..., perm], gains[:, perm], **kw)
        assert float(after) == pytest.approx(float(before), rel=1e-9)


def test_sll_ignores_lists_without_gains_and_averages_the_rest() -> None:
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    gains = torch.cat([GAINS_3, torch.zeros(1, 3)])
    one = soft_lambda_loss(scores[:1], GAINS_3, gamma=1.0)
    both = soft_lambda_loss(scores, gains, gamma=1.0)
    assert float(both) == pytest.approx(float(one) / 2, rel=1e-6)


def test_sll_rejects_bad_settings_and_shapes() -> None:
    with pytest.raises(ConfigError, match="rank weights"):
        soft_lambda_loss(torch.zeros(1, 3), GAINS_3, gamma=1.0, weights="soft")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pair weights"):
        soft_lambda_loss(torch.zeros(1, 3), GAINS_3, gamma=1.0, pair_weights="ndcg")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="one gain per candidate"):
        soft_lambda_loss(torch.zeros(1, 4), GAINS_3, gamma=1.0)
    with pytest.raises(DataError, match="0 or more"):
        soft_lambda_loss(torch.zeros(1, 3), -GAINS_3, gamma=1.0)


# --- permutation-sensitive loss ---------------------------------------------------------------


def test_to_original_order_maps_values_back_to_items() -> None:
    # The permuted list shows original candidates 2, 0, 1.
    values = torch.tensor([[20.0, 0.0, 10.0]])
    assert to_original_order(values, torch.tensor([2, 0, 1])).tolist() == [[0.0, 10.0, 20.0]]
    slots = torch.tensor([[[20.0, 0.0, 10.0], [21.0, 1.0, 11.0]]])
    back = to_original_order(slots, torch.tensor([[2, 0, 1]]))
    assert back.tolist() == [[[0.0, 10.0, 20.0], [1.0, 11.0, 21.0]]]
    with pytest.raises(DataError, match="exactly once"):
        to_original_order(values, torch.tensor([0, 0, 1]))
    with pytest.raises(DataError, match="does not fit"):
        to_original_order(values, torch.tensor([0, 1]))


def make_scorer(bias: float, slots: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A scorer of shown item features [B, n, d]: each item's own score plus a set summary (the
    mean of all items, which no order changes) plus `bias` times its shown position."""
    gen = torch.Generator().manual_seed(3)
    d = 4
    w = torch.randn(d, slots or 1, generator=gen, dtype=torch.float64)
    v = torch.randn(d, slots or 1, generator=gen, dtype=torch.float64)

    def score(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        out = x @ w + (x.mean(dim=1, keepdim=True) @ v)  # [B, n, slots]
        out = out + bias * torch.arange(n, dtype=x.dtype)[None, :, None]
        return out[..., 0] if slots is None else out.transpose(1, 2)

    return score


def both_orders(scorer: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(5)
    items = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64)
    perm = torch.stack([torch.randperm(6, generator=gen) for _ in range(3)])
    shown_b = torch.gather(items, 1, perm[..., None].expand_as(items))
    return scorer(items), to_original_order(scorer(shown_b), perm)


@pytest.mark.parametrize("kind", ["kl", "position"])
@pytest.mark.parametrize("slots", [None, 3])
def test_psl_is_zero_for_an_order_blind_scorer_and_positive_for_a_biased_one(
    kind: Any, slots: int | None
) -> None:
    a, b = both_orders(make_scorer(0.0, slots))
    assert not torch.equal(a, torch.zeros_like(a))
    blind = permutation_sensitive_loss(a, b, kind=kind, gamma=2.0)
    assert float(blind) == pytest.approx(0.0, abs=1e-12)
    a, b = both_orders(make_scorer(-0.7, slots))
    biased = permutation_sensitive_loss(a, b, kind=kind, gamma=2.0)
    assert float(biased) > 1e-3


def test_psl_kl_is_the_mean_of_both_kl_directions() -> None:
    p, q = [0.5, 0.5], [0.75, 0.25]
    kl_pq = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    kl_qp = sum(b * math.log(b / a) for a, b in zip(p, q, strict=True))
    got = permutation_sensitive_loss(torch.tensor([[0.0, 0.0]]), torch.log(torch.tensor([q])))
    assert float(got) == pytest.approx((kl_pq + kl_qp) / 2, rel=1e-6)


def test_psl_position_is_the_mean_squared_position_difference() -> None:
    # Scores [1, 0] against [0, 1]: positions 1 + sig(-1), 1 + sig(1) and the swap.
    gap = (1 + sig(1)) - (1 + sig(-1))
    got = permutation_sensitive_loss(
        torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), kind="position", gamma=1.0
    )
    assert float(got) == pytest.approx(gap**2, rel=1e-6)


def test_psl_rejects_unknown_kinds_and_mismatched_lists() -> None:
    with pytest.raises(ConfigError, match="kind"):
        permutation_sensitive_loss(torch.zeros(1, 2), torch.zeros(1, 2), kind="l2")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="differ in shape"):
        permutation_sensitive_loss(torch.zeros(1, 2), torch.zeros(1, 3))


# --- DMPO -------------------------------------------------------------------------------------


def dpo(pos: float, neg: float, ref_pos: float, ref_neg: float, beta: float) -> float:
    return -math.log(sig(beta * ((pos - ref_pos) - (neg - ref_neg))))


def random_logps(gen: torch.Generator, b: int, k: int) -> tuple[torch.Tensor, ...]:
    def draw(*shape: int) -> torch.Tensor:
        return -torch.rand(*shape, generator=gen, dtype=torch.float64) * 6

    return draw(b), draw(b, k), draw(b), draw(b, k)


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_dmpo_with_one_negative_is_dpo(beta: float) -> None:
    gen = torch.Generator().manual_seed(1)
    pos, neg, ref_pos, ref_neg = random_logps(gen, 8, 1)
    got = dmpo_loss(pos, neg, ref_pos, ref_neg, beta)
    want = [
        dpo(float(pos[r]), float(neg[r, 0]), float(ref_pos[r]), float(ref_neg[r, 0]), beta)
        for r in range(8)
    ]
    assert float(got) == pytest.approx(sum(want) / len(want), rel=1e-10)


def test_dmpo_with_two_negatives_equals_the_hand_computed_value() -> None:
    # beta = 0.5, k = 2; h = log pi - log pi_ref.
    # Row 1: h(pos) = -1.0 - (-1.5) = 0.5; h(neg) = (-2.0 + 1.8, -3.0 + 2.4) = (-0.2, -0.6),
    #   mean -0.4; margin = 0.5 * (0.5 + 0.4) = 0.45; loss = log(1 + e^-0.45) = 0.4932489.
    # Row 2: h(pos) = 0; h(neg) = (+1, -1), mean 0; margin 0; loss = log 2 = 0.6931472.
    #   (Each pair alone: DPO losses log(1 + e^0.5) and log(1 + e^-0.5), mean 0.7240 > log 2.)
    # Batch mean: (0.4932489 + 0.6931472) / 2 = 0.5931981.
    pos = torch.tensor([-1.0, -0.5], dtype=torch.float64)
    neg = torch.tensor([[-2.0, -3.0], [-1.0, -2.0]], dtype=torch.float64)
    ref_pos = torch.tensor([-1.5, -0.5], dtype=torch.float64)
    ref_neg = torch.tensor([[-1.8, -2.4], [-2.0, -1.0]], dtype=torch.float64)
    got = dmpo_loss(pos, neg, ref_pos, ref_neg, 0.5)
    assert float(got) == pytest.approx(0.5931981, abs=1e-7)
    rows = [
        float(
            dmpo_loss(pos[r : r + 1], neg[r : r + 1], ref_pos[r : r + 1], ref_neg[r : r + 1], 0.5)
        )
        for r in range(2)
    ]
    assert rows == pytest.approx([0.4932489, 0.6931472], abs=1e-7)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_dmpo_is_log_2_when_the_policy_is_the_reference(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    pos, neg, _, _ = random_logps(gen, 5, k)
    assert float(dmpo_loss(pos, neg, pos.clone(), neg.clone(), 0.5)) == pytest.approx(
        math.log(2), rel=1e-12
    )


def test_dmpo_is_at_most_the_mean_pairwise_dpo_loss() -> None:
    strictly = 0
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        k = 2 + seed % 7
        beta = [0.1, 0.5, 2.0][seed % 3]
        pos, neg, ref_pos, ref_neg = random_logps(gen, 4, k)
        together = float(dmpo_loss(pos, neg, ref_pos, ref_neg, beta))
        pairwise = [
            float(dmpo_loss(pos, neg[:, j : j + 1], ref_pos, ref_neg[:, j : j + 1], beta))
            for j in range(k)
        ]
        mean_pairwise = sum(pairwise) / k
        assert together <= mean_pairwise + 1e-12, (seed, together, mean_pairwise)
        strictly += together < mean_pairwise - 1e-9
    # Equality only when every negative's margin is the same: random draws are strict.
    assert strictly == 200


def test_dmpo_sft_anchor_adds_the_positive_nll() -> None:
    gen = torch.Generator().manual_seed(2)
    pos, neg, ref_pos, ref_neg = random_logps(gen, 6, 4)
    plain = float(dmpo_loss(pos, neg, ref_pos, ref_neg, 1.0))
    anchored = float(dmpo_loss(pos, neg, ref_pos, ref_neg, 1.0, sft_weight=0.3))
    assert anchored == pytest.approx(plain + 0.3 * float(-pos.mean()), rel=1e-12)


def test_dmpo_rejects_bad_settings_and_shapes() -> None:
    pos, neg = torch.zeros(2), torch.zeros(2, 3)
    with pytest.raises(ConfigError, match="beta"):
        dmpo_loss(pos, neg, pos, neg, 0.0)
    with pytest.raises(ConfigError, match="anchor"):
        dmpo_loss(pos, neg, pos, neg, 1.0, sft_weight=-1.0)
    with pytest.raises(DataError, match="at least one negative"):
        dmpo_loss(pos, torch.zeros(2, 0), pos, torch.zeros(2, 0), 1.0)
    with pytest.raises(DataError, match="reference"):
        dmpo_loss(pos, neg, pos, torch.zeros(2, 2), 1.0)
    with pytest.raises(DataError, match="positives"):
        dmpo_loss(neg, neg, neg, neg, 1.0)


# --- gradients --------------------------------------------------------------------------------


def assert_useful_grad(t: torch.Tensor) -> None:
    assert t.grad is not None
    assert bool(torch.isfinite(t.grad).all())
    assert float(t.grad.abs().sum()) > 0


@pytest.mark.parametrize("shape", [(2, 5), (2, 3, 5)])
def test_gradients_flow_through_sll_and_psl(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(*shape, generator=gen).requires_grad_()
    gains = rating_gains(torch.tensor([[5.0, 0.0, 4.0, 0.0, 5.0], [0.0, 4.0, 4.0, 5.0, 0.0]]))
    soft_lambda_loss(logits, gains, gamma=5.0).backward()
    assert_useful_grad(logits)
    for kind in ("kl", "position"):
        a = torch.randn(*shape, generator=gen).requires_grad_()
        b = torch.randn(*shape, generator=gen).requires_grad_()
        permutation_sensitive_loss(a, b, kind=kind, gamma=5.0).backward()
        assert_useful_grad(a)
        assert_useful_grad(b)


def test_gradients_flow_through_dmpo() -> None:
    gen = torch.Generator().manual_seed(6)
    pos, neg, ref_pos, ref_neg = random_logps(gen, 3, 4)
    pos.requires_grad_()
    neg.requires_grad_()
    dmpo_loss(pos, neg, ref_pos, ref_neg, 0.5, sft_weight=0.1).backward()
    assert_useful_grad(pos)
    assert_useful_grad(neg)
    # Raising the positive and lowering the negatives both lower the loss.
    assert pos.grad is not None and neg.grad is not None
    assert bool((pos.grad < 0).all()) and bool((neg.grad > 0).all())


# --- one forward pass on a tiny Llama ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recranker_core.llm.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


QUESTIONS = (
    "Which of A, B, C would the user like most?",
    "Rank the candidates A, B, C, D for a user who loved Star Night River (1977).",
    "Best first?",
)


def prompt_ids(tokenizer: Any) -> list[list[int]]:
    out = []
    for q in QUESTIONS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def alone(model: Any, ids: list[int]) -> torch.Tensor:
    """log p(next token) over the vocabulary after `ids`, run on its own (no padding)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1)


def identifier_ids(tokenizer: Any) -> list[int]:
    from recranker_core.llm.render import verbalizer_ids

    return verbalizer_ids(tokenizer, 4)["identifiers"]


def test_single_token_answer_logps_equal_each_prompt_run_alone(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    rows = prompt_ids(tokenizer)
    assert len({len(r) for r in rows}) == len(rows)  # padding is exercised
    ids = identifier_ids(tokenizer)
    wanted = torch.tensor([ids, ids[::-1], ids[1:3] + ids[:2]])
    want = torch.stack([alone(model, r)[w] for r, w in zip(rows, wanted, strict=True)])

    # Right-padded, as the tuning loop collates.
    batch = collate([Example(r, [IGNORE] * len(r), "listwise") for r in rows], 0, "cpu")
    with torch.no_grad():
        got = single_token_answer_logps(model, batch.input_ids, batch.attention_mask, wanted)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)

    # Left-padded, as the scorer pads: the same numbers.
    width = max(len(r) for r in rows)
    left = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        got_left = single_token_answer_logps(model, left, mask, wanted)
    torch.testing.assert_close(got_left, want, atol=2e-5, rtol=1e-5)


def test_answer_logps_read_several_slots_in_one_pass(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    rows = prompt_ids(tokenizer)
    answer = list(tokenizer("B, A, C", add_special_tokens=False)["input_ids"])
    full = [r + answer for r in rows]
    batch = collate([Example(r, [IGNORE] * len(r), "listwise") for r in full], 0, "cpu")
    # Slot 1 is read after the prompt, slot 2 after "B,", slot 3 after "B, A,".
    commas = [j for j, t in enumerate(answer) if tokenizer.decode([t]).strip() == ","]
    assert len(commas) == 2
    positions = torch.tensor([[len(r) - 1, len(r) + commas[0], len(r) + commas[1]] for r in rows])
    ids = identifier_ids(tokenizer)
    token_ids = torch.tensor(ids)[None, None, :].expand(3, 3, 4)
    with torch.no_grad():
        got = answer_logps(model, batch.input_ids, batch.attention_mask, positions, token_ids)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for r, row in enumerate(full):
        for s, p in enumerate(positions[r].tolist()):
            want = alone(model, row[: p + 1])[token_ids[r, s]]
            torch.testing.assert_close(got[r, s], want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(
        gather_answer_logps(logits, positions, token_ids), got, atol=2e-5, rtol=1e-5
    )


def test_answer_positions_on_padding_are_refused(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    ids = torch.tensor([[5, 6, 7, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    with pytest.raises(DataError, match="padding"):
        answer_logps(model, ids, mask, torch.tensor([[3]]), torch.tensor([[[5]]]))
    with pytest.raises(DataError, match="outside"):
        answer_logps(model, ids, mask, torch.tensor([[4]]), torch.tensor([[[5]]]))
    with pytest.raises(DataError, match="empty prompt"):
        single_token_answer_logps(model, ids, torch.zeros_like(mask), torch.tensor([[5]]))


def test_dmpo_on_a_lora_policy_against_its_base(tiny: tuple[Any, Any]) -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    torch.manual_seed(0)
    policy = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    rows = prompt_ids(tokenizer)
    batch = collate([Example(r, [IGNORE] * len(r), "listwise") for r in rows], 0, "cpu")
    ids = identifier_ids(tokenizer)
    answers = torch.tensor([ids, ids[1:] + ids[:1], ids[2:] + ids[:2]])  # positive first

    def loss() -> torch.Tensor:
        with torch.no_grad(), policy.disable_adapter():
            ref = single_token_answer_logps(policy, batch.input_ids, batch.attention_mask, answers)
        logp = single_token_answer_logps(policy, batch.input_ids, batch.attention_mask, answers)
        return dmpo_loss(logp[:, 0], logp[:, 1:], ref[:, 0], ref[:, 1:], beta=1.0)

    # LoRA starts as the identity (B = 0): the policy is its reference.
    first = loss()
    assert float(first.detach()) == pytest.approx(math.log(2), abs=1e-6)
    first.backward()
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b
    for p in lora_b:
        assert_useful_grad(p)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
    optimizer.step()
    assert float(loss().detach()) < math.log(2) - 1e-4
