"""The ranker's evaluation table (docs/METHOD.md sections 1 and 6): HR/NDCG@3/5/10 of the base
model, each single task, the hybrid, the fused ranking and the published one, on validation and
test, averaged over ALL evaluable users, with each method's paired-bootstrap interval of its
difference to the base model, the guard's decision, and slices by user activity and item
popularity.

A user whose held-out item is not among the base model's N candidates is a miss for every
re-ranker whatever the scores, so only users with a hit are scored by the LLM: the table is
exact, not an estimate. Weights are either the configured ones or chosen on validation users
only (`choose_weights`, `choose_fused_weights`, `cross_fit_guard`); test never decides
anything."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from recranker_core.batch_rank.fusion import (
    FusedWeights,
    GuardDecision,
    ScoredUser,
    cross_fit_guard,
    fused_order,
)
from recranker_core.batch_rank.hybrid import MODES, Weights, choose_weights, order_for_mode
from recranker_core.llm.builders import build_inference_prompts
from recranker_core.llm.prompts import Catalog, Prompt
from recranker_core.metrics import (
    DEFAULT_KS,
    hits_per_user,
    ndcg_per_user,
    paired_bootstrap,
    rank_metrics,
)

log = logging.getLogger(__name__)

TARGETS = ("valid", "test")
# Every row of the table, in the order it is shown.
METHODS = (*MODES, "hybrid_tuned", "fused", "published")
# The metrics whose difference to the base model gets a paired-bootstrap interval.
DIFF_METRICS = ("ndcg@3", "ndcg@10", "hr@3")
# The guard and the fused weights read NDCG at this cut-off (docs/METHOD.md section 6).
GUARD_K = 3
# Train-like counts that bound the user slices (docs/METHOD.md: few-shot users first).
LIKE_SLICES = (("<=10", 0, 10), ("11-50", 11, 50), (">50", 51, None))
POPULARITY_TIERS = ("head", "torso", "tail")


@dataclass
class TargetScores:
    """Everything scored for one target: per evaluable user, the candidates, their base scores
    and the position of the held-out item among them (-1: not a candidate), what the slices
    read, and the LLM scores of the hits."""

    target: str
    users: npt.NDArray[np.int64]
    positions: npt.NDArray[np.int64]
    scores: dict[int, Any] = field(default_factory=dict)  # user -> UserScores
    seconds: float = 0.0
    prompt_tokens: int = 0
    candidates: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty((0, 0), np.int64))
    base_scores: npt.NDArray[np.float64] = field(
        default_factory=lambda: np.empty((0, 0), np.float64)
    )
    likes: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))
    item_tier: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))
    n_evaluable: int = 0  # evaluable users before any sampling

    def scored(self) -> list[tuple[Any, Any, Any, int]]:
        return [
            (s.pointwise, s.pairwise, s.listwise, int(self.positions[n]))
            for n, u in enumerate(self.users.tolist())
            if (s := self.scores.get(u)) is not None
        ]

    def scored_users(self) -> list[ScoredUser]:
        """A ScoredUser per user with LLM scores (the hits), with the candidates' base scores."""
        return [
            ScoredUser(
                u,
                self.base_scores[n],
                s.pointwise,
                s.pairwise,
                s.listwise,
                int(self.positions[n]),
            )
            for n, u in enumerate(self.users.tolist())
            if (s := self.scores.get(u)) is not None
        ]


@dataclass
class EvalReport:
    table: dict[str, dict[str, dict[str, float]]]  # method -> target -> metric -> value
    weights: dict[str, dict[str, float]]  # "configured", "tuned_on_valid", "fused_on_valid"
    counts: dict[str, dict[str, int]]
    positions: dict[str, list[tuple[int, int]]]  # test: (base position, hybrid position) per hit
    seconds: dict[str, float]
    # What decides `published`: the adapter's stored decision (what a `fused` run serves) when
    # given, else the one measured here on the validation users.
    guard: GuardDecision | None = None
    # method -> target -> metric -> [lo, hi] of the paired-bootstrap 95% interval of the
    # per-user difference method - base, over all evaluable users (misses 0 for both).
    diff_ci: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    # slice kind -> slice -> {"users": n, "methods": {method: {"ndcg@3", "diff", "ci"}}}
    slices: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    sample: str | None = None  # says so when the users are a sample, not all of them
    # The guard measured here on the validation users (also when the stored one decides).
    guard_evaluation: GuardDecision | None = None

    def as_json(self) -> dict[str, Any]:
        """The methods' rows at the top level (as stored before: `metrics->'hybrid'->'test'`
        keeps working), then the guard, the intervals, the slices and the weights."""
        out: dict[str, Any] = {mode: self.table[mode] for mode in self.table}
        if self.guard is not None:
            out["guard"] = self.guard.as_json()
        if self.guard_evaluation is not None and self.guard_evaluation is not self.guard:
            out["guard_evaluation"] = self.guard_evaluation.as_json()
        out["diff_ci"] = self.diff_ci
        out["slices"] = self.slices
        out["weights"] = self.weights
        if self.sample:
            out["sample"] = self.sample
        return out


