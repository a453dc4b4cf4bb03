"""One ranker tuning run, as steps a flow calls in order: the champion base model and its split,
hints, sampled users, the instruction dataset (JSONL in S3), the validation set, and the tuned
adapter stored with its manifest, registered and gated against the champion adapter."""

from __future__ import annotations

import json
import logging
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recranker_core import registry
from recranker_core.base.candidates import fetch_model
from recranker_core.base.split import SplitData
from recranker_core.config import Settings
from recranker_core.errors import ArtifactIntegrityError, ConfigError, DataError
from recranker_core.metrics import DEFAULT_KS, rank_metrics
from recranker_core.ranker.prompts import (
    TEMPLATES,
    Catalog,
    Prompt,
    build_inference_prompts,
)
from recranker_core.store import ArtifactStore, StoredArtifact, fetch_registered

log = logging.getLogger(__name__)

# What `make demo` runs: minutes on 2 CPU cores, too small a budget to learn much.
CPU_DEMO: dict[str, dict[str, Any]] = {
    "sampling": {"users": 24},
    "prompts": {"history_max": 8},
    "tune": {
        "epochs": 1,
        "batch_size": 4,
        "grad_accumulation": 2,
        # Two validations (the untuned step 0 and the last step): one of 32 users costs about a
        # minute on 2 cores, as does the guard's 48; the demo's budget is about 15 minutes.
        "eval_every": 6,
        "valid_users": 32,
        "guard_users": 48,
        "max_length": 768,
        "warmup_steps": 2,
        "cuts_per_user": 2,
        "lr": 5e-4,
    },
}

# The best tuning that fits about an hour on 2 CPU cores (docs/METHOD.md section 5; the choices
# and how they were made are in README's profile table and BENCHMARKS.md).
CPU: dict[str, dict[str, Any]] = {
    "sampling": {"users": 96},
    "prompts": {"history_max": 20},
    "tune": {
        "epochs": 1,
        "batch_size": 2,
        "grad_accumulation": 4,
        "eval_every": 12,
        "valid_users": 100,
        "max_length": 1024,
        "warmup_steps": 5,
        "cuts_per_user": 3,
        "lr": 5e-4,
        "patience": 3,
    },
}

PROFILES: dict[str, dict[str, dict[str, Any]]] = {"cpu-demo": CPU_DEMO, "cpu": CPU}
_PROFILE_NAMES = {"cpu-demo": "CPU demo profile", "cpu": "CPU profile"}


def effective_settings(settings: Settings) -> tuple[Settings, str]:
    """The settings a run uses: as given (`full`), or with a CPU profile's sample and budget
    laid over them. Returns them with a line saying which."""
    from recranker_core.ranker.tune import OBJECTIVES

    if settings.tune.objective not in OBJECTIVES:
        raise ConfigError(
            f"RECRANKER_TUNE__OBJECTIVE={settings.tune.objective!r}: use one of "
            f"{', '.join(OBJECTIVES)}"
        )
    profile = settings.tune.profile
    if profile == "full":
        return settings, "profile full (settings as given)"
    if profile not in PROFILES:
        raise ConfigError(
            f"RECRANKER_TUNE__PROFILE={profile!r}: use 'full', {', '.join(map(repr, PROFILES))}"
        )
    data = settings.model_dump()
    for section, values in PROFILES[profile].items():
        data[section].update(values)
    shown = ", ".join(
        f"{s}.{k}={v}" for s, vals in PROFILES[profile].items() for k, v in vals.items()
    )
    return type(settings).model_validate(data), f"{_PROFILE_NAMES[profile]} ({shown})"


@dataclass
class BaseContext:
    """The champion base model, the split it was trained on, and the rating model behind the
    pointwise hint (the champion's, stored by its retrain; or fitted by this tuning run)."""

    model_id: int
    kind: str
    model: Any  # BaseRecommender
    data: SplitData
    regressor: Any = None  # BiasedMF, trained on the same split's train-period ratings
    best_epoch: int | None = None  # the champion's early-stopped epoch (its shadow trains so long)
    # Where `regressor` comes from, as the adapter's lineage records it: `stored_rating_model`
    # of the champion ({"source": "base_model", "model_id", "file", "sha256", "rmse"}), or
    # {"source": "tuning", ...} when this run fitted it.
    rating_model: dict[str, Any] = field(default_factory=dict)


