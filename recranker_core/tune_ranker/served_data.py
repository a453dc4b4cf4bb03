"""Training data on the task that is served (docs/METHOD.md section 4a).

At serving time the candidates are the base model's top N of items the user never rated, the
hints come from models that never saw the answer, and the answer is the user's next like. The
training prompts are built the same way, inside the train period:

- shadow base models (the champion's kind, and the rating model) are fitted on the train period
  cut before each user's last M likes (`shadow_split`);
- for each sampled user and each of those M cut points, the history is the ratings before the
  cut, the candidates the shadow model's top N unseen items there (the held-out like put in a
  random slot when the shadow model missed it), the hints the shadow models', and the label the
  like at the cut, graded by the user's later ratings of the other candidates.

Nothing after the train period is read: SplitData's rating arrays end before the validation
like, so no validation or test item can reach a prompt, its candidates or its hints."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from recranker_core.base.split import SplitData
from recranker_core.errors import ConfigError, DataError
from recranker_core.llm.layouts import _history_block, _layout
from recranker_core.llm.prompts import IDENTIFIERS, Catalog, Prompt, _label_rating

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cut:
    """One training point of a user: the like at position `at` of the user's train-period
    ratings (time order) is the answer; the ratings before it are the history."""

    user: int
    at: int
    item: int


@dataclass
class ShadowData:
    """The shadow split (train period before each user's first cut) and every user's cuts."""

    data: SplitData
    cuts: dict[int, list[Cut]]
    # Per user, the train-period ratings in time order: (items, values).
    ratings: dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]
    counts: dict[str, int] = field(default_factory=dict)
    # Per user, the items of the validation and test periods: never offered as candidates (their
    # ratings are not in the train period, so a prompt would call them not liked).
    future: dict[int, set[int]] = field(default_factory=dict)


def user_ratings(
    data: SplitData,
) -> dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]:
    """Every user's train-period ratings in time order (SplitData keeps them grouped by user in
    time order; a stable sort keeps that order if a caller's arrays are not grouped)."""
    users = np.asarray(data.rating_users, dtype=np.int64)
    order = np.argsort(users, kind="stable")
    users = users[order]
    items = np.asarray(data.rating_items, dtype=np.int64)[order]
    values = np.asarray(data.rating_values, dtype=np.float64)[order]
    bounds = np.searchsorted(users, np.arange(data.n_users + 1))
    return {
        u: (items[bounds[u] : bounds[u + 1]], values[bounds[u] : bounds[u + 1]])
        for u in range(data.n_users)
        if bounds[u + 1] > bounds[u]
    }


def shadow_split(data: SplitData, cuts_per_user: int) -> ShadowData:
    """The train period with each user's last `cuts_per_user` likes (and everything rated from
    the first of them on) cut off, and the cuts. A like is a cut when at least one rating comes
    before it and the item was not rated before (a re-rated item is no next like).

    The shadow split's validation item is a user's first cut, its test item the second (so the
    shadow models early-stop on predicting the next like, as the champion does); users without
    a cut keep their whole train period."""
    if cuts_per_user < 1:
        raise ConfigError(f"RECRANKER_TUNE__CUTS_PER_USER must be 1 or more, not {cuts_per_user}")
    per_user = user_ratings(data)
    threshold = data.like_threshold
    cuts: dict[int, list[Cut]] = {}
    kept_items: list[npt.NDArray[np.int64]] = []
    kept_values: list[npt.NDArray[np.float64]] = []
    kept_users: list[npt.NDArray[np.int64]] = []
    n = data.n_users
    valid = np.full(n, -1, dtype=np.int32)
    test = np.full(n, -1, dtype=np.int32)
    like_rows: list[npt.NDArray[np.int64]] = [np.empty(0, np.int64)] * n
    seen_valid: list[npt.NDArray[np.int64]] = [np.empty(0, np.int64)] * n
    seen_test: list[npt.NDArray[np.int64]] = [np.empty(0, np.int64)] * n
    test_sequences: list[npt.NDArray[np.int32]] = [np.empty(0, np.int32)] * n
    for user, (items, values) in per_user.items():
        likes: list[int] = []
        before: set[int] = set()
        for j, item in enumerate(items.tolist()):
            if j > 0 and values[j] >= threshold and item not in before:
                likes.append(j)
            before.add(item)
        mine = [Cut(user, j, int(items[j])) for j in likes[-cuts_per_user:]]
        end = mine[0].at if mine else items.size
        if mine:
            cuts[user] = mine
            valid[user] = mine[0].item
            if len(mine) > 1:
                test[user] = mine[1].item
        kept_items.append(items[:end])
        kept_values.append(values[:end])
        kept_users.append(np.full(end, user, dtype=np.int64))
        kept = items[:end]
        like_rows[user] = kept[values[:end] >= threshold]
        seen_valid[user] = np.unique(kept)
        upto = mine[1].at if len(mine) > 1 else end
        seen_test[user] = np.unique(items[:upto])
        test_sequences[user] = items[:upto][values[:upto] >= threshold].astype(np.int32)

    def csr(rows: list[npt.NDArray[np.int64]], unique: bool) -> tuple[Any, Any]:
        rows = [np.unique(r) if unique else r for r in rows]
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([r.size for r in rows], out=indptr[1:])
        flat = np.concatenate(rows).astype(np.int32) if rows else np.empty(0, np.int32)
        return indptr, flat

    train_ptr, train_idx = csr(like_rows, unique=True)
    sv_ptr, sv_idx = csr(seen_valid, unique=False)
    st_ptr, st_idx = csr(seen_test, unique=False)
    shadow = SplitData(
        user_ids=list(data.user_ids),
        item_ids=list(data.item_ids),
        train_indptr=train_ptr,
        train_indices=train_idx,
        train_sequences=[r.astype(np.int32) for r in like_rows],
        rating_users=np.concatenate(kept_users).astype(np.int32)
        if kept_users
        else np.empty(0, np.int32),
        rating_items=np.concatenate(kept_items).astype(np.int32)
        if kept_items
        else np.empty(0, np.int32),
        rating_values=np.concatenate(kept_values).astype(np.float32)
        if kept_values
        else np.empty(0, np.float32),
        valid_item=valid,
        test_item=test,
        seen_valid_indptr=sv_ptr,
        seen_valid_indices=sv_idx,
        seen_test_indptr=st_ptr,
        seen_test_indices=st_idx,
        watermark=data.watermark,
        like_threshold=threshold,
        test_sequences=test_sequences,
    )
    counts = {
        "users_with_cuts": len(cuts),
        "cuts": sum(len(c) for c in cuts.values()),
        "shadow_ratings": int(shadow.rating_values.size),
        "train_ratings": int(np.asarray(data.rating_values).size),
    }
    shadow.stats = dict(counts)
    future: dict[int, set[int]] = {}
    for user in cuts:
        train = set(per_user[user][0].tolist())
        later = {int(i) for i in data.seen(user, "test")} - train
        later |= {int(i) for i in (data.valid_item[user], data.test_item[user]) if i >= 0}
        future[user] = later
    return ShadowData(shadow, cuts, per_user, counts, future)


@dataclass
class ShadowModels:
    """The shadow ranker (the champion's kind) and rating model, fitted on the shadow split."""

    kind: str
    model: Any
    regressor: Any
    metrics: dict[str, Any] = field(default_factory=dict)


def train_shadow_models(
    kind: str, shadow: ShadowData, base_settings: Any, epochs: int | None = None
) -> ShadowModels:
    """Fit the shadow ranker of `kind` and the shadow rating model on the shadow split. With
    `epochs` (the champion's best epoch) the ranker trains that long, as the champion did,
    instead of early-stopping on its own (about as good, and no longer than needed)."""
    from recranker_core.base.train import train_model

    section = getattr(base_settings, kind, None)
    if epochs is not None and section is not None and hasattr(section, "epochs"):
        section = section.model_copy(update={"epochs": max(1, int(epochs))})
        base_settings = base_settings.model_copy(update={kind: section})
    ranker = train_model(kind, shadow.data, base_settings)
    if hasattr(ranker.model, "set_sequences"):
        ranker.model.set_sequences(shadow.data.train_sequences)
    ratings = train_model("biasedmf", shadow.data, base_settings, rank_evaluation=False)
    log.info(
        "shadow models on the train period before each user's last likes: %s valid %s; rating "
        "model held-out RMSE %.3f",
        kind,
        {k: round(v, 4) for k, v in ranker.metrics.get("valid", {}).items()},
        ratings.metrics["valid"].get("rmse", float("nan")),
    )
    return ShadowModels(
        kind,
        ranker.model,
        ratings.model,
        {"ranker_valid": ranker.metrics.get("valid", {}), "rating_valid": ratings.metrics["valid"]},
    )


# Random streams of the served-task builder, apart from the other builders' (prompts.py).
_SERVED_STREAM = 3


def build_served_prompts(
    shadow: ShadowData,
    models: ShadowModels,
    catalog: Catalog,
    users: npt.NDArray[np.int64],
    prompt_settings: Any,
    n_candidates: int,
) -> tuple[list[Prompt], dict[str, int]]:
    """The prompts of every entry of `users` (sampled with replacement: a repeated user gets a
    fresh shuffle of the same cuts) at each of its cuts, all of a cut's prompts sharing one
    prefix: one listwise question (the answer's first identifier is the next like), pointwise
    questions for the candidates the user rated later, and the next like against
    `pairwise_pairs` other candidates not liked later, each pair in both orders.

    Returns the prompts and counts (cuts used, hits of the shadow model, questions per task,
    entries skipped for having no cut)."""
    if n_candidates > len(IDENTIFIERS):
        raise ConfigError(f"{n_candidates} candidates cannot be named by letters A..Z")
    counts = {
        "cuts": 0,
        "shadow_hits": 0,
        "skipped_no_cut": 0,
        "pointwise": 0,
        "pairwise": 0,
        "listwise": 0,
    }
    scores_of = _CutScores(shadow, models)
    prompts: list[Prompt] = []
    for entry, user in enumerate(np.asarray(users, dtype=np.int64).tolist()):
        cuts = shadow.cuts.get(user)
        if not cuts:
            counts["skipped_no_cut"] += 1
            continue
        items, values = shadow.ratings[user]
        for cut in cuts:
            rng = np.random.default_rng([prompt_settings.seed, _SERVED_STREAM, entry, cut.at])
            built, hit = _cut_prompts(
                rng, cut, items, values, scores_of, models, catalog, prompt_settings, n_candidates
            )
            counts["cuts"] += 1
            counts["shadow_hits"] += int(hit)
            for p in built:
                counts[p.task] += 1
            prompts.extend(built)
    if not prompts:
        raise DataError(
            "no training prompts: none of the sampled users has a like after their first "
            "rating in the train period"
        )
    return prompts, counts


class _CutScores:
    """The shadow ranker's scores of every item for a user at a cut (a sequence model reads the
    likes before the cut; an embedding model's scores are the user's, whatever the cut)."""

    def __init__(self, shadow: ShadowData, models: ShadowModels) -> None:
        self.shadow = shadow
        self.model = models.model
        self._user: dict[int, npt.NDArray[np.floating]] = {}

    def at(self, cut: Cut, items: npt.NDArray[np.int64], values: npt.NDArray[np.float64]) -> Any:
        if hasattr(self.model, "sequence_scores"):
            before = items[: cut.at][values[: cut.at] >= self.shadow.data.like_threshold]
            sequence = {cut.user: before.astype(np.int32)}
            return self.model.sequence_scores(np.array([cut.user], dtype=np.int64), sequence)[0]
        if cut.user not in self._user:
            if len(self._user) > 4096:
                self._user.clear()
            self._user[cut.user] = self.model.full_scores(np.array([cut.user], dtype=np.int64))[0]
        return self._user[cut.user]


def _cut_prompts(
    rng: np.random.Generator,
    cut: Cut,
    items: npt.NDArray[np.int64],
    values: npt.NDArray[np.float64],
    scores_of: _CutScores,
    models: ShadowModels,
    catalog: Catalog,
    settings: Any,
    n: int,
) -> tuple[list[Prompt], bool]:
    threshold = scores_of.shadow.data.like_threshold
    rated: dict[int, float] = {}
    for item, value in zip(items[: cut.at].tolist(), values[: cut.at].tolist(), strict=True):
        rated.pop(item, None)
        rated[int(item)] = float(value)
    later: dict[int, float] = {}
    for item, value in zip(items[cut.at :].tolist(), values[cut.at :].tolist(), strict=True):
        later.setdefault(int(item), float(value))  # the first rating after the cut
    scores = np.asarray(scores_of.at(cut, items, values), dtype=np.float64).copy()
    seen = np.fromiter(rated, dtype=np.int64)
    scores[seen] = -np.inf
    future = scores_of.shadow.future.get(cut.user, set())
    if future:
        scores[np.fromiter(future, dtype=np.int64)] = -np.inf
    top = np.argpartition(-scores, n - 1)[:n]
    top = top[np.argsort(-scores[top], kind="stable")].tolist()
    hit = cut.item in top
    if not hit:
        # A random slot: the shadow model's order of the others, the answer anywhere in it.
        top = top[: n - 1]
        top.insert(int(rng.integers(n)), cut.item)
    candidates = [int(i) for i in top]  # the base order (best first)
    history = list(rated)[-settings.history_max :] if settings.template == "rr-3" else None
    if history is None:
        history = [list(rated)[j] for j in rng.permutation(len(rated))[: settings.history_max]]
    block = _history_block(catalog, history, rated, settings.template)
    predicted_raw = models.regressor.predict(
        np.full(len(candidates), cut.user), np.asarray(candidates, dtype=np.int64)
    )
    predicted = {
        i: round(float(v), 1)
        for i, v in zip(candidates, np.clip(predicted_raw, 1, 5).tolist(), strict=True)
    }
    shown = [candidates[j] for j in rng.permutation(n)]
    layout = _layout(
        settings.template, catalog, block, shown, [predicted[i] for i in shown], candidates
    )
    user = cut.user
    # The label: the next like first, then the candidates rated later, best first; the rest of
    # the answer's slots follow the base order (only the first slot is read when serving).
    graded = sorted(
        (i for i in candidates if i != cut.item and i in later),
        key=lambda i: (-later[i], candidates.index(i)),
    )
    rest = [i for i in candidates if i != cut.item and i not in later]
    top_k = min(settings.listwise_top, n)
    order = ([cut.item] + graded + rest)[:top_k]
    ratings = [later.get(i, 0.0) if i != cut.item else later[cut.item] for i in shown]
    prompts = [layout.listwise(user, history, top_k, order, ratings)]
    for i in candidates:
        if i in later:
            prompts.append(
                layout.pointwise(user, history, i, predicted[i], _label_rating(later[i]))
            )
    negatives = [i for i in candidates if i != cut.item and later.get(i, 0.0) < threshold]
    picked = [negatives[j] for j in rng.permutation(len(negatives))[: settings.pairwise_pairs]]
    for other in picked:
        for first, second in ((cut.item, other), (other, cut.item)):
            hint_first = candidates.index(first) < candidates.index(second)
            prompts.append(
                layout.pairwise(user, history, first, second, hint_first, first == cut.item)
            )
    for p in prompts:
        p.label["cut"] = cut.at
    return prompts, hit