def popularity_tiers(item_likes: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Each item's third of the catalogue by train-like count: 0 head (most liked third), 1
    torso, 2 tail; ties by item index.

    >>> popularity_tiers([5, 0, 9, 1, 1, 7]).tolist()  # order 2, 5, 0, 3, 4, 1
    [1, 2, 0, 1, 2, 0]
    """
    likes = np.asarray(item_likes)
    n = likes.size
    order = np.lexsort((np.arange(n), -likes))
    tiers = np.empty(n, dtype=np.int64)
    tiers[order] = (np.arange(n) * 3) // max(n, 1)
    return tiers


def target_candidates(
    ctx: Any, settings: Any, target: str, *, max_users: int | None = None
) -> TargetScores:
    """Base candidates and their scores for every evaluable user of `target` (a seeded random
    subset of `max_users` when set), the held-out item's position among them, and what the
    slices read (train likes per user, the held-out item's popularity tier). No LLM."""
    from recranker_core.tune_ranker.context import base_candidate_scores

    users = ctx.data.evaluable_users().astype(np.int64)
    n_evaluable = int(users.size)
    if max_users is not None and users.size > max_users:
        rng = np.random.default_rng(settings.tune.seed)
        users = np.sort(rng.choice(users, size=max_users, replace=False))
    n = settings.retrain.candidates
    cands, values = base_candidate_scores(ctx, users, target, n)
    held = (ctx.data.valid_item if target == "valid" else ctx.data.test_item)[users]
    hit = cands == held[:, None]
    positions = np.where(hit.any(axis=1), hit.argmax(axis=1), -1).astype(np.int64)
    item_likes = np.bincount(ctx.data.train_indices, minlength=ctx.data.n_items)
    return TargetScores(
        target,
        users,
        positions,
        candidates=cands,
        base_scores=values,
        likes=np.diff(ctx.data.train_indptr)[users].astype(np.int64),
        item_tier=popularity_tiers(item_likes)[held],
        n_evaluable=n_evaluable,
    )


def target_prompts(
    ctx: Any, catalog: Catalog, hints: Any, ts: TargetScores, settings: Any, rows: Sequence[int]
) -> list[tuple[int, list[int], list[Prompt]]]:
    """(user, candidates, prompts) of the given rows of `ts`. The hints come from the scoring
    that produced these candidates (docs/METHOD.md section 6): their base order is the candidates'
    order, also for the test target of a sequence model (whose train-sequence scores would be
    stale); `hints` only supplies the rating predictions."""
    from recranker_core.tune_ranker.context import CandidateHints

    chosen = {int(ts.users[r]): ts.candidates[r].tolist() for r in rows}
    fresh = CandidateHints(ratings=hints, n_items=ctx.data.n_items, candidates=chosen)
    return [
        (
            user,
            row,
            build_inference_prompts(
                ctx.data, catalog, fresh, user, row, ts.target, settings.prompts
            ),
        )
        for user, row in chosen.items()
    ]


def score_target(
    ctx: Any,
    catalog: Catalog,
    hints: Any,
    model: Any,
    tokenizer: Any,
    settings: Any,
    target: str,
    *,
    max_users: int | None = None,
    progress: bool = True,
) -> TargetScores:
    """Base candidates of every evaluable user (a seeded random subset of `max_users` when
    set) for `target`, and LLM scores of the users whose held-out item is a candidate."""
    from tqdm.auto import tqdm

    from recranker_core.llm.score import score_users

    out = target_candidates(ctx, settings, target, max_users=max_users)
    started = time.perf_counter()
    rows = np.flatnonzero(out.positions >= 0)
    batch = max(1, settings.rank.users_per_batch)
    for lo in tqdm(
        range(0, rows.size, batch), desc=f"scoring {target}", unit="batch", disable=not progress
    ):
        work = target_prompts(ctx, catalog, hints, out, settings, rows[lo : lo + batch].tolist())
        for s in score_users(model, tokenizer, work, batch_size=settings.rank.score_batch_size):
            out.scores[s.user] = s
            out.prompt_tokens += s.prompt_tokens
    out.seconds = time.perf_counter() - started
    log.info(
        "%s: %d evaluable users, %d with the item among %d candidates, scored in %.1f s",
        target,
        out.users.size,
        rows.size,
        settings.retrain.candidates,
        out.seconds,
    )
    return out


# How a method orders one user's candidates from its base scores and LLM scores; None: the
# base order.
Orderer = Callable[[npt.NDArray[np.float64], Any], npt.NDArray[np.int64]] | None


def _task_orderer(mode: str, weights: Weights) -> Orderer:
    def order(base: npt.NDArray[np.float64], s: Any) -> npt.NDArray[np.int64]:
        return order_for_mode(mode, s.pointwise, s.pairwise, s.listwise, weights)

    return order


def _fused_orderer(weights: FusedWeights) -> Orderer:
    def order(base: npt.NDArray[np.float64], s: Any) -> npt.NDArray[np.int64]:
        return fused_order(base, s.pointwise, s.pairwise, s.listwise, weights)

    return order


def method_ranks(ts: TargetScores, order: Orderer, n: int) -> npt.NDArray[np.int64]:
    """Each user's 0-based rank of the held-out item under `order`; a miss gets rank n (beyond
    every cut-off)."""
    ranks = np.full(ts.users.size, n, dtype=np.int64)
    for i, u in enumerate(ts.users.tolist()):
        pos = int(ts.positions[i])
        if pos < 0:
            continue
        if order is None:
            ranks[i] = pos
            continue
        ranked = order(ts.base_scores[i], ts.scores[u])
        ranks[i] = int(np.flatnonzero(ranked == pos)[0])
    return ranks


def metrics_for_mode(ts: TargetScores, mode: str, weights: Weights, n: int) -> dict[str, float]:
    """HR/NDCG of a base/task/hybrid mode over all of the target's users."""
    return rank_metrics(
        method_ranks(ts, None if mode == "base" else _task_orderer(mode, weights), n),
        DEFAULT_KS,
    )


def per_user(ranks: npt.NDArray[np.int64], metric: str) -> npt.NDArray[np.float64]:
    """One user's value of `metric` ('ndcg@k' or 'hr@k') per rank."""
    name, k = metric.split("@")
    return ndcg_per_user(ranks, int(k)) if name == "ndcg" else hits_per_user(ranks, int(k))


def diff_interval(
    ranks: npt.NDArray[np.int64],
    base: npt.NDArray[np.int64],
    metric: str,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """The paired-bootstrap difference (mean, 95% interval, se) of `metric` to the base."""
    return paired_bootstrap(
        per_user(ranks, metric), per_user(base, metric), n_boot=n_boot, seed=seed
    )


def _interval(d: dict[str, float]) -> list[float]:
    return [round(d["lo"], 6), round(d["hi"], 6)]


def _slice_masks(ts: TargetScores) -> dict[str, dict[str, npt.NDArray[np.bool_]]]:
    by_likes = {
        name: (ts.likes >= lo) & (ts.likes <= (hi if hi is not None else np.iinfo(np.int64).max))
        for name, lo, hi in LIKE_SLICES
    }
    by_item = {name: ts.item_tier == t for t, name in enumerate(POPULARITY_TIERS)}
    return {"train_likes": by_likes, "item_popularity": by_item}


def build_report(
    targets: Sequence[TargetScores],
    configured: Weights,
    n: int,
    *,
    tune_step: float = 0.1,
    seed: int = 0,
    n_boot: int = 1000,
    stored: GuardDecision | None = None,
) -> EvalReport:
    """The docs/METHOD.md table from scored targets. `hybrid` uses the configured weights;
    `hybrid_tuned` the weights with the best validation NDCG@10; `fused` the four weights with
    the best validation NDCG@3; `published` what the guard serves: with `stored` (the adapter's
    decision, what a `fused` batch-ranking run serves) its order, else the fused order when
    `cross_fit_guard` on the validation users says so, else the base order. The last three
    need a 'valid' target."""
    by_target = {t.target: t for t in targets}
    weights: dict[str, dict[str, float]] = {"configured": configured.as_dict()}
    methods: dict[str, Orderer] = {"base": None}
    for mode in MODES[1:]:
        methods[mode] = _task_orderer(mode, configured)
    guard: GuardDecision | None = None
    tuned: Weights | None = None
    if "valid" in by_target:
        valid = by_target["valid"]
        tuned, _ = choose_weights(valid.scored(), valid.users.size, k=10, step=tune_step)
        guard = cross_fit_guard(
            valid.scored_users(),
            valid.users.size,
            k=GUARD_K,
            step=tune_step,
            seed=seed,
            n_boot=n_boot,
        )
        weights["tuned_on_valid"] = tuned.as_dict()
        weights["fused_on_valid"] = guard.weights.as_dict()
        methods["hybrid_tuned"] = _task_orderer("hybrid", tuned)
        methods["fused"] = _fused_orderer(guard.weights)
        methods["published"] = _fused_orderer(guard.weights) if guard.served == "fused" else None
    measured = guard
    if stored is not None:
        guard = stored
        methods["published"] = _fused_orderer(stored.weights) if stored.served == "fused" else None
    table: dict[str, dict[str, dict[str, float]]] = {m: {} for m in methods}
    diff_ci: dict[str, dict[str, dict[str, list[float]]]] = {m: {} for m in methods if m != "base"}
    ranks: dict[str, dict[str, npt.NDArray[np.int64]]] = {m: {} for m in methods}
    for t in targets:
        for method, order in methods.items():
            r = method_ranks(t, order, n)
            ranks[method][t.target] = r
            table[method][t.target] = rank_metrics(r, DEFAULT_KS)
        base = ranks["base"][t.target]
        for method in diff_ci:
            diff_ci[method][t.target] = {
                metric: _interval(
                    diff_interval(ranks[method][t.target], base, metric, n_boot=n_boot, seed=seed)
                )
                for metric in DIFF_METRICS
            }
    slices: dict[str, dict[str, dict[str, Any]]] = {}
    if "test" in by_target:
        test = by_target["test"]
        for kind, masks in _slice_masks(test).items():
            slices[kind] = {}
            for name, mask in masks.items():
                base = ranks["base"]["test"][mask]
                rows: dict[str, dict[str, Any]] = {}
                for method in methods:
                    r = ranks[method]["test"][mask]
                    d = diff_interval(r, base, "ndcg@3", n_boot=n_boot, seed=seed)
                    rows[method] = {
                        "ndcg@3": float(ndcg_per_user(r, 3).mean()) if r.size else 0.0,
                        "diff": d["diff"],
                        "ci": _interval(d),
                    }
                slices[kind][name] = {"users": int(mask.sum()), "methods": rows}
    positions: dict[str, list[tuple[int, int]]] = {}
    if "test" in by_target:
        test = by_target["test"]
        hybrid = Weights.for_mode("hybrid", tuned or configured)
        pairs = []
        for i, u in enumerate(test.users.tolist()):
            pos = int(test.positions[i])
            if pos >= 0:
                s = test.scores[u]
                moved = order_for_mode("hybrid", s.pointwise, s.pairwise, s.listwise, hybrid)
                pairs.append((pos, int(np.flatnonzero(moved == pos)[0])))
        positions["test"] = pairs
    counts = {
        t.target: {
            "evaluable_users": int(t.users.size),
            "all_evaluable_users": int(max(t.n_evaluable, t.users.size)),
            "item_in_candidates": int((t.positions >= 0).sum()),
            "prompt_tokens": int(t.prompt_tokens),
        }
        for t in targets
    }
    seconds = {t.target: round(t.seconds, 1) for t in targets}
    sampled = [t for t in targets if t.n_evaluable > t.users.size]
    sample = (
        f"a seeded random sample of {sampled[0].users.size:,} of {sampled[0].n_evaluable:,} "
        "evaluable users (a quick look, not the benchmark: unset RECRANKER_RANK__EVAL_MAX_USERS "
        "or --max-users for all)"
        if sampled
        else None
    )
    return EvalReport(
        table,
        weights,
        counts,
        positions,
        seconds,
        guard,
        diff_ci,
        slices,
        sample=sample,
        guard_evaluation=measured,
    )


def evaluate(
    ctx: Any,
    catalog: Catalog,
    hints: Any,
    model: Any,
    tokenizer: Any,
    settings: Any,
    targets: Sequence[str] = TARGETS,
    *,
    max_users: int | None = None,
    step: float = 0.1,
    stored: GuardDecision | None = None,
) -> tuple[EvalReport, list[TargetScores]]:
    """Score every target and build the table with the configured hybrid weights (and, with a
    validation target, the weights tuned on it, the fused weights and the guard's decision)."""
    scored = [
        score_target(ctx, catalog, hints, model, tokenizer, settings, t, max_users=max_users)
        for t in targets
    ]
    report = build_report(
        scored,
        Weights(*settings.rank.weights),
        settings.retrain.candidates,
        tune_step=step,
        seed=settings.tune.seed,
        stored=stored,
    )
    return report, scored