def load_base_context(
    database_url: str, store: ArtifactStore, cache_root: Path, like_threshold: float
) -> BaseContext:
    """The champion from the store (every file checked against the registry's digests), with
    the rating model stored beside it when it has one, and the split as of its watermark; the
    two must index users and items the same way, or the data changed under the champion."""
    from recranker_core.base.models import read_state
    from recranker_core.base.rating import RATING_STEM, stored_rating_model
    from recranker_core.base.split import load_split

    record = registry.champion(database_url)
    if record is None:
        raise DataError("no champion base model: run `recranker train-base` first")
    directory = fetch_model(record, store, cache_root)
    model = read_state(directory, "model")
    data = load_split(database_url, like_threshold=like_threshold, watermark=record.data_watermark)
    users = json.loads((directory / "user_ids.json").read_text())
    items = json.loads((directory / "item_ids.json").read_text())
    if users != data.user_ids or items != data.item_ids:
        raise DataError(
            f"the interactions up to the champion's watermark ({record.data_watermark}) no "
            f"longer match champion model {record.model_id}'s users/items (late data arrived): "
            "retrain the base models (`recranker train-base`) before tuning"
        )
    if hasattr(model, "set_sequences"):
        model.set_sequences(data.train_sequences)
    log.info(
        "base model %d (%s), split as of %s: %s",
        record.model_id,
        record.kind,
        data.watermark,
        data.stats,
    )
    best = record.lineage.get("best_epoch")
    rating = stored_rating_model(record)
    return BaseContext(
        record.model_id,
        record.kind,
        model,
        data,
        regressor=read_state(directory, RATING_STEM) if rating else None,
        best_epoch=None if best is None else int(best),
        rating_model=rating or {},
    )


def hint_rating_model(ctx: BaseContext, settings: Settings) -> str:
    """Make sure `ctx` has the rating model behind the pointwise hint: the champion's, stored by
    its retrain (no fit), or, for a champion stored without one (trained before the retrain
    stored it), one fitted now on its split (the adapter then carries it). Returns the line
    that says which, also logged."""
    if ctx.regressor is not None:
        line = (
            f"hint rating model: reused champion model {ctx.model_id}'s, trained by its retrain "
            f"(held-out RMSE {_rmse(ctx.rating_model.get('rmse'))}, sha256 "
            f"{str(ctx.rating_model.get('sha256', ''))[:12]}); no rating-model fit"
        )
        log.info("%s", line)
        return line
    log.info(
        "champion model %d was stored without a rating model (trained before the base retrain "
        "stored one with its models): fitting one on its split for the pointwise hint; the "
        "adapter will carry it",
        ctx.model_id,
    )
    train_hint_regressor(ctx, settings)
    line = (
        f"hint rating model: fitted by this run, champion model {ctx.model_id} has none "
        f"(held-out RMSE {_rmse(ctx.rating_model.get('rmse'))}); stored with the adapter"
    )
    log.info("%s", line)
    return line


def _rmse(value: Any) -> str:
    return "unknown" if value is None else f"{float(value):.4f}"


def train_hint_regressor(ctx: BaseContext, settings: Settings) -> None:
    """Fit the biased-MF rating model behind the pointwise hint on `ctx`'s train-period ratings
    (for a champion stored without one; `hint_rating_model` says when)."""
    from recranker_core.base.rating import train_rating_model

    result = train_rating_model(ctx.data, settings.base)
    ctx.regressor = result.model
    ctx.rating_model = {
        "source": "tuning",
        "rmse": result.metrics["valid"].get("rmse"),
        "seconds": round(result.seconds, 2),
    }


