"""A user's prompts: `build_training_prompts` (one per task per sampled entry, from
train-period ratings only), `build_inference_prompts` (every prompt that scores a user's
candidates, all sharing one prefix) and `reorder_listwise` (ALRO's permuted twin)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from recranker_core.errors import ConfigError, DataError
from recranker_core.llm.layouts import _history_block, _Layout, _layout, _Layout1, _Layout2
from recranker_core.llm.prompts import (
    _CANDIDATES_HEADER,
    _INFERENCE_STREAM,
    _RR2_RULES,
    _TARGETS,
    _TRAIN_STREAM,
    DISLIKE_MAX,
    IDENTIFIERS,
    LISTWISE_TOP_GRADE_SHARE,
    PREFIX_TEMPLATES,
    RATING_MAX,
    TASKS,
    Catalog,
    HintModel,
    Prompt,
    _base_order,
    _base_prefers,
    _check_catalog,
    _check_settings,
    _check_user,
    _held_out,
    _inference_pairs,
    _interacted,
    _item_scores,
    _label_rating,
    _listwise_top,
    _pick_history,
    _predictions,
    _RatingIndex,
    _sample_unseen,
)

if TYPE_CHECKING:
    from recranker_core.base.split import SplitData
    from recranker_core.config import PromptSettings


def build_training_prompts(
    data: SplitData,
    catalog: Catalog,
    hints: HintModel,
    users: npt.NDArray[np.int64],
    settings: PromptSettings,
) -> tuple[list[Prompt], dict[str, int]]:
    """One prompt of each task per entry of `users` (sampled with replacement: a repeated user
    gets fresh held-out items and shuffles), from train-period ratings only.

    Returns the prompts and counts: prompts per task and `skipped_<task>_<reason>` for entries a
    task could not use (too few ratings, likes or unseen items).
    """
    _check_settings(settings)
    _check_catalog(catalog, data)
    ratings = _RatingIndex(data)
    counts: dict[str, int] = dict.fromkeys(TASKS, 0)
    for key in (
        "skipped_pointwise_too_few_ratings",
        "skipped_pointwise_too_few_unseen",
        "skipped_pairwise_no_likes",
        "skipped_pairwise_no_negative",
        "skipped_pairwise_too_few_ratings",
        "skipped_pairwise_too_few_unseen",
        "skipped_listwise_too_few_likes",
        "skipped_listwise_too_few_unseen",
        "skipped_listwise_too_few_ratings",
    ):
        counts[key] = 0
    prompts: list[Prompt] = []
    for entry, user in enumerate(np.asarray(users, dtype=np.int64).tolist()):
        _check_user(data, user)
        rng = np.random.default_rng([settings.seed, _TRAIN_STREAM, entry, user])
        # The held-out likes are left out even if re-rated in the train period: no prompt may
        # show the items the ranker is evaluated on.
        rated = ratings.of(user, exclude=_held_out(data, user))
        scores = _item_scores(hints, user, data.n_items)
        shared = _Entry(user, rated, _interacted(data, user), scores)
        built = {
            "pointwise": _train_pointwise(rng, data, catalog, hints, shared, settings),
            "pairwise": _train_pairwise(rng, data, catalog, hints, shared, settings),
            "listwise": _train_listwise(rng, data, catalog, hints, shared, settings),
        }
        for task, result in built.items():
            if isinstance(result, str):
                counts[f"skipped_{task}_{result}"] += 1
            else:
                prompts.append(result)
                counts[task] += 1
    return prompts, counts


def build_inference_prompts(
    data: SplitData,
    catalog: Catalog,
    hints: HintModel,
    user: int,
    candidates: list[int],
    target: str,
    settings: PromptSettings,
) -> list[Prompt]:
    """Every prompt that scores `candidates` for `user`, all sharing one prefix.

    `target` 'valid': the history is the train-period ratings; 'test': the validation like joins
    it (docs/METHOD.md section 1). Pointwise: one prompt per candidate; pairwise:
    `settings.pairwise_pairs` random pairs (disjoint while they can be; 0 = all pairs), each in
    both orders; listwise: one prompt over all candidates in a shuffled order (`items`).
    """
    if target not in _TARGETS:
        raise ConfigError(f"target must be 'valid' or 'test', not {target!r}")
    _check_settings(settings)
    _check_catalog(catalog, data)
    _check_user(data, user)
    cands = [int(c) for c in candidates]
    if len(set(cands)) != len(cands):
        raise DataError(f"user {user}: candidates hold duplicates {cands}; pass each item once")
    bad = [c for c in cands if not 0 <= c < data.n_items]
    if bad:
        raise DataError(
            f"user {user}: candidates {bad} are not item indices (0..{data.n_items - 1})"
        )
    if len(cands) > len(IDENTIFIERS):
        raise ConfigError(
            f"{len(cands)} candidates for user {user}, but a listwise prompt names at most "
            f"{len(IDENTIFIERS)} (A..Z): lower the number of candidates per user"
        )
    # Seeded by the user's external id, not its index: the same user gets the same history
    # sample, pairs and listwise order whichever split or shard it is scored in.
    key = zlib.crc32(str(data.user_ids[user]).encode())
    rng = np.random.default_rng([settings.seed, _INFERENCE_STREAM, key, _TARGETS.index(target)])
    # Candidates are kept out of the history: an item cannot be both already rated and to be
    # ranked, and the valid target's exclusions already guarantee it for real candidates.
    rated = _RatingIndex(data).of(user, exclude=set(_held_out(data, user)) | set(cands))
    valid_item = int(data.valid_item[user])
    if target == "test" and valid_item >= 0 and valid_item not in cands:
        # SplitData keeps no validation-period ratings, only that this item is a like: it is
        # shown at the like threshold, a lower bound of its true rating.
        rated[valid_item] = float(data.like_threshold)
    history = _pick_history(rng, list(rated), settings.history_max, settings.template)
    block = _history_block(catalog, history, rated, settings.template)
    scores = _item_scores(hints, user, data.n_items)
    predictions = _predictions(hints, user, cands)
    # Both templates draw the same pairs and listwise order for a seed: only the wording differs.
    pairs = _inference_pairs(rng, len(cands), settings.pairwise_pairs)
    if settings.pair_scheme == "neighbours":  # candidates come in base order
        pairs = [(j, j + 1) for j in range(len(cands) - 1)]
    shown = [cands[j] for j in rng.permutation(len(cands))] if cands else []
    top = min(settings.listwise_top, len(shown))
    base_order = _base_order(scores, shown)
    ordered = [(cands[x], cands[y]) for x, y in pairs]
    asked = [pair for x, y in ordered for pair in ((x, y), (y, x))]
    predicted = dict(zip(cands, predictions, strict=True))
    layout = _layout(
        settings.template, catalog, block, shown, [predicted[i] for i in shown], base_order
    )
    prompts = [layout.pointwise(user, history, i, predicted[i], None) for i in cands]
    prompts += [
        layout.pairwise(user, history, x, y, _base_prefers(scores, x, y), None) for x, y in asked
    ]
    if shown:
        prompts.append(layout.listwise(user, history, top, None))
    return prompts


def reorder_listwise(prompt: Prompt, catalog: Catalog, permutation: Sequence[int]) -> Prompt:
    """The listwise `prompt` with its candidates shown in another order (ALRO's permuted twin):
    position j shows the candidate at position `permutation[j]` of `prompt`, under the
    identifier of position j. History, wording and the base model's order stay; the hint's and
    the label's identifiers follow their items, and the label's ratings (in shown order) move
    with them. The permutation's inverse gives back `prompt`."""
    if prompt.task != "listwise":
        raise DataError(f"only a listwise prompt can be reordered, not a {prompt.task} prompt")
    n = len(prompt.items)
    perm = [int(j) for j in permutation]
    if sorted(perm) != list(range(n)):
        raise DataError(
            f"{perm} is not a permutation of the prompt's {n} candidate positions (0..{n - 1})"
        )
    shown = [prompt.items[j] for j in perm]
    order = prompt.label.get("order")
    ratings = prompt.label.get("ratings")
    block, predicted = prompt.prefix, []
    if prompt.template in PREFIX_TEMPLATES:  # the candidate block is in the prefix: cut it off
        cut = prompt.prefix.index("\n" + _CANDIDATES_HEADER) + 1
        block = prompt.prefix[len(_RR2_RULES) : cut]
        predicted = [float(prompt.hint["predicted_ratings"][j]) for j in perm]
    layout = _layout(
        prompt.template, catalog, block, shown, predicted, [int(i) for i in prompt.hint["order"]]
    )
    return layout.listwise(
        prompt.user,
        prompt.history,
        _listwise_top(prompt),
        None if order is None else [int(i) for i in order],
        None if ratings is None else [float(ratings[j]) for j in perm],
    )


# --- training tasks: each returns a prompt, or the reason it skipped the entry ---------------


@dataclass(frozen=True)
class _Entry:
    """What the tasks of one sampled user entry share."""

    user: int
    rated: dict[int, float]  # train-period ratings, held-out likes left out
    interacted: set[int]  # items of any period: never sampled as unseen
    scores: npt.NDArray[np.floating]  # the hint model's item scores


def _train_pointwise(
    rng: np.random.Generator,
    data: SplitData,
    catalog: Catalog,
    hints: HintModel,
    entry: _Entry,
    settings: PromptSettings,
) -> Prompt | str:
    user, rated = entry.user, entry.rated
    items = list(rated)
    if len(items) < 2:
        return "too_few_ratings"
    target = items[int(rng.integers(len(items)))]
    history = _pick_history(
        rng, [i for i in items if i != target], settings.history_max, settings.template
    )
    rating = _label_rating(rated[target])
    block = _history_block(catalog, history, rated, settings.template)
    if settings.template in PREFIX_TEMPLATES:
        # The target among unseen items, as a candidate list at inference holds it.
        layout = _train_layout(rng, data, catalog, hints, entry, block, [target], settings)
        if layout is None:
            return "too_few_unseen"
        predicted = layout.predicted[layout.shown.index(target)]
        return layout.pointwise(user, history, target, predicted, rating)
    (predicted,) = _predictions(hints, user, [target])
    return _Layout1(catalog, block).pointwise(user, history, target, predicted, rating)


def _train_layout(
    rng: np.random.Generator,
    data: SplitData,
    catalog: Catalog,
    hints: HintModel,
    entry: _Entry,
    block: str,
    asked: list[int],
    settings: PromptSettings,
) -> _Layout2 | None:
    """rr-2's candidate block of a pointwise or pairwise training prompt: the asked items and
    unseen ones up to `listwise_candidates`, shuffled; None when too few items are unseen."""
    fill = _sample_unseen(
        rng, data.n_items, entry.interacted | set(asked), settings.listwise_candidates - len(asked)
    )
    if fill is None:
        return None
    pool = asked + fill
    shown = [pool[j] for j in rng.permutation(len(pool))]
    predicted = _predictions(hints, entry.user, shown)
    return _Layout2(catalog, block, shown, predicted, _base_order(entry.scores, shown))


def _train_pairwise(
    rng: np.random.Generator,
    data: SplitData,
    catalog: Catalog,
    hints: HintModel,
    entry: _Entry,
    settings: PromptSettings,
) -> Prompt | str:
    user, rated, interacted, scores = entry.user, entry.rated, entry.interacted, entry.scores
    items = list(rated)
    likes = [i for i in items if rated[i] >= data.like_threshold]
    if not likes:
        return "no_likes"
    liked = likes[int(rng.integers(len(likes)))]
    # A disliked item makes the clearest contrast; a neutral one still ranks below a like; an
    # item never interacted with is the fallback (the paper's sampled negative).
    dislikes = [i for i in items if rated[i] <= DISLIKE_MAX]
    neutral = [i for i in items if DISLIKE_MAX < rated[i] < data.like_threshold]
    pool = dislikes or neutral
    if pool:
        other = pool[int(rng.integers(len(pool)))]
    else:
        unseen = _sample_unseen(rng, data.n_items, interacted, 1)
        if unseen is None:
            return "no_negative"
        other = unseen[0]
    rest = [i for i in items if i not in (liked, other)]
    if not rest:
        return "too_few_ratings"
    history = _pick_history(rng, rest, settings.history_max, settings.template)
    liked_first = bool(rng.random() < 0.5)
    first, second = (liked, other) if liked_first else (other, liked)
    hint_first = _base_prefers(scores, first, second)
    block = _history_block(catalog, history, rated, settings.template)
    layout: _Layout | None = _Layout1(catalog, block)
    if settings.template in PREFIX_TEMPLATES:
        layout = _train_layout(rng, data, catalog, hints, entry, block, [first, second], settings)
    if layout is None:
        return "too_few_unseen"
    return layout.pairwise(user, history, first, second, hint_first, liked_first)


def _train_listwise(
    rng: np.random.Generator,
    data: SplitData,
    catalog: Catalog,
    hints: HintModel,
    entry: _Entry,
    settings: PromptSettings,
) -> Prompt | str:
    user, rated, interacted, scores = entry.user, entry.rated, entry.interacted, entry.scores
    k = settings.listwise_top
    items = list(rated)
    best = [i for i in items if rated[i] >= RATING_MAX]
    lower = [i for i in items if data.like_threshold <= rated[i] < RATING_MAX]
    n_best = min(len(best), round(LISTWISE_TOP_GRADE_SHARE * k))
    n_lower = min(len(lower), k - n_best)
    n_best = min(len(best), k - n_lower)  # more top-grade likes where lower ones run short
    if n_best + n_lower < k:
        return "too_few_likes"
    held = [int(i) for i in rng.choice(best, n_best, replace=False)] if n_best else []
    held += [int(i) for i in rng.choice(lower, n_lower, replace=False)] if n_lower else []
    unseen = _sample_unseen(rng, data.n_items, interacted, settings.listwise_candidates - k)
    if unseen is None:
        return "too_few_unseen"
    held_set = set(held)
    rest = [i for i in items if i not in held_set]
    if not rest:
        return "too_few_ratings"
    history = _pick_history(rng, rest, settings.history_max, settings.template)
    candidates = held + unseen
    shown = [candidates[j] for j in rng.permutation(len(candidates))]
    # Best first by rating; equal ratings in a random order, so that no tie-break leaks a bias.
    ties = rng.random(len(held))
    order = [held[j] for j in sorted(range(len(held)), key=lambda j: (-rated[held[j]], ties[j]))]
    block = _history_block(catalog, history, rated, settings.template)
    # Unseen candidates have no rating: 0, which ALRO's graded gain 2^r - 1 turns into no gain.
    ratings = [rated.get(i, 0.0) for i in shown]
    base_order = _base_order(scores, shown)
    # Only rr-2 and rr-3 show the candidates' predicted ratings.
    predicted = _predictions(hints, user, shown) if settings.template in PREFIX_TEMPLATES else []
    layout = _layout(settings.template, catalog, block, shown, predicted, base_order)
    return layout.listwise(user, history, k, order, ratings)
