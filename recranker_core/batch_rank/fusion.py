"""Fused ranking and its guard (docs/METHOD.md section 6): the base model's score joins the three
LLM task utilities, weights chosen on validation users only; the fusion is served only when a
cross-fitted measurement says it beats the base order by more than one standard error.

Pure numpy: the evaluation, the tuning loop and batch ranking all call these functions."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from recranker_core.batch_rank.hybrid import normalise, rerank
from recranker_core.errors import ConfigError, DataError
from recranker_core.metrics import paired_bootstrap

SIGNALS = ("base", "pointwise", "pairwise", "listwise")
SERVED = ("fused", "base")


@dataclass(frozen=True)
class FusedWeights:
    """alpha0..alpha3 of the fused utility: the base score and the three task utilities, each
    z-scored within the user's candidates. Each weight >= 0."""

    base: float
    pointwise: float
    pairwise: float
    listwise: float

    def __post_init__(self) -> None:
        values = self.as_list()
        if not all(np.isfinite(v) and v >= 0 for v in values):
            raise ConfigError(
                f"fused weights {dict(zip(SIGNALS, values, strict=True))}: each weight must be "
                "a finite number >= 0 (base, pointwise, pairwise, listwise)"
            )

    def as_dict(self) -> dict[str, float]:
        return {
            "base": float(self.base),
            "pointwise": float(self.pointwise),
            "pairwise": float(self.pairwise),
            "listwise": float(self.listwise),
        }

    def as_list(self) -> list[float]:
        return [float(self.base), float(self.pointwise), float(self.pairwise), float(self.listwise)]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FusedWeights:
        missing = [s for s in SIGNALS if s not in d]
        if missing:
            raise DataError(
                f"fused weights {dict(d)} lack {', '.join(missing)}: a stored decision needs "
                "all of base, pointwise, pairwise, listwise (run `recranker tune-weights`)"
            )
        return cls(*(float(d[s]) for s in SIGNALS))

    @classmethod
    def from_list(cls, values: Sequence[float]) -> FusedWeights:
        if len(values) != len(SIGNALS):
            raise ConfigError(
                f"fused weights {list(values)}: four numbers needed (base, pointwise, pairwise, "
                "listwise)"
            )
        return cls(*(float(v) for v in values))

    @property
    def tasks(self) -> tuple[str, ...]:
        """The LLM tasks with a non-zero weight: the only prompts worth scoring."""
        return tuple(s for s in SIGNALS[1:] if getattr(self, s) > 0)

    def label(self) -> str:
        return ", ".join(f"{s} {v:.2f}" for s, v in self.as_dict().items())


BASE_ONLY = FusedWeights(1.0, 0.0, 0.0, 0.0)


@dataclass
class ScoredUser:
    """One user whose held-out item may be among the candidates."""

    user: int
    base_scores: npt.NDArray[np.floating]  # the base model's scores, base-rank order (best first)
    pointwise: npt.NDArray[np.floating]  # UserScores fields, same candidate order
    pairwise: npt.NDArray[np.floating]
    listwise: npt.NDArray[np.floating]
    position: int  # position of the held-out item among the candidates, -1 = not a candidate


def fused_utilities(
    base_scores: npt.ArrayLike,
    pointwise: npt.ArrayLike,
    pairwise: npt.ArrayLike,
    listwise: npt.ArrayLike,
    w: FusedWeights,
) -> npt.NDArray[np.float64]:
    """w.base*z(base) + w.pointwise*z(pointwise) + w.pairwise*z(pairwise) + w.listwise*z(listwise),
    z = `hybrid.normalise` (z-score within the user's candidates; constant or missing: zeros).
    Terms are added in that order (the grid search adds them the same way, so both agree on
    ties to the last bit)."""
    signals = [
        np.asarray(x, dtype=np.float64) for x in (base_scores, pointwise, pairwise, listwise)
    ]
    n = signals[0].shape
    for name, s in zip(SIGNALS[1:], signals[1:], strict=True):
        if s.shape != n:
            raise DataError(
                f"{name} scores have shape {s.shape}, the base scores {n}: each signal needs "
                "one value per candidate, in the base order"
            )
    total = np.zeros(n, dtype=np.float64)
    for weight, s in zip(w.as_list(), signals, strict=True):
        if weight:
            total += weight * normalise(s)
    return total


def fused_order(
    base_scores: npt.ArrayLike,
    pointwise: npt.ArrayLike,
    pairwise: npt.ArrayLike,
    listwise: npt.ArrayLike,
    w: FusedWeights,
) -> npt.NDArray[np.int64]:
    """Candidate positions, best first; a stable sort, so ties keep the base rank."""
    return rerank(fused_utilities(base_scores, pointwise, pairwise, listwise, w))


def fused_grid(step: float = 0.1) -> list[FusedWeights]:
    """Every weight quadruple on the simplex whose weights are multiples of `step` (sum 1)."""
    n = round(1 / step) if step > 0 else 0
    if n < 1 or abs(n * step - 1) > 1e-9:
        raise ConfigError(f"fused weight grid step {step} must divide 1 (e.g. 0.1, 0.25, 0.5)")
    return [
        FusedWeights(a / n, b / n, c / n, (n - a - b - c) / n)
        for a, b, c in itertools.product(range(n + 1), repeat=3)
        if a + b + c <= n
    ]


