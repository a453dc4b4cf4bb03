"""The ranker's evaluation table (docs/METHOD.md sections 1 and 6): HR/NDCG@3/5/10 of the base
model, each single task and the hybrid, on validation and test, averaged over ALL evaluable
users.

A user whose held-out item is not among the base model's N candidates is a miss for every
re-ranker whatever the scores, so only users with a hit are scored by the LLM: the table is
exact, not an estimate. Hybrid weights are either the configured ones or chosen on validation
users only (`choose_weights`); test never decides anything."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from recranker_core.metrics import DEFAULT_KS, rank_metrics
from recranker_core.ranker.hybrid import MODES, Weights, choose_weights, order_for_mode
from recranker_core.ranker.prompts import Catalog, build_inference_prompts

log = logging.getLogger(__name__)

TARGETS = ("valid", "test")


@dataclass
class TargetScores:
    """Everything scored for one target: per evaluable user, the candidates and the position
    of the held-out item among them (-1: not a candidate), and the LLM scores of the hits."""

    target: str
    users: npt.NDArray[np.int64]
    positions: npt.NDArray[np.int64]
    scores: dict[int, Any] = field(default_factory=dict)  # user -> UserScores
    seconds: float = 0.0
    prompt_tokens: int = 0

    def scored(self) -> list[tuple[Any, Any, Any, int]]:
        return [
            (s.pointwise, s.pairwise, s.listwise, int(self.positions[n]))
            for n, u in enumerate(self.users.tolist())
            if (s := self.scores.get(u)) is not None
        ]


@dataclass
class EvalReport:
    table: dict[str, dict[str, dict[str, float]]]  # mode -> target -> metric -> value
    weights: dict[str, dict[str, float]]  # "configured" and "tuned_on_valid"
    counts: dict[str, dict[str, int]]
    positions: dict[str, list[tuple[int, int]]]  # test: (base position, hybrid position) per hit
    seconds: dict[str, float]

    def as_json(self) -> dict[str, Any]:
        return {mode: self.table[mode] for mode in self.table}


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

    from recranker_core.ranker.score import score_users
    from recranker_core.ranker.tuning import base_candidates

    users = ctx.data.evaluable_users().astype(np.int64)
    if max_users is not None and users.size > max_users:
        rng = np.random.default_rng(settings.tune.seed)
        users = np.sort(rng.choice(users, size=max_users, replace=False))
    n = settings.retrain.candidates
    cands = base_candidates(ctx, users, target, n)
    held = (ctx.data.valid_item if target == "valid" else ctx.data.test_item)[users]
    hit = cands == held[:, None]
    positions = np.where(hit.any(axis=1), hit.argmax(axis=1), -1).astype(np.int64)
    out = TargetScores(target, users, positions)
    started = time.perf_counter()
    rows = np.flatnonzero(positions >= 0)
    batch = max(1, settings.rank.users_per_batch)
    for lo in tqdm(
        range(0, rows.size, batch), desc=f"scoring {target}", unit="batch", disable=not progress
    ):
        work = []
        for r in rows[lo : lo + batch].tolist():
            user, row = int(users[r]), cands[r].tolist()
            prompts = build_inference_prompts(
                ctx.data, catalog, hints, user, row, target, settings.prompts
            )
            work.append((user, row, prompts))
        for s in score_users(model, tokenizer, work, batch_size=settings.rank.score_batch_size):
            out.scores[s.user] = s
            out.prompt_tokens += s.prompt_tokens
    out.seconds = time.perf_counter() - started
    log.info(
        "%s: %d evaluable users, %d with the item among %d candidates, scored in %.1f s",
        target,
        users.size,
        rows.size,
        n,
        out.seconds,
    )
    return out


def metrics_for_mode(ts: TargetScores, mode: str, weights: Weights, n: int) -> dict[str, float]:
    """HR/NDCG over all of the target's users: a miss has rank n (beyond every cut-off)."""
    ranks = np.full(ts.users.size, n, dtype=np.int64)
    for i, u in enumerate(ts.users.tolist()):
        pos = int(ts.positions[i])
        if pos < 0:
            continue
        if mode == "base":
            ranks[i] = pos
            continue
        s = ts.scores[u]
        order = order_for_mode(mode, s.pointwise, s.pairwise, s.listwise, weights)
        ranks[i] = int(np.flatnonzero(order == pos)[0])
    return rank_metrics(ranks, DEFAULT_KS)


def build_report(
    targets: Sequence[TargetScores], configured: Weights, n: int, *, tune_step: float = 0.1
) -> EvalReport:
    """The docs/METHOD.md table from scored targets. `hybrid` uses the configured weights;
    `hybrid_tuned` the weights with the best validation NDCG@10 (only with a 'valid' target)."""
    by_target = {t.target: t for t in targets}
    table: dict[str, dict[str, dict[str, float]]] = {m: {} for m in MODES}
    weights = {"configured": configured.as_dict()}
    tuned: Weights | None = None
    if "valid" in by_target:
        valid = by_target["valid"]
        tuned, _ = choose_weights(valid.scored(), valid.users.size, k=10, step=tune_step)
        weights["tuned_on_valid"] = tuned.as_dict()
        table["hybrid_tuned"] = {}
    for t in targets:
        for mode in MODES:
            table[mode][t.target] = metrics_for_mode(t, mode, configured, n)
        if tuned is not None:
            table["hybrid_tuned"][t.target] = metrics_for_mode(t, "hybrid", tuned, n)
    positions: dict[str, list[tuple[int, int]]] = {}
    if "test" in by_target:
        test = by_target["test"]
        pairs = []
        for i, u in enumerate(test.users.tolist()):
            pos = int(test.positions[i])
            if pos >= 0:
                s = test.scores[u]
                order = order_for_mode(
                    "hybrid", s.pointwise, s.pairwise, s.listwise, tuned or configured
                )
                pairs.append((pos, int(np.flatnonzero(order == pos)[0])))
        positions["test"] = pairs
    counts = {
        t.target: {
            "evaluable_users": int(t.users.size),
            "item_in_candidates": int((t.positions >= 0).sum()),
            "prompt_tokens": int(t.prompt_tokens),
        }
        for t in targets
    }
    seconds = {t.target: round(t.seconds, 1) for t in targets}
    return EvalReport(table, weights, counts, positions, seconds)


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
) -> tuple[EvalReport, list[TargetScores]]:
    """Score every target and build the table with the configured hybrid weights (and, with a
    validation target, the weights tuned on it)."""
    scored = [
        score_target(ctx, catalog, hints, model, tokenizer, settings, t, max_users=max_users)
        for t in targets
    ]
    report = build_report(scored, Weights(*settings.rank.weights), settings.retrain.candidates)
    return report, scored