class BaseHints:
    """Hints from the base models (train period only): the ranker's item scores and the rating
    model's predictions (`ratings`, anything with predict_ratings in `ctx`'s indices, e.g. an
    adapter's own rating model; default: `ctx`'s)."""

    def __init__(self, ctx: BaseContext, ratings: Any = None) -> None:
        if ctx.regressor is None and ratings is None:
            raise DataError("no rating model for the hints (hint_rating_model first)")
        self.ctx = ctx
        self.ratings = ratings
        self._scores: dict[int, npt.NDArray[np.floating]] = {}

    def item_scores(self, user: int) -> npt.NDArray[np.floating]:
        if user not in self._scores:
            if len(self._scores) > 4096:
                self._scores.clear()
            self._scores[user] = self.ctx.model.full_scores(np.array([user], dtype=np.int64))[0]
        return self._scores[user]

    def predict_ratings(self, user: int, items: npt.NDArray[np.int64]) -> npt.NDArray[np.floating]:
        items = np.asarray(items, dtype=np.int64)
        if self.ratings is not None:
            theirs: npt.NDArray[np.floating] = self.ratings.predict_ratings(user, items)
            return theirs
        predicted: npt.NDArray[np.floating] = self.ctx.regressor.predict(
            np.full(items.size, user), items
        )
        return predicted


def sample_training_users(ctx: BaseContext, settings: Settings) -> Any:
    from recranker_core.ranker.sampling import sample_users

    like_counts = np.diff(ctx.data.train_indptr)
    return sample_users(like_counts, ctx.model.user_embeddings(), settings.sampling)


def base_candidates(
    ctx: BaseContext, users: npt.NDArray[np.int64], target: str, n: int
) -> npt.NDArray[np.int64]:
    """The base model's top-n items per user for `target` (see `base_candidate_scores`)."""
    return base_candidate_scores(ctx, users, target, n)[0]