def _tie_order(w: FusedWeights) -> tuple[float, float]:
    """Sort key of the grid: the largest base weight first, then the task weights closest to
    an equal split of the rest (so a flat objective keeps the base order)."""
    share = (1.0 - w.base) / 3
    spread = abs(w.pointwise - share) + abs(w.pairwise - share) + abs(w.listwise - share)
    return (-w.base, round(spread, 9))


@dataclass
class _Stack:
    """Users' z-scored signals padded to one width: z (4, users, width), which cells are real
    candidates, and each user's held-out position (-1: a miss)."""

    z: npt.NDArray[np.float64]
    real: npt.NDArray[np.bool_]
    positions: npt.NDArray[np.int64]


def _stack(users: Sequence[ScoredUser]) -> _Stack:
    width = max((np.asarray(u.base_scores).size for u in users), default=0)
    z = np.zeros((len(SIGNALS), len(users), width), dtype=np.float64)
    real = np.zeros((len(users), width), dtype=bool)
    positions = np.full(len(users), -1, dtype=np.int64)
    for row, u in enumerate(users):
        signals = [u.base_scores, u.pointwise, u.pairwise, u.listwise]
        size = np.asarray(u.base_scores).size
        for f, (name, s) in enumerate(zip(SIGNALS, signals, strict=True)):
            values = np.asarray(s, dtype=np.float64)
            if values.shape != (size,):
                raise DataError(
                    f"user {u.user}: {name} scores have shape {values.shape}, expected ({size},)"
                    " (one per candidate, base order)"
                )
            z[f, row, :size] = normalise(values)
        real[row, :size] = True
        if u.position >= size:
            raise DataError(
                f"user {u.user}: held-out position {u.position} but only {size} candidates"
            )
        positions[row] = u.position
    return _Stack(z, real, positions)


# Grid weights x users x candidates evaluated at once, at most (memory stays ~100 MB).
_GRID_BLOCK = 4_000_000


def _gains(stack: _Stack, weights: npt.NDArray[np.float64], k: int) -> npt.NDArray[np.float64]:
    """NDCG@k of every user (columns) under every weight row (rows) of `weights` (G, 4)."""
    g, (_, n_users, width) = weights.shape[0], stack.z.shape
    out = np.zeros((g, n_users), dtype=np.float64)
    hits = np.flatnonzero(stack.positions >= 0)
    if hits.size == 0 or g == 0:
        return out
    z = stack.z[:, hits]
    pos = stack.positions[hits]
    real = stack.real[hits]
    idx = np.arange(width)
    before = idx[None, :] < pos[:, None]  # candidates ahead of the target in the base order
    block = max(1, _GRID_BLOCK // max(1, hits.size * width))
    for lo in range(0, g, block):
        w = weights[lo : lo + block]
        util = np.zeros((w.shape[0], hits.size, width), dtype=np.float64)
        for f in range(len(SIGNALS)):  # same order of additions as fused_utilities
            util += w[:, f, None, None] * z[f][None]
        util = np.where(real[None], util, -np.inf)
        target = np.take_along_axis(util, pos[None, :, None], axis=2)
        # The target's place in a stable sort on -utility: candidates strictly better, plus
        # those tied with it that come earlier in the base order.
        rank = (util > target).sum(axis=2) + ((util == target) & before[None]).sum(axis=2)
        out[lo : lo + block, hits] = np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)
    return out


def per_user_ndcg(
    users: Sequence[ScoredUser], w: FusedWeights | None, k: int
) -> npt.NDArray[np.float64]:
    """Each user's NDCG@k under the fused order with `w` (None: the base order). A user whose
    held-out item is not a candidate (position -1) scores 0."""
    if w is None:
        pos = np.array([u.position for u in users], dtype=np.int64)
        return np.where((pos >= 0) & (pos < k), 1.0 / np.log2(np.maximum(pos, 0) + 2.0), 0.0)
    return _gains(_stack(users), np.array([w.as_list()]), k)[0]


def choose_fused_weights(
    users: Sequence[ScoredUser], *, k: int = 3, step: float = 0.1
) -> tuple[FusedWeights, float]:
    """The grid weights (each a multiple of `step`, summing to 1) with the best mean NDCG@k over
    `users`, and that mean. Ties go to the largest base weight, then to the task weights closest
    to an equal split, so a flat objective (or no users) keeps the base order (`BASE_ONLY`)."""
    grid = sorted(fused_grid(step), key=_tie_order)
    if not users:
        return BASE_ONLY, 0.0
    stack = _stack(users)
    means = _gains(stack, np.array([w.as_list() for w in grid]), k).mean(axis=1)
    best = int(np.flatnonzero(means >= means.max() - 1e-12)[0])
    return grid[best], float(means[best])


