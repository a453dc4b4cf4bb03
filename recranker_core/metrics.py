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


def ndcg_per_user(ranks: npt.ArrayLike, k: int) -> npt.NDArray[np.float64]:
    """Each user's NDCG@k (1/log2(rank + 2) inside the top k, else 0): what `ndcg` averages,
    kept per user for paired comparisons.

    >>> ndcg_per_user(np.array([0, 2, -1]), 3).round(4).tolist()
    [1.0, 0.5, 0.0]
    """
    r = np.asarray(ranks, dtype=np.float64)
    out: npt.NDArray[np.float64] = np.where(
        _in_top(r, k), 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0
    )
    return out


def hits_per_user(ranks: npt.ArrayLike, k: int) -> npt.NDArray[np.float64]:
    """Each user's HR@k as 1.0 or 0.0 (what `hit_rate` averages)."""
    return _in_top(ranks, k).astype(np.float64)


# Bootstrap draws are made in blocks of about this many indices, whatever the user count.
_BOOT_BLOCK = 4_000_000


def paired_bootstrap(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float]:
    """The mean per-user difference a - b with a paired bootstrap interval: users are resampled
    with replacement (the same users for both, so what they share cancels), the interval is the
    alpha/2 and 1 - alpha/2 percentiles of the resampled means, and `se` their standard
    deviation. `a` and `b` hold one value per user, in the same user order. Empty input gives
    zeros with n = 0.

    >>> out = paired_bootstrap([1.0, 0.5, 0.0, 1.0], [0.5, 0.5, 0.0, 0.5], n_boot=2000)
    >>> out["diff"]  # (0.5 + 0 + 0 + 0.5) / 4
    0.25
    >>> 0.0 <= out["lo"] <= 0.25 <= out["hi"] <= 0.5 and out["se"] > 0
    True
    >>> paired_bootstrap([0.3, 0.1], [0.3, 0.1])["hi"]  # identical: no difference at all
    0.0
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"paired_bootstrap needs two 1-d arrays of the same users, got shapes {x.shape} "
            f"and {y.shape}"
        )
    if not 0 < alpha < 1 or n_boot < 2:
        raise ValueError(
            f"paired_bootstrap: alpha in (0, 1) and n_boot >= 2 needed, got "
            f"alpha={alpha}, n_boot={n_boot}"
        )
    n = x.size
    if n == 0:
        return {"diff": 0.0, "lo": 0.0, "hi": 0.0, "se": 0.0, "n": 0}
    d = x - y
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    block = max(1, _BOOT_BLOCK // n)
    for lo in range(0, n_boot, block):
        rows = min(block, n_boot - lo)
        means[lo : lo + rows] = d[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {
        "diff": float(d.mean()),
        "lo": float(low),
        "hi": float(high),
        "se": float(means.std(ddof=1)),
        "n": n,
    }


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
