"""Full-ranking evaluation of a base model on the protocol's split: for each evaluable user,
score every item, drop the items the protocol excludes, and find the held-out item's rank."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import numpy.typing as npt

from recranker_core.base.split import SplitData
from recranker_core.metrics import DEFAULT_KS, rank_metrics

# Scores of all items for a batch of user indices: shape (len(users), n_items).
ScoreFn = Callable[[npt.NDArray[np.int64]], npt.NDArray[np.floating]]

# Scores held at once by a block of users: 16M (64 MB in float32), e.g. 160 users x 100k items.
SCORE_BLOCK_ELEMENTS = 1 << 24


def target_ranks(
    score_fn: ScoreFn,
    data: SplitData,
    target: str,
    users: npt.NDArray[np.int64] | None = None,
    batch_size: int | None = None,
) -> npt.NDArray[np.int64]:
    """0-based rank of each user's held-out item among the items not excluded for `target`.

    Ties count against the held-out item (pessimistic): a scorer gets no credit for failing to
    separate items, and a constant scorer ranks every held-out item last. Users are scored
    `batch_size` at a time (default: users_per_block).
    """
    if target not in ("valid", "test"):
        raise ValueError(f"target must be 'valid' or 'test', not {target!r}")
    held_out = data.valid_item if target == "valid" else data.test_item
    users = data.evaluable_users() if users is None else users
    ranks = np.empty(users.size, dtype=np.int64)
    for start, batch, scores in masked_score_blocks(score_fn, data, target, users, batch_size):
        target_scores = scores[np.arange(batch.size), held_out[batch]]
        higher = (scores > target_scores[:, None]).sum(axis=1)
        ties = (scores == target_scores[:, None]).sum(axis=1) - 1  # minus the item itself
        ranks[start : start + batch.size] = higher + ties
    return ranks


def users_per_block(n_items: int) -> int:
    """Users scored at once so that a block holds about SCORE_BLOCK_ELEMENTS scores (at most
    1,024 users): memory does not grow with the catalogue."""
    return max(1, min(1024, SCORE_BLOCK_ELEMENTS // max(1, n_items)))


def masked_score_blocks(
    score_fn: ScoreFn,
    data: SplitData,
    target: str,
    users: npt.NDArray[np.int64],
    batch_size: int | None = None,
) -> Iterator[tuple[int, npt.NDArray[np.int64], npt.NDArray[np.floating]]]:
    """(offset into `users`, the block's users, their scores of every item) block by block,
    every item excluded for `target` at -inf except each user's held-out item (where the user
    has one), which keeps its score even if an earlier interaction named it. Scores stay in the
    scorer's float type: comparisons are exact in it, and float32 halves memory."""
    held_out = data.valid_item if target == "valid" else data.test_item
    step = batch_size or users_per_block(data.n_items)
    for start in range(0, users.size, step):
        batch = users[start : start + step]
        scores = np.array(score_fn(batch), copy=True)
        if not np.issubdtype(scores.dtype, np.floating):
            scores = scores.astype(np.float64)
        rows = np.flatnonzero(held_out[batch] >= 0)
        items = held_out[batch][rows]
        kept = scores[rows, items]
        excluded_rows, excluded_items = excluded_cells(data, batch, target)
        scores[excluded_rows, excluded_items] = -np.inf
        scores[rows, items] = kept
        yield start, batch, scores


def excluded_cells(
    data: SplitData, users: npt.NDArray[np.int64], target: str
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
    """(row, item) of every item excluded for `target`, rows indexing `users`."""
    if target == "valid":
        indptr, indices = data.seen_valid_indptr, data.seen_valid_indices
    else:
        indptr, indices = data.seen_test_indptr, data.seen_test_indices
    starts, ends = indptr[users], indptr[users + 1]
    lengths = ends - starts
    rows = np.repeat(np.arange(users.size), lengths)
    cols = (
        np.concatenate([indices[s:e] for s, e in zip(starts, ends, strict=True)])
        if users.size
        else np.empty(0, np.int32)
    )
    return rows, cols


def evaluate_scores(
    score_fn: ScoreFn,
    data: SplitData,
    ks: Iterable[int] = DEFAULT_KS,
    *,
    test_score_fn: ScoreFn | None = None,
    users: npt.NDArray[np.int64] | None = None,
) -> dict[str, dict[str, float]]:
    """{"valid": {"hr@3": ..}, "test": {...}} over `users` (default: all evaluable users).
    `test_score_fn`, when given, scores for the test item (a sequence model reading the
    validation like too)."""
    ks = tuple(ks)
    fns = {"valid": score_fn, "test": test_score_fn or score_fn}
    return {
        target: rank_metrics(target_ranks(fns[target], data, target, users), ks)
        for target in ("valid", "test")
    }


def sample_evaluable_users(
    data: SplitData, max_users: int | None, seed: int
) -> npt.NDArray[np.int64] | None:
    """A seeded random `max_users` of the evaluable users (sorted), or None (all of them) when
    unset or when there are not more than that."""
    users = data.evaluable_users()
    if max_users is None or users.size <= max_users:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(users, size=max_users, replace=False)).astype(np.int64)