def users_hash(users: Iterable[int]) -> str:
    """sha256 of the sorted user indices: two measurements with the same hash (and user count)
    were made on the same users."""
    text = ",".join(str(int(u)) for u in sorted(users))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class GuardDecision:
    """Whether the fused ranking is served, and the measurement behind it."""

    served: str  # "fused" | "base"
    gain: float  # cross-fitted out-of-sample mean per-user NDCG@k difference fused - base
    se: float  # its paired-bootstrap standard error (resampling users)
    weights: FusedWeights  # chosen on all the given validation users (served when "fused")
    k: int
    n_users: int
    n_hits: int
    base_ndcg: float  # out-of-sample, over the n_users
    fused_ndcg: float
    users_hash: str  # sha256 of the sorted user indices ("measured on the same users")
    reason: str  # one sentence in words

    def as_json(self) -> dict[str, Any]:
        return {
            "served": self.served,
            "gain": float(self.gain),
            "se": float(self.se),
            "weights": self.weights.as_dict(),
            "k": int(self.k),
            "n_users": int(self.n_users),
            "n_hits": int(self.n_hits),
            "base_ndcg": float(self.base_ndcg),
            "fused_ndcg": float(self.fused_ndcg),
            "users_hash": self.users_hash,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GuardDecision:
        fields = (
            "served",
            "gain",
            "se",
            "weights",
            "k",
            "n_users",
            "n_hits",
            "base_ndcg",
            "fused_ndcg",
            "users_hash",
            "reason",
        )
        missing = [f for f in fields if f not in d]
        if missing or d.get("served") not in SERVED:
            raise DataError(
                f"stored fusion decision {dict(d)} is incomplete (missing {missing}) or serves "
                f"{d.get('served')!r}, not one of {SERVED}: run `recranker tune-weights` to "
                "measure it again"
            )
        return cls(
            served=str(d["served"]),
            gain=float(d["gain"]),
            se=float(d["se"]),
            weights=FusedWeights.from_dict(d["weights"]),
            k=int(d["k"]),
            n_users=int(d["n_users"]),
            n_hits=int(d["n_hits"]),
            base_ndcg=float(d["base_ndcg"]),
            fused_ndcg=float(d["fused_ndcg"]),
            users_hash=str(d["users_hash"]),
            reason=str(d["reason"]),
        )


def cross_fit_guard(
    users: Sequence[ScoredUser],
    n_total: int,
    *,
    k: int = 3,
    step: float = 0.1,
    seed: int = 0,
    n_boot: int = 1000,
) -> GuardDecision:
    """Decide whether the fused ranking is served, measured out of sample.

    `users` are the scored validation users (those whose item is among the candidates);
    `n_total` counts every evaluable validation user: the others are misses for both orders
    (0 each), so they dilute the mean gain. The users are split into two seeded random halves;
    weights chosen on one half are measured on the other, and the reverse, so every user's
    fused - base NDCG@k difference is out of sample. gain = the mean difference over `n_total`,
    se = its paired-bootstrap standard error. "fused" is served only when gain > se; the
    weights served are chosen on all `users` (more data than either half had)."""
    if n_total < len(users):
        raise DataError(
            f"cross_fit_guard: {len(users)} scored users but n_total = {n_total}; n_total counts "
            "every evaluable validation user, the scored ones included"
        )
    ordered = sorted(users, key=lambda u: u.user)  # the split must not depend on input order
    n = len(ordered)
    n_hits = sum(u.position >= 0 for u in ordered)
    digest = users_hash(u.user for u in ordered)
    weights, _ = choose_fused_weights(ordered, k=k, step=step)
    base = np.zeros(n_total)
    base[:n] = per_user_ndcg(ordered, None, k)
    if n < 2:
        return GuardDecision(
            "base",
            0.0,
            0.0,
            weights,
            k,
            n_total,
            n_hits,
            float(base.mean()) if n_total else 0.0,
            float(base.mean()) if n_total else 0.0,
            digest,
            f"only {n} validation user(s) with the item among the candidates: too few to "
            "measure the fusion, the base order is served",
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    halves = (np.sort(perm[: n // 2]), np.sort(perm[n // 2 :]))
    fused = np.zeros(n_total)
    for fit, measure in (halves, halves[::-1]):
        w, _ = choose_fused_weights([ordered[i] for i in fit], k=k, step=step)
        fused[measure] = per_user_ndcg([ordered[i] for i in measure], w, k)
    boot = paired_bootstrap(fused, base, n_boot=n_boot, seed=seed)
    gain, se = boot["diff"], boot["se"]
    served = "fused" if gain > se else "base"
    measured = (
        f"fused {gain:+.4f} (se {se:.4f}) over the base order on {n_total} validation users "
        f"({n_hits} with the item among the candidates, NDCG@{k}, cross-fitted)"
    )
    reason = (
        f"{measured}: served"
        if served == "fused"
        else f"{measured}: not more than one standard error, the base order is served"
    )
    return GuardDecision(
        served,
        float(gain),
        float(se),
        weights,
        k,
        n_total,
        n_hits,
        float(base.mean()),
        float(fused.mean()),
        digest,
        reason,
    )
