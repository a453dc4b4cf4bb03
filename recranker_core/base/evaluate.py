"""Full-ranking evaluation of a base model on the protocol's split: for each evaluable user,
score every item, drop the items the protocol excludes, and find the held-out item's rank; and
which users a measurement read, so that two measurements are compared only on the same users."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

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


@dataclass(frozen=True)
class EvalSample:
    """The users a model's registered metrics were measured on (stored as `metrics["sample"]`).
    Two measurements are comparable only when all four fields are equal: the same users (count
    and sha256 of their sorted ids) of the same split (watermark and like threshold decide the
    held-out items). Another sample size or seed (`base.eval_max_users`, `base.seed`) or a later
    watermark gives other users or other held-out items."""

    n_users: int
    users_hash: str
    data_watermark: str | None
    like_threshold: float

    @classmethod
    def of(cls, data: SplitData, users: npt.NDArray[np.int64] | None) -> EvalSample:
        """The sample `users` of `data` (None: every evaluable user, as `evaluate_scores`)."""
        chosen = data.evaluable_users() if users is None else users
        ids = [data.user_ids[int(u)] for u in chosen]
        return cls(
            n_users=len(ids),
            users_hash=user_ids_hash(ids),
            data_watermark=data.watermark.isoformat() if data.watermark else None,
            like_threshold=float(data.like_threshold),
        )

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any]) -> EvalSample | None:
        """The sample stored with registered metrics; None for metrics registered before samples
        were recorded (their users are unknown)."""
        stored = metrics.get("sample")
        if not isinstance(stored, dict):
            return None
        try:
            return cls(
                n_users=int(stored["n_users"]),
                users_hash=str(stored["users_hash"]),
                data_watermark=stored.get("data_watermark"),
                like_threshold=float(stored["like_threshold"]),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.n_users} users of the split as of {self.data_watermark or 'all data'}"


def user_ids_hash(user_ids: Iterable[str]) -> str:
    """sha256 of the sorted user ids: ids, not indices, because indices differ between splits.

    >>> user_ids_hash(["b", "a"]) == user_ids_hash(["a", "b"])
    True
    """
    return hashlib.sha256("\n".join(sorted(user_ids)).encode()).hexdigest()


def scores_across_splits(
    model: Any, model_user_ids: Sequence[str], model_item_ids: Sequence[str], data: SplitData
) -> ScoreFn:
    """Scores of `data`'s users and items by `model`, which was trained on another split and
    indexes users and items by its own ids (`model_user_ids`, `model_item_ids`), as it would
    serve them. A user it never saw gets no candidates at serving: every item scores the same
    for them (ties count against the held-out item, so they add nothing). An item it never saw
    scores below every item it knows. A sequence model reads each user's train likes of `data`
    (the items it knows)."""
    user_index = {u: n for n, u in enumerate(model_user_ids)}
    item_index = {i: n for n, i in enumerate(model_item_ids)}
    users = np.array([user_index.get(u, -1) for u in data.user_ids], dtype=np.int64)
    items = np.array([item_index.get(i, -1) for i in data.item_ids], dtype=np.int64)
    known = np.flatnonzero(items >= 0)
    sequences = None
    if hasattr(model, "sequence_scores"):
        sequences = [items[s][items[s] >= 0] for s in data.train_sequences]

    def score(batch: npt.NDArray[np.int64]) -> npt.NDArray[np.floating]:
        out = np.zeros((batch.size, data.n_items), dtype=np.float32)
        rows = np.flatnonzero(users[batch] >= 0)
        if rows.size == 0 or known.size == 0:
            return out
        if sequences is not None:
            theirs = model.sequence_scores(batch[rows], sequences)
        else:
            theirs = model.full_scores(users[batch][rows])
        mine = np.asarray(theirs, dtype=np.float32)[:, items[known]]
        out[rows] = (mine.min(axis=1) - 1.0)[:, None]
        out[rows[:, None], known[None, :]] = mine
        return out

    return score
