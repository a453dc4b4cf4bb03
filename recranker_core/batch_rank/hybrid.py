"""Hybrid ranking (docs/METHOD.md section 6): per candidate, a weighted sum of the pointwise,
pairwise and listwise utilities, each normalised within the user's candidates, ties broken by
the base model's rank; single-task and base modes for the ablation table."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from recranker_core.errors import ConfigError

MODES = ("base", "pointwise", "pairwise", "listwise", "hybrid")
TASK_MODES = ("pointwise", "pairwise", "listwise")


@dataclass(frozen=True)
class Weights:
    pointwise: float = 1 / 3
    pairwise: float = 1 / 3
    listwise: float = 1 / 3

    def as_dict(self) -> dict[str, float]:
        return {"pointwise": self.pointwise, "pairwise": self.pairwise, "listwise": self.listwise}

    @classmethod
    def for_mode(cls, mode: str, hybrid: Weights) -> Weights:
        if mode == "hybrid":
            return hybrid
        if mode in TASK_MODES:
            return cls(**{t: float(t == mode) for t in TASK_MODES})
        raise ConfigError(f"ranking mode {mode!r}: use one of {', '.join(MODES)}")


def normalise(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Z-score within one user's candidates, so the three utilities share a scale. A task that
    could not tell the candidates apart (constant or missing) contributes zeros."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    out = np.zeros_like(v)
    if finite.sum() < 2:
        return out
    mean, std = v[finite].mean(), v[finite].std()
    if std < 1e-12:
        return out
    out[finite] = (v[finite] - mean) / std
    return out


def utilities(
    pointwise: npt.ArrayLike, pairwise: npt.ArrayLike, listwise: npt.ArrayLike, weights: Weights
) -> npt.NDArray[np.float64]:
    """alpha1*U_point + alpha2*U_pair + alpha3*U_list, each normalised within the candidates."""
    total = np.zeros(np.asarray(listwise).shape, dtype=np.float64)
    for w, u in (
        (weights.pointwise, pointwise),
        (weights.pairwise, pairwise),
        (weights.listwise, listwise),
    ):
        if w:
            total += w * normalise(u)
    return total


def rerank(utility: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Positions of the candidates, best first. Candidates come in base-rank order, so a stable
    sort on -utility breaks ties by base rank."""
    return np.argsort(-np.asarray(utility, dtype=np.float64), kind="stable").astype(np.int64)


def order_for_mode(
    mode: str,
    pointwise: npt.ArrayLike,
    pairwise: npt.ArrayLike,
    listwise: npt.ArrayLike,
    weights: Weights,
) -> npt.NDArray[np.int64]:
    n = np.asarray(listwise).shape[0]
    if mode == "base":
        return np.arange(n, dtype=np.int64)
    return rerank(utilities(pointwise, pairwise, listwise, Weights.for_mode(mode, weights)))


def weight_grid(step: float = 0.1) -> list[Weights]:
    """Every weight triple on the simplex with the given step (each >= 0, summing to 1)."""
    n = round(1 / step)
    if abs(n * step - 1) > 1e-9:
        raise ConfigError(f"weight grid step {step} must divide 1")
    return [
        Weights(a / n, b / n, (n - a - b) / n)
        for a, b in itertools.product(range(n + 1), repeat=2)
        if a + b <= n
    ]


def target_rank(order: npt.NDArray[np.int64], target_position: int, n_fallback: int) -> int:
    """0-based rank of the candidate at `target_position` in `order`; `n_fallback` (a miss) when
    the target is not a candidate (position < 0)."""
    if target_position < 0:
        return n_fallback
    return int(np.flatnonzero(order == target_position)[0])


def choose_weights(
    scored: Sequence[tuple[npt.ArrayLike, npt.ArrayLike, npt.ArrayLike, int]],
    n_users_total: int,
    *,
    k: int = 10,
    step: float = 0.1,
) -> tuple[Weights, float]:
    """The grid weights with the best NDCG@k over validation users.

    `scored` holds (pointwise, pairwise, listwise, target position) of each validation user
    whose validation item is a candidate; the other users are misses whatever the weights, so
    they only enter through `n_users_total`. Ties between weight triples go to the one closest
    to equal weights (the paper's default), so a flat objective does not pick an extreme.
    """
    from recranker_core.metrics import ndcg

    best, best_score = Weights(), -1.0
    equal = np.full(3, 1 / 3)
    for w in sorted(
        weight_grid(step),
        key=lambda w: float(np.abs(np.array(list(w.as_dict().values())) - equal).sum()),
    ):
        ranks = [target_rank(rerank(utilities(p, q, r, w)), pos, 10**6) for p, q, r, pos in scored]
        misses = n_users_total - len(ranks)
        score = ndcg(np.array(ranks + [10**6] * misses), k)
        if score > best_score + 1e-12:
            best, best_score = w, score
    return best, best_score
