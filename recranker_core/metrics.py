"""Ranking metrics used by every stage (base models, each LLM task, the hybrid). One relevant
item per user; a rank is its 0-based position in the user's ranked list, or -1 when it is not
in the list at all (which counts as a miss at every k).

>>> ranks = np.array([0, 2, -1, 9])
>>> hit_rate(ranks, 3)
0.5
>>> round(ndcg(ranks, 3), 4)  # (1/log2(2) + 1/log2(4) + 0 + 0) / 4 = (1 + 0.5) / 4
0.375
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

DEFAULT_KS = (3, 5, 10)


def _in_top(ranks: npt.ArrayLike, k: int) -> npt.NDArray[np.bool_]:
    r = np.asarray(ranks)
    return (r >= 0) & (r < k)


def hit_rate(ranks: npt.ArrayLike, k: int) -> float:
    """Share of users whose relevant item is in their top k (HR@k)."""
    r = np.asarray(ranks)
    if r.size == 0:
        return 0.0
    return float(_in_top(r, k).mean())


def ndcg(ranks: npt.ArrayLike, k: int) -> float:
    """NDCG@k with a single relevant item: 1/log2(rank + 2) inside the top k, else 0, averaged
    over all users (the ideal DCG is 1)."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        return 0.0
    gains = np.where(_in_top(r, k), 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0)
    return float(gains.mean())


def rank_metrics(ranks: npt.ArrayLike, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """{"hr@k": ..., "ndcg@k": ...} for every k, keys in the order hr@3, ndcg@3, hr@5, ..."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate(ranks, k)
        out[f"ndcg@{k}"] = ndcg(ranks, k)
    return out


def coverage(top_lists: npt.NDArray[np.integer], n_items: int) -> float:
    """Share of the catalogue that appears in at least one user's list.

    >>> coverage(np.array([[0, 1], [1, 2]]), 10)
    0.3
    """
    if n_items <= 0:
        return 0.0
    items = np.unique(top_lists[top_lists >= 0])
    return float(items.size / n_items)


def mean_popularity(top_lists: npt.NDArray[np.integer], item_counts: npt.ArrayLike) -> float:
    """Mean train-period interaction count of the recommended items (a popularity-bias gauge).

    >>> mean_popularity(np.array([[0, 1]]), np.array([10, 30, 5]))
    20.0
    """
    counts = np.asarray(item_counts, dtype=np.float64)
    flat = top_lists[top_lists >= 0]
    return float(counts[flat].mean()) if flat.size else 0.0
