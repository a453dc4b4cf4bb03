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

CPU_DEMO = {
    "sampling": {"users": 40},
    "prompts": {"history_max": 8},
    "tune": {
        "epochs": 1,
        "batch_size": 4,
        "grad_accumulation": 2,
        "eval_every": 8,
        "valid_users": 24,
        "max_length": 768,
        "warmup_steps": 2,
    },
}


def effective_settings(settings: Settings) -> tuple[Settings, str]:
    """The settings a run uses: as given (`full`), or with the CPU demo profile's small sample
    and budget laid over them. Returns them with a line saying which."""
    from recranker_core.ranker.tune import OBJECTIVES

    if settings.tune.objective not in OBJECTIVES:
        raise ConfigError(
            f"RECRANKER_TUNE__OBJECTIVE={settings.tune.objective!r}: use one of "
            f"{', '.join(OBJECTIVES)}"
        )
    profile = settings.tune.profile
    if profile == "full":
        return settings, "profile full (settings as given)"
    if profile != "cpu-demo":
        raise ConfigError(f"RECRANKER_TUNE__PROFILE={profile!r}: use 'full' or 'cpu-demo'")
    data = settings.model_dump()
    for section, values in CPU_DEMO.items():
        data[section].update(values)
    shown = ", ".join(f"{s}.{k}={v}" for s, vals in CPU_DEMO.items() for k, v in vals.items())
    return type(settings).model_validate(data), f"CPU demo profile ({shown})"


@dataclass
class BaseContext:
    """The champion base model, the split it was trained on, and the hint regressor."""

    model_id: int
    kind: str
    model: Any  # BaseRecommender
    data: SplitData
    regressor: Any = None  # BiasedMF, trained on the same split's train-period ratings


def load_base_context(
    database_url: str, store: ArtifactStore, cache_root: Path, like_threshold: float
) -> BaseContext:
    """The champion from the store (every file checked against the registry's digests) and the
    split as of its watermark; the two must index users and items the same way, or the data
    changed under the champion."""
    from recranker_core.base.models import read_state
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
    return BaseContext(record.model_id, record.kind, model, data)


def train_hint_regressor(ctx: BaseContext, settings: Settings) -> None:
    """The biased-MF rating regressor behind the pointwise hint, on train-period ratings."""
    from recranker_core.base.train import train_model

    # Only its rating predictions are used: no full-ranking evaluation over every user.
    result = train_model("biasedmf", ctx.data, settings.base, rank_evaluation=False)
    ctx.regressor = result.model
    log.info("hint regressor: held-out RMSE %.3f", result.metrics["valid"].get("rmse", np.nan))


class BaseHints:
    """Hints from the base models (train period only): the ranker's item scores and the
    regressor's rating predictions."""

    def __init__(self, ctx: BaseContext) -> None:
        if ctx.regressor is None:
            raise DataError("the hint regressor is not trained (train_hint_regressor first)")
        self.ctx = ctx
        self._scores: dict[int, npt.NDArray[np.floating]] = {}

    def item_scores(self, user: int) -> npt.NDArray[np.floating]:
        if user not in self._scores:
            if len(self._scores) > 4096:
                self._scores.clear()
            self._scores[user] = self.ctx.model.full_scores(np.array([user], dtype=np.int64))[0]
        return self._scores[user]

    def predict_ratings(self, user: int, items: npt.NDArray[np.int64]) -> npt.NDArray[np.floating]:
        items = np.asarray(items, dtype=np.int64)
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
    """Hints that come from the scoring that produced the candidates (METHOD.md section 6): the
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
    only users a re-ranker can change), with their listwise prompts."""

    users: npt.NDArray[np.int64]
    targets: npt.NDArray[np.int64]  # each user's validation item
    candidates: npt.NDArray[np.int64]
    prompts: list[Prompt]
    base_metrics: dict[str, float]
    hit_share: float  # share of evaluable users whose validation item is a candidate
    counts: dict[str, int] = field(default_factory=dict)


def validation_set(
    ctx: BaseContext, catalog: Catalog, hints: BaseHints, settings: Settings
) -> ValidationSet:
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
    cands = base_candidates(ctx, evaluable, "valid", n)
    hit = cands == ctx.data.valid_item[evaluable][:, None]
    hits = np.flatnonzero(hit.any(axis=1))
    if hits.size == 0:
        raise DataError(
            "no validation item is among the base model's candidates: nothing to re-rank"
        )
    rng = np.random.default_rng(settings.tune.seed)
    keep = np.sort(rng.choice(hits, size=min(settings.tune.valid_users, hits.size), replace=False))
    users, chosen = evaluable[keep], cands[keep]
    prompts = []
    for user, row in zip(users.tolist(), chosen, strict=True):
        built = build_inference_prompts(
            ctx.data, catalog, hints, user, row.tolist(), "valid", settings.prompts
        )
        prompts.append(next(p for p in built if p.task == "listwise"))
    base_ranks = np.argmax(hit[keep], axis=1)
    return ValidationSet(
        users,
        ctx.data.valid_item[users].astype(np.int64),
        chosen,
        prompts,
        rank_metrics(base_ranks, DEFAULT_KS),
        float(hits.size / evaluable.size),
        {
            "evaluable": all_evaluable,
            "scanned": int(evaluable.size),
            "with_item_in_candidates": int(hits.size),
        },
    )


def listwise_ranks(
    prompts: list[Prompt], scores: list[npt.NDArray[np.float32]], targets: npt.ArrayLike
) -> npt.NDArray[np.int64]:
    """0-based rank of each target among its prompt's candidates by score (ties pessimistic)."""
    ranks = np.empty(len(prompts), dtype=np.int64)
    wanted = np.asarray(targets)
    for n, (p, s) in enumerate(zip(prompts, scores, strict=True)):
        mine = s[p.items.index(int(wanted[n]))]
        ranks[n] = int((s > mine).sum() + (s == mine).sum() - 1)
    return ranks


def make_validate(valid: ValidationSet, tokenizer: Any, batch_size: int) -> Any:
    """The tuning loop's validation: listwise verbalizer scores on the fixed users."""
    from recranker_core.ranker.score import listwise_scores

    def validate(model: Any) -> dict[str, float]:
        scores = listwise_scores(model, tokenizer, valid.prompts, batch_size=batch_size)
        return rank_metrics(listwise_ranks(valid.prompts, scores, valid.targets), DEFAULT_KS)

    return validate


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
    tolerance: float,
    *,
    gate: bool = True,
) -> AdapterOutcome:
    """Store the adapter + hint regressor + metrics with a manifest, register it, and promote it
    if its validation NDCG@10 passes the gate against the champion adapter. Without `gate` (an
    experiment's adapters) it stays a candidate: never champion, never rejected."""
    import shutil

    from recranker_core.base.models import write_state

    with tempfile.TemporaryDirectory(prefix="recranker-adapter-") as tmp:
        local = Path(tmp) / "adapter"
        shutil.copytree(adapter_dir, local)
        write_state(ctx.regressor, local, "hint_regressor")
        # The regressor's own index of users and items (the split it was trained on), so that
        # serving maps ids correctly whatever base model is champion by then.
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
    if not gate:
        reason = "experiment adapter: registered as a candidate, not gated"
        return AdapterOutcome(adapter_id, False, reason, stored.uri, stored.prefix)
    decision = registry.gate(metrics, registry.champion_adapter(database_url), tolerance)
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