def base_candidate_scores(
    ctx: BaseContext, users: npt.NDArray[np.int64], target: str, n: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The base model's top-n items per user for `target`, best first, and their scores, the
    protocol's exclusions applied (the held-out item kept), scored in blocks like the
    full-ranking evaluation. For the test target a sequence model reads the sequence that
    includes the validation like: these scores are the ones every hint of that target uses."""
    from recranker_core.base.evaluate import ScoreFn, masked_score_blocks

    score_fn: ScoreFn = ctx.model.full_scores
    if hasattr(ctx.model, "sequence_scores"):
        sequences = ctx.data.sequences_for(target)

        def score_fn(batch: npt.NDArray[np.int64]) -> npt.NDArray[np.floating]:
            return ctx.model.sequence_scores(batch, sequences)

    out = np.empty((users.size, n), dtype=np.int64)
    values = np.empty((users.size, n), dtype=np.float64)
    for start, batch, scores in masked_score_blocks(score_fn, ctx.data, target, users):
        top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        out[start : start + batch.size] = top
        values[start : start + batch.size] = np.take_along_axis(scores, top, axis=1)
    return out, values


class CandidateHints:
    """Hints that come from the scoring that produced the candidates (docs/METHOD.md section 6): the
    base order and the pairwise hints follow the candidates' order (best first; every other
    item ranks below them), the pointwise hint is the rating model's. Evaluation and serving
    use it, so that a prompt's base order is exactly its candidates' order, ties included."""

    def __init__(self, ratings: Any, n_items: int, candidates: dict[int, list[int]]) -> None:
        self.ratings = ratings  # anything with predict_ratings(user, items)
        self.n_items = n_items
        self.candidates = candidates  # user -> candidate items, best first

    def item_scores(self, user: int) -> npt.NDArray[np.floating]:
        items = np.asarray(self.candidates[user], dtype=np.int64)
        scores = np.full(self.n_items, -np.inf)
        # Strictly decreasing in candidate order: hints only read the order of these scores.
        scores[items] = np.arange(items.size, 0, -1, dtype=np.float64)
        return scores

    def predict_ratings(self, user: int, items: npt.NDArray[np.int64]) -> npt.NDArray[np.floating]:
        predicted: npt.NDArray[np.floating] = self.ratings.predict_ratings(user, items)
        return predicted


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
        from recranker_core.ranker.fusion import ScoredUser
        from recranker_core.ranker.score import score_users

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
        from recranker_core.ranker.fusion import cross_fit_guard

        return cross_fit_guard(scored, len(scored), k=3, seed=self.seed)

    def __call__(self, model: Any) -> dict[str, float]:
        from recranker_core.ranker.fusion import FusedWeights, per_user_ndcg

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
    from recranker_core.ranker.prompts import build_training_prompts
    from recranker_core.ranker.served_data import (
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


def adapter_prompt_settings(record: registry.AdapterRecord, prompts: Any) -> Any:
    """`prompts` (PromptSettings) with what an adapter was tuned with: its template, history
    length and pair scheme score it (the settings choose them for new tuning only)."""
    tuned = dict(record.lineage.get("prompts") or {})
    update = {"template": record.template_version}
    for key in ("history_max", "pair_scheme", "pairwise_pairs", "listwise_top"):
        if key in tuned:
            update[key] = tuned[key]
    if all(getattr(prompts, k) == v for k, v in update.items()):
        return prompts
    return prompts.model_copy(update=update)


def run_tuning(
    ctx: BaseContext,
    prompts: list[Prompt],
    catalog: Catalog,
    sample: Any,
    dataset_uri: str,
    settings: Settings,
    database_url: str,
    store: ArtifactStore,
    *,
    max_steps: int | None = None,
    start: registry.AdapterRecord | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """Tune an adapter on `prompts`, keep the step whose fused ranking scores best on the fixed
    validation users, decide whether its fusion is served (the guard), gate it against the
    base order and the champion adapter on the same users, store and register it."""
    from recranker_core.ranker.backbone import load_backbone
    from recranker_core.ranker.prompts import verbalizer_ids
    from recranker_core.ranker.tune import OBJECTIVES, encode_for, tune

    objective = settings.tune.objective
    loss_fn = OBJECTIVES[objective](settings.tune)
    backbone = load_backbone(settings.backbone, settings.home)
    verbalizer_ids(backbone.tokenizer, settings.retrain.candidates)  # fails early, clearly
    cache = settings.home / "cache" / "artifacts"
    init_adapter = None
    if start is not None:
        init_adapter = fetch_adapter(start, store, cache, backbone.backbone_hash)
    examples, dropped = encode_for(prompts, backbone.tokenizer, settings.tune, catalog)
    hints = BaseHints(ctx)
    valid, guard = validation_sets(ctx, catalog, hints, settings)
    log.info(
        "%s: %d training examples (%d left out), %d validation users (%.1f%% of evaluable users "
        "have their validation item among the candidates); base ndcg@3 on them %.4f",
        objective,
        len(examples),
        dropped,
        len(valid.users),
        100 * valid.hit_share,
        valid.base_metrics["ndcg@3"],
    )
    validator = Validator(
        valid, backbone.tokenizer, settings.rank.score_batch_size, seed=settings.tune.seed
    )
    run_name = f"{ctx.model_id}-{objective}" + (f"-{experiment}" if experiment else "")
    if start is not None:
        run_name += f"-from-{start.adapter_id}"
    result = tune(
        backbone.model,
        backbone.tokenizer,
        examples,
        validator,
        settings.tune,
        settings.home / "tuning" / run_name,
        loss_fn=loss_fn,
        max_steps=max_steps,
        init_adapter=init_adapter,
        select=SELECT_METRIC,
    )
    decision, guard_validator = _guard_decision(result, validator, guard, settings)
    log.info("guard: %s", decision.reason)
    gate = None
    if experiment is None:
        champion = registry.champion_adapter(database_url)
        mine = None
        if champion is not None:
            mine = champion_on_users(
                champion, guard_validator, ctx, catalog, settings, store, database_url
            )
        gate = registry.adapter_gate(decision, mine, settings.tune.promotion_tolerance)
    started_from = {}
    if start is not None:
        # DMPO's policy starts from this adapter and its reference is this adapter, frozen.
        started_from = {"init_adapter_id": start.adapter_id, "init_adapter_uri": start.artifact_uri}
    metrics: dict[str, Any] = {
        "valid": result.best_metrics,
        "valid_base": valid.base_metrics,
        "fusion": decision.as_json(),
    }
    outcome = publish_adapter(
        result.adapter_dir,
        ctx,
        {
            "objective": objective,
            "backbone_id": backbone.backbone_id,
            "backbone_hash": backbone.backbone_hash,
            "template_version": settings.prompts.template,
            "base_model_id": ctx.model_id,
            "data_watermark": ctx.data.watermark.isoformat() if ctx.data.watermark else None,
            "sampled_users": int(len(sample.users)),
            "sampled_distinct_users": int(sample.counts.get("final_distinct", 0)),
            "dataset": dataset_uri,
            "hyperparameters": settings.tune.model_dump(mode="json"),
            "lineage": {
                "sampling": sample.counts,
                "prompts": settings.prompts.model_dump(mode="json"),
                "training_data": settings.tune.training_data,
                "validation_users": len(valid.users),
                "validation_hit_share": valid.hit_share,
                "rating_model": ctx.rating_model,
                "best_step": result.best_step,
                "steps": result.steps,
                "device": backbone.device,
                "dtype": backbone.dtype,
                **started_from,
                **({"experiment": experiment} if experiment else {}),
            },
        },
        metrics,
        store,
        database_url,
        gate,
    )
    return {
        "note": kept_start_note(result.steps, result.best_step, objective),
        "adapter_id": outcome.adapter_id,
        "promoted": outcome.promoted,
        "reason": outcome.reason,
        "artifact_uri": outcome.artifact_uri,
        "metrics": metrics,
        "fusion": decision.as_json(),
        "history": result.history,
        "steps": result.steps,
        "best_step": result.best_step,
        "seconds": round(result.seconds, 1),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "resumed_from": result.resumed_from,
        "backbone": backbone.backbone_id,
        "device": backbone.device,
        "objective": objective,
        "training_examples": len(examples),
        "rating_model": ctx.rating_model,
        **started_from,
    }


def _guard_decision(
    result: Any, validator: Validator, guard: ValidationSet | None, settings: Settings
) -> tuple[Any, Validator]:
    """The guard's decision on the kept adapter, and the validator of the users it read: the
    guard's own users (early stopping never read them), else the early-stopping users' decision
    at the kept step, said to be optimistic (the best of several evaluations)."""
    from dataclasses import replace

    from peft import PeftModel

    from recranker_core.ranker.backbone import load_backbone

    steps = [int(h["step"]) for h in result.history]
    if guard is None and len(validator.decisions) == len(steps) and result.best_step in steps:
        decision = validator.decisions[steps.index(result.best_step)]
        return _optimistic(decision), validator
    fresh = load_backbone(settings.backbone, settings.home)
    model = PeftModel.from_pretrained(fresh.model, result.adapter_dir)
    model.eval()
    target = (
        validator
        if guard is None
        else Validator(guard, validator.tokenizer, validator.batch_size, validator.seed)
    )
    target(model)
    decision = target.decisions[-1]
    if guard is None:
        decision = _optimistic(decision)
    else:
        decision = replace(decision, reason=decision.reason + " (the guard's own users)")
    return decision, target


def _optimistic(decision: Any) -> Any:
    from dataclasses import replace

    return replace(
        decision,
        reason=decision.reason + f" (too few validation users beside the early-stopping ones "
        f"for a guard of its own, under {MIN_GUARD_USERS}: measured on the users that chose "
        "the step, an optimistic reading)",
    )


def champion_on_users(
    champion: registry.AdapterRecord,
    validator: Validator,
    ctx: BaseContext,
    catalog: Catalog,
    settings: Settings,
    store: ArtifactStore,
    database_url: str,
) -> Any:
    """The champion adapter's guard decision on the candidate's validation users: the stored
    one when it was measured on the same users, else measured now with the champion's own
    prompt settings and rating model (the one it was tuned with). None when the champion cannot
    run on the configured backbone (it could not be served either; the candidate is then
    compared with the base order only)."""
    from peft import PeftModel

    from recranker_core.base.rating import RatingHints, adapter_rating_model
    from recranker_core.ranker.backbone import load_backbone
    from recranker_core.ranker.fusion import GuardDecision, users_hash

    valid = validator.valid
    stored = champion.metrics.get("fusion")
    if stored:
        decision = GuardDecision.from_json(stored)
        if decision.users_hash == users_hash(valid.users.tolist()) and decision.k == 3:
            return decision
    fresh = load_backbone(settings.backbone, settings.home)
    if champion.backbone_hash != fresh.backbone_hash:
        log.warning(
            "champion adapter %s was tuned on another backbone: the candidate is compared with "
            "the base order only",
            champion.label,
        )
        return None
    cache = settings.home / "cache" / "artifacts"
    directory = fetch_adapter(champion, store, cache, fresh.backbone_hash)
    model = PeftModel.from_pretrained(fresh.model, directory)
    model.eval()
    rating = adapter_rating_model(champion, directory, database_url, store, cache)
    hints = BaseHints(ctx, RatingHints(rating, ctx.data))
    prompts = validation_prompts(
        ctx, catalog, hints, valid, adapter_prompt_settings(champion, settings.prompts)
    )
    decision = validator.decide(validator.scored(model, prompts))
    log.info("champion %s on the same validation users: %s", champion.label, decision.reason)
    return decision


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


@dataclass
class AdapterOutcome:
    adapter_id: int
    promoted: bool
    reason: str
    artifact_uri: str
    prefix: str


def publish_adapter(
    adapter_dir: Path,
    ctx: BaseContext,
    manifest_meta: dict[str, Any],
    metrics: dict[str, dict[str, float]],
    store: ArtifactStore,
    database_url: str,
    decision: registry.GateDecision | None,
) -> AdapterOutcome:
    """Store the adapter + metrics with a manifest, register it, and promote or reject it as the
    gate `decision` says (`adapter_gate`: its fused ranking against the base order and the
    champion adapter on the same users). Without a decision (an experiment's adapters) it stays
    a candidate: never champion, never rejected.

    The rating model it was tuned with is named in its lineage (`rating_model`); the adapter
    carries a copy only when this run fitted it (a champion stored without one): see
    `base.rating.adapter_rating_model` for why and how serving finds it."""
    import shutil

    from recranker_core.base.models import write_state
    from recranker_core.base.rating import ADAPTER_STEM

    with tempfile.TemporaryDirectory(prefix="recranker-adapter-") as tmp:
        local = Path(tmp) / "adapter"
        shutil.copytree(adapter_dir, local)
        if ctx.rating_model.get("model_id") is None:
            write_state(ctx.regressor, local, ADAPTER_STEM)
            # The rating model's own index of users and items (the split it was trained on),
            # so that serving maps ids correctly whatever base model is champion by then.
            (local / "user_ids.json").write_text(json.dumps(ctx.data.user_ids))
            (local / "item_ids.json").write_text(json.dumps(ctx.data.item_ids))
        (local / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        stamp = ctx.data.watermark.strftime("%Y%m%dT%H%M%S") if ctx.data.watermark else "all"
        prefix = f"adapters/{manifest_meta['objective']}/{stamp}-{uuid.uuid4().hex[:8]}"
        stored = store.put_directory(local, prefix, {**manifest_meta, "metrics": metrics})
    adapter_id = registry.register_adapter(
        database_url,
        objective=manifest_meta["objective"],
        backbone_id=manifest_meta["backbone_id"],
        backbone_hash=manifest_meta["backbone_hash"],
        template_version=manifest_meta["template_version"],
        base_model_id=ctx.model_id,
        hyperparameters=manifest_meta.get("hyperparameters", {}),
        metrics=metrics,
        data_watermark=ctx.data.watermark,
        artifact_uri=stored.uri,
        files={path: entry.sha256 for path, entry in stored.manifest.files.items()},
        lineage={"prefix": stored.prefix, **manifest_meta.get("lineage", {})},
    )
    if decision is None:
        reason = "experiment adapter: registered as a candidate, not gated"
        return AdapterOutcome(adapter_id, False, reason, stored.uri, stored.prefix)
    if decision.promote:
        registry.promote_adapter(database_url, adapter_id, decision.reason)
    else:
        registry.reject_adapter(database_url, adapter_id, decision.reason)
    return AdapterOutcome(adapter_id, decision.promote, decision.reason, stored.uri, stored.prefix)


# The registry keeps every adapter; a DMPO run looks this far back for its SFT adapter.
_ADAPTER_LOOKBACK = 10_000


def kept_start_note(steps: int, best_step: int, objective: str) -> str | None:
    """In words, when early stopping kept the starting point of a run that took steps: the
    stored adapter then scores like where it started, which a promotion line alone hides."""
    if best_step != 0 or steps <= 0:
        return None
    start = (
        "the SFT adapter it started from"
        if objective == "dmpo"
        else "the untuned backbone (LoRA starts at zero)"
    )
    return (
        f"kept step 0 of {steps}: no validated step beat the starting point, so this adapter "
        f"scores like {start}; tune with more data or steps, or a lower learning rate"
    )


def sft_start_adapter(database_url: str, template: str) -> registry.AdapterRecord:
    """The SFT adapter a DMPO run starts from and keeps frozen as its reference: the champion
    adapter when it is an SFT adapter, else the SFT adapter that was champion most recently
    (an ALRO or DMPO adapter may be champion now), tuned with prompt template `template`."""
    sft = [
        a
        for a in registry.list_adapters(database_url, limit=_ADAPTER_LOOKBACK)
        if a.objective == "sft" and a.promoted_at is not None and a.template_version == template
    ]
    if not sft:
        raise ConfigError(
            "objective dmpo starts from a champion SFT adapter (its policy and frozen "
            f"reference), and no SFT adapter for prompt template {template} has been "
            "champion: run `recranker tune --objective sft` first (with the same "
            "RECRANKER_PROMPTS__TEMPLATE)"
        )
    champion = [a for a in sft if a.status == "champion"]
    if champion:
        return champion[0]
    return max(sft, key=lambda a: (a.promoted_at, a.adapter_id))


def fetch_adapter(
    record: registry.AdapterRecord,
    store: ArtifactStore,
    cache_root: Path,
    backbone_hash: str,
) -> Path:
    """The adapter's local copy, every file checked against the registry's digests; refused
    when built for another backbone or another prompt template than this code writes."""
    if record.backbone_hash != backbone_hash:
        raise ArtifactIntegrityError(
            f"adapter {record.adapter_id} was tuned on backbone {record.backbone_id} "
            f"(sha256 {record.backbone_hash[:12]}), not the configured one "
            f"(sha256 {backbone_hash[:12]}): set RECRANKER_BACKBONE__PATH to that backbone or "
            "tune a new adapter"
        )
    if record.template_version not in TEMPLATES:
        raise ArtifactIntegrityError(
            f"adapter {record.adapter_id} was tuned with prompt template "
            f"{record.template_version}, this code writes {', '.join(TEMPLATES)}: tune a new "
            "adapter"
        )
    prefix = record.lineage.get("prefix")
    if not prefix:
        raise DataError(f"{record.label} has no artifact prefix in its lineage: tune a new adapter")
    return fetch_registered(
        store,
        prefix,
        cache_root,
        record.files,
        f"{record.label} in recranker.adapters",
        remedy="tune a new adapter (`recranker tune`)",
    )
