"""The data of a tuning run: the instruction prompts of the sampled users (`build_training_data`),
stored as JSONL in S3 (`write_dataset`), and the fixed validation users with the `Validator`
that scores them at every evaluation."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recranker_core.config import Settings
from recranker_core.errors import DataError
from recranker_core.llm.builders import build_inference_prompts
from recranker_core.llm.prompts import Catalog, Prompt
from recranker_core.metrics import DEFAULT_KS, rank_metrics
from recranker_core.store import ArtifactStore, StoredArtifact
from recranker_core.tune_ranker.context import (
    BaseContext,
    BaseHints,
    CandidateHints,
    base_candidate_scores,
)

log = logging.getLogger(__name__)


# Evaluable users whose base candidates are computed to choose the validation users from.
VALIDATION_SCAN_USERS = 20_000


@dataclass
class ValidationSet:
    """Fixed validation users whose validation item is among the base model's candidates (the
    only users a re-ranker can change): their candidates in base order with the base scores,
    and every inference prompt of each user (all three tasks, one shared prefix)."""

    users: npt.NDArray[np.int64]
    targets: npt.NDArray[np.int64]  # each user's validation item
    candidates: npt.NDArray[np.int64]  # [users, N], base order
    base_scores: npt.NDArray[np.float64]  # [users, N]
    prompts: list[list[Prompt]]  # per user, all of its inference prompts
    base_metrics: dict[str, float]
    hit_share: float  # share of evaluable users whose validation item is a candidate
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def positions(self) -> npt.NDArray[np.int64]:
        return np.argmax(self.candidates == self.targets[:, None], axis=1).astype(np.int64)


# Fewer validation users than this make the fused NDCG@3 too noisy to stop on (docs/METHOD.md 5).
MIN_VALIDATION_USERS = 100


# The guard's own users (the validation hits early stopping did not read): fewer than this and
# it falls back to the early-stopping users, and says so. At most `tune.guard_users` are scored.
MIN_GUARD_USERS = 30


def validation_sets(
    ctx: BaseContext, catalog: Catalog, hints: BaseHints, settings: Settings
) -> tuple[ValidationSet, ValidationSet | None]:
    """`settings.tune.valid_users` users (seeded) among those whose validation item is a
    candidate, read at every evaluation to keep the best step; and the guard's users: the other
    such users (at most `tune.guard_users`), read once, on the kept step, so that choosing the step
    does not inflate the gain the guard measures (None when fewer than MIN_GUARD_USERS). Prompts
    take their hints from the candidates' own scoring."""
    from recranker_core.base.evaluate import sample_evaluable_users

    n = settings.retrain.candidates
    evaluable = ctx.data.evaluable_users().astype(np.int64)
    all_evaluable = int(evaluable.size)
    if evaluable.size == 0:
        raise DataError("no evaluable users (3 likes each) to validate the ranker on")
    # Validation users are drawn among those whose item is a candidate: a seeded sample of the
    # evaluable users is enough to find them and to estimate the hit share.
    scan = sample_evaluable_users(ctx.data, VALIDATION_SCAN_USERS, settings.tune.seed)
    if scan is not None:
        evaluable = scan
    cands, scores = base_candidate_scores(ctx, evaluable, "valid", n)
    hit = cands == ctx.data.valid_item[evaluable][:, None]
    hits = np.flatnonzero(hit.any(axis=1))
    if hits.size == 0:
        raise DataError(
            "no validation item is among the base model's candidates: nothing to re-rank"
        )
    wanted = settings.tune.valid_users
    if wanted < MIN_VALIDATION_USERS and hits.size > wanted:
        log.warning(
            "%d validation users: fewer than %d make the fused NDCG@3 that early stopping reads "
            "noisy (RECRANKER_TUNE__VALID_USERS)",
            wanted,
            MIN_VALIDATION_USERS,
        )
    rng = np.random.default_rng(settings.tune.seed)
    keep = np.sort(rng.choice(hits, size=min(wanted, hits.size), replace=False))
    rest = np.setdiff1d(hits, keep)
    if rest.size > settings.tune.guard_users:
        rest = np.sort(rng.choice(rest, size=settings.tune.guard_users, replace=False))
    counts = {
        "evaluable": all_evaluable,
        "scanned": int(evaluable.size),
        "with_item_in_candidates": int(hits.size),
    }

    def subset(rows: npt.NDArray[np.int64]) -> ValidationSet:
        users = evaluable[rows]
        out = ValidationSet(
            users,
            ctx.data.valid_item[users].astype(np.int64),
            cands[rows],
            scores[rows],
            [],
            rank_metrics(np.argmax(hit[rows], axis=1), DEFAULT_KS),
            float(hits.size / evaluable.size),
            dict(counts),
        )
        out.prompts = validation_prompts(ctx, catalog, hints, out, settings.prompts)
        return out

    return subset(keep), subset(rest) if rest.size >= MIN_GUARD_USERS else None


