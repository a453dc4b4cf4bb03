"""What a tuning run starts from: the settings it uses (`effective_settings`, the CPU profiles),
the champion base model and its split (`BaseContext`), the rating model behind the pointwise
hint, the hints, the sampled users and the base model's candidates."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recranker_core import registry
from recranker_core.base.candidates import fetch_model
from recranker_core.base.split import SplitData
from recranker_core.config import Settings
from recranker_core.errors import ConfigError, DataError
from recranker_core.store import ArtifactStore

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
    from recranker_core.tune_ranker.losses import OBJECTIVES

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
    from recranker_core.tune_ranker.sampling import sample_users

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