def validation_prompts(
    ctx: BaseContext, catalog: Catalog, hints: Any, valid: ValidationSet, prompt_settings: Any
) -> list[list[Prompt]]:
    """Every inference prompt of each validation user under `prompt_settings` (an adapter's
    own template and history length), hints from the candidates' own order."""
    candidate_hints = CandidateHints(
        hints,
        ctx.data.n_items,
        {int(u): row.tolist() for u, row in zip(valid.users, valid.candidates, strict=True)},
    )
    return [
        build_inference_prompts(
            ctx.data, catalog, candidate_hints, int(u), row.tolist(), "valid", prompt_settings
        )
        for u, row in zip(valid.users, valid.candidates, strict=True)
    ]


# The validation metric tuning keeps the best step by (docs/METHOD.md section 5).
SELECT_METRIC = "fused_ndcg@3"


class Validator:
    """The tuning loop's validation: every task's verbalizer scores of the fixed users, the
    fused ranking's cross-fitted NDCG@3 against the base order of the same candidates (the
    guard's measurement), and the listwise order's NDCG for reference. Keeps each call's
    guard decision, so the best step's decision is known without scoring again."""

    def __init__(
        self, valid: ValidationSet, tokenizer: Any, batch_size: int, seed: int = 0
    ) -> None:
        self.valid = valid
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.decisions: list[Any] = []

    def scored(self, model: Any, prompts: list[list[Prompt]] | None = None) -> list[Any]:
        """The validation users as fusion.ScoredUser, scored by `model`."""
        from recranker_core.batch_rank.fusion import ScoredUser
        from recranker_core.llm.score import score_users

        v = self.valid
        work = [
            (int(u), row.tolist(), mine)
            for u, row, mine in zip(v.users, v.candidates, prompts or v.prompts, strict=True)
        ]
        scores = score_users(model, self.tokenizer, work, batch_size=self.batch_size)
        return [
            ScoredUser(int(s.user), v.base_scores[n], s.pointwise, s.pairwise, s.listwise, pos)
            for n, (s, pos) in enumerate(zip(scores, v.positions.tolist(), strict=True))
        ]

    def decide(self, scored: list[Any]) -> Any:
        from recranker_core.batch_rank.fusion import cross_fit_guard

        return cross_fit_guard(scored, len(scored), k=3, seed=self.seed)

    def __call__(self, model: Any) -> dict[str, float]:
        from recranker_core.batch_rank.fusion import FusedWeights, per_user_ndcg

        scored = self.scored(model)
        decision = self.decide(scored)
        self.decisions.append(decision)
        listwise = FusedWeights(0.0, 0.0, 0.0, 1.0)
        return {
            SELECT_METRIC: float(decision.fused_ndcg),
            "base_ndcg@3": float(decision.base_ndcg),
            "gain": float(decision.gain),
            "se": float(decision.se),
            "listwise_ndcg@3": float(per_user_ndcg(scored, listwise, 3).mean()),
            "listwise_ndcg@10": float(per_user_ndcg(scored, listwise, 10).mean()),
        }


def build_training_data(
    ctx: BaseContext, catalog: Catalog, users: npt.NDArray[np.int64], settings: Settings
) -> tuple[list[Prompt], dict[str, int]]:
    """The instruction prompts of the sampled `users` (`settings.tune.training_data`): on the
    served task (shadow base models of the champion's kind fitted before each user's last
    likes; docs/METHOD.md section 4a), or RecRanker's published recipe."""
    from recranker_core.llm.builders import build_training_prompts
    from recranker_core.tune_ranker.served_data import (
        build_served_prompts,
        shadow_split,
        train_shadow_models,
    )

    if settings.tune.training_data == "published":
        return build_training_prompts(ctx.data, catalog, BaseHints(ctx), users, settings.prompts)
    shadow = shadow_split(ctx.data, settings.tune.cuts_per_user)
    models = train_shadow_models(ctx.kind, shadow, settings.base, ctx.best_epoch)
    prompts, counts = build_served_prompts(
        shadow, models, catalog, users, settings.prompts, settings.retrain.candidates
    )
    counts = {**shadow.counts, **counts}
    log.info(
        "served-task data: %d prompts at %d cuts (the shadow model had the next like among its "
        "%d candidates at %d of them)",
        len(prompts),
        counts["cuts"],
        settings.retrain.candidates,
        counts["shadow_hits"],
    )
    return prompts, counts


def write_dataset(
    prompts: list[Prompt], meta: dict[str, Any], store: ArtifactStore, prefix: str
) -> StoredArtifact:
    """The instruction dataset as JSONL (one prompt per line) with its manifest, under
    `prefix` + the content's sha256: the same prompts are stored once, and a rerun reuses them."""
    import hashlib

    body = "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in prompts).encode()
    prefix = f"{prefix}-{hashlib.sha256(body).hexdigest()[:16]}"
    if store.exists(prefix):
        manifest = store.read_manifest(prefix)
        if manifest.files["prompts.jsonl"].sha256 == hashlib.sha256(body).hexdigest():
            log.info("dataset %s already stored; reusing it", store.uri(prefix))
            return StoredArtifact(store.uri(prefix), prefix, manifest)
    with tempfile.TemporaryDirectory(prefix="recranker-dataset-") as tmp:
        (Path(tmp) / "prompts.jsonl").write_bytes(body)
        return store.put_directory(Path(tmp), prefix, meta)
