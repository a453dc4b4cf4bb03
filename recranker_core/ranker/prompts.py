"""The instruction prompts of the three ranking tasks (docs/METHOD.md section 4): one wording
for tuning and inference, built from train-period data only, and rendered through a backbone's
chat template with a prefix that all of the user's inference prompts share.

Two templates (`PromptSettings.template`; an adapter keeps the one it was tuned with):
- `rr-1`: the prefix is the user's history; each question repeats its candidates and hint.
- `rr-2` (docs/METHOD.md section 6): the prefix holds the history *and* the candidate list with the
  conventional model's predicted ratings and order; each question is a few tokens that name
  identifiers ("C rating?", "C over F?", "Top 3?"), so a user costs about half the tokens.
- `rr-3` (the default; docs/METHOD.md section 4): rr-2's layout with the history as the user's most
  recent ratings before the cut, oldest first, one line per item: the next like depends on
  recency, which rr-2's random sample grouped by rating hides.
"""

from __future__ import annotations

import itertools
import math
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from recranker_core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from recranker_core.base.split import SplitData
    from recranker_core.config import PromptSettings

# Stored with datasets and adapters; add a new version when wording changes. TEMPLATE_VERSION is
# the one new adapters get by default (PromptSettings.template).
TEMPLATES = ("rr-1", "rr-2", "rr-3")
TEMPLATE_VERSION = "rr-3"
# Templates whose shared prefix holds the candidate block (short questions).
PREFIX_TEMPLATES = ("rr-2", "rr-3")
IDENTIFIERS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
TASKS = ("pointwise", "pairwise", "listwise")

# A dislike is a rating <= 2 (docs/METHOD.md section 1). PromptSettings has no field for it, so
# it is a module constant until one is added next to SplitData.like_threshold.
DISLIKE_MAX = 2.0
RATING_MIN = 1
RATING_MAX = 5
RATING_TOKENS = tuple(str(r) for r in range(RATING_MIN, RATING_MAX + 1))
YES, NO = "Yes", "No"
# The paper's listwise label is 3 five-star + 2 four-star items: a mix of grades, so that the
# order inside the label carries information and is not a random order of equally rated items.
LISTWISE_TOP_GRADE_SHARE = 0.6
SYSTEM_MESSAGE = "You are a recommender system. Answer with only what is asked."

# Splits the user message between the shared history and the per-prompt question; chosen so that
# no title or chat template produces it by accident.
_BOUNDARY = "\x00rr-question-boundary\x00"
# Separate random streams, so that training and inference draws never coincide for a seed.
_TRAIN_STREAM = 1
_INFERENCE_STREAM = 2
_TARGETS = ("valid", "test")
_TOP_ASKED = re.compile(r"Which (\d+) candidates would the user like most|^Top (\d+)\?")
# rr-2: the candidate block of the shared prefix, and how its short questions are answered.
_CANDIDATES_HEADER = "Candidates, each with a conventional model's predicted rating:\n"
_RR2_RULES = (
    'Answer "<letter> rating?" with a rating 1-5, "<letter> over <letter>?" with Yes if the '
    'user would prefer the first item, else No, and "Top <n>?" with the n letters the user '
    "would like most, best first, separated by commas.\n"
)


@dataclass(frozen=True)
class Catalog:
    """Item metadata by model item index (`SplitData.item_ids` order)."""

    titles: list[str]  # "" where unknown
    years: list[int | None]
    genres: list[list[str]]
    # External ids: the name shown for an item without a title.
    item_ids: list[str] | None = None

    def __post_init__(self) -> None:
        sizes = {len(self.titles), len(self.years), len(self.genres)}
        if self.item_ids is not None:
            sizes.add(len(self.item_ids))
        if len(sizes) != 1:
            raise DataError(
                f"catalog columns differ in length ({len(self.titles)} titles, {len(self.years)} "
                f"years, {len(self.genres)} genre lists): build it with one entry per item"
            )

    def __len__(self) -> int:
        return len(self.titles)

    def describe(self, item: int) -> str:
        """'Toy Story (1995; Animation, Children's, Comedy)'; the item id stands in for a missing
        title and the parenthesis is left out when neither year nor genres are known."""
        raw = self.titles[item]
        # Whitespace is collapsed so that a title cannot break the one-item-per-line layout.
        title = " ".join(raw.split()) if raw else ""
        if not title:
            title = self.item_ids[item] if self.item_ids is not None else f"item {item}"
        year = self.years[item]
        details = [str(year)] if year is not None else []
        genres = ", ".join(g for g in self.genres[item] if g)
        if genres:
            details.append(genres)
        return f"{title} ({'; '.join(details)})" if details else title

    @classmethod
    def from_database(cls, database_url: str, item_ids: list[str]) -> Catalog:
        """The metadata of `item_ids` (in that order) from recranker.items; an item missing from
        the table, or without a title, is named by its id."""
        from recranker_core.db.connect import connect

        with connect(database_url) as conn:
            rows = conn.execute(
                "SELECT item_id, title, year, genres FROM recranker.items WHERE item_id = ANY(%s)",
                (list(item_ids),),
            ).fetchall()
        found = {r[0]: (r[1], r[2], list(r[3] or [])) for r in rows}
        titles: list[str] = []
        years: list[int | None] = []
        genres: list[list[str]] = []
        for item_id in item_ids:
            title, year, item_genres = found.get(item_id, (None, None, []))
            titles.append(title or item_id)
            years.append(year)
            genres.append(item_genres)
        return cls(titles=titles, years=years, genres=genres, item_ids=list(item_ids))


class HintModel(Protocol):
    """The base models trained on train-period data only: the source of every hint."""

    def item_scores(self, user: int) -> npt.NDArray[np.floating]:
        """Score of every item for `user` (higher = better), shape (n_items,)."""
        ...

    def predict_ratings(self, user: int, items: npt.NDArray[np.int64]) -> npt.NDArray[np.floating]:
        """Predicted rating of each of `items` by `user`."""
        ...


@dataclass
class Prompt:
    """One instruction: the user's shared history block, the task's question, and its label."""

    task: str
    user: int
    prefix: str  # the history block, identical for all of a user's inference prompts
    question: str  # candidates, hint and the question: the per-prompt cost, kept short
    answer: str  # "4" | "Yes"/"No" | "C, A, F, B, E"; "" for inference prompts
    items: list[int]  # pointwise [target]; pairwise [x, y] as shown; listwise as shown (A, B, ..)
    label: dict[str, Any]
    history: list[int]  # item indices shown in the history
    hint: dict[str, Any] = field(default_factory=dict)
    template: str = "rr-1"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


def render(prompt: Prompt, tokenizer: Any) -> tuple[str, str, str]:
    """(prefix_text, suffix_text, answer_text) of `prompt` in the tokenizer's chat template.

    prefix_text + suffix_text is the templated conversation with the generation prompt, split
    where the history ends, so that a scorer computes the prefix once per user and reuses its
    key/value cache. answer_text is the answer followed by the end-of-turn token.
    """
    prefix = _defuse_special_tokens(prompt.prefix, tokenizer)
    question = _defuse_special_tokens(prompt.question, tokenizer)
    marked = _chat(tokenizer, prefix + _BOUNDARY + question)
    if marked.count(_BOUNDARY) != 1:
        raise ConfigError(
            "the backbone's chat template drops or repeats the user message; use a backbone "
            "whose template renders a system and a user message once each"
        )
    prefix_text, suffix_text = marked.split(_BOUNDARY)
    if prefix_text + suffix_text != _chat(tokenizer, prefix + question):
        raise ConfigError(
            "the backbone's chat template rewrites the user message, so the shared history "
            "prefix cannot be cut out of it; use a backbone whose template keeps message text"
        )
    return prefix_text, suffix_text, prompt.answer + _end_of_turn(tokenizer)


def verbalizer_ids(tokenizer: Any, n_candidates: int) -> dict[str, list[int]]:
    """Token ids the scorer reads at the answer position: "rating" ("1".."5"), "pairwise"
    ([Yes, No]) and "identifiers" (the first `n_candidates` of A..Z). Raises ConfigError when
    one of them is not a single token right after the generation prompt."""
    if not 0 <= n_candidates <= len(IDENTIFIERS):
        raise ConfigError(
            f"{n_candidates} candidates cannot be named by single-letter identifiers "
            f"(at most {len(IDENTIFIERS)}): lower the number of candidates per user"
        )
    opening = _chat(tokenizer, "x")
    base = list(tokenizer.encode(opening, add_special_tokens=False))

    def one_token(text: str) -> int:
        ids = list(tokenizer.encode(opening + text, add_special_tokens=False))
        if len(ids) == len(base) + 1 and ids[: len(base)] == base:
            return int(ids[-1])
        common = 0
        while common < min(len(ids), len(base)) and ids[common] == base[common]:
            common += 1
        pieces = tokenizer.convert_ids_to_tokens(ids[common:])
        raise ConfigError(
            f"the answer {text!r} is not one token after the backbone's generation prompt: it "
            f"tokenizes as {pieces}; the verbalizer scorer needs single-token answers, so choose "
            "a backbone whose tokenizer keeps it whole"
        )

    return {
        "rating": [one_token(r) for r in RATING_TOKENS],
        "pairwise": [one_token(YES), one_token(NO)],
        "identifiers": [one_token(i) for i in IDENTIFIERS[:n_candidates]],
    }


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


# --- the wording: one per task, shared by training and inference ----------------------------


def _history_block(
    catalog: Catalog, history: list[int], rated: dict[int, float], template: str
) -> str:
    # Ratings are shown in every task, not only pointwise, so that all of a user's prompts share
    # this block as one prefix whose key/value cache the scorer computes once (docs/METHOD.md
    # section 6).
    if template == "rr-3":
        # The most recent ratings, oldest first, one line per item: the order is the signal.
        lines = [f"{catalog.describe(i)}: {_format_rating(rated[i])}\n" for i in history]
        return "Ratings a user gave (1 = worst, 5 = best), oldest first:\n" + (
            "".join(lines) if lines else "none yet\n"
        )
    if template == "rr-2":
        # One line per rating, best first, the items of a line in the history's random order:
        # the same ratings as rr-1's one line per item in about 5 fewer tokens per item.
        groups: dict[float, list[str]] = {}
        for i in history:
            groups.setdefault(rated[i], []).append(catalog.describe(i))
        lines = [
            f"{_format_rating(r)}: {' | '.join(groups[r])}\n" for r in sorted(groups, reverse=True)
        ]
        return "Ratings a user gave (1 = worst, 5 = best), items in random order:\n" + (
            "".join(lines) if lines else "none yet\n"
        )
    lines = [f"- {catalog.describe(i)}: rated {_format_rating(rated[i])}/5\n" for i in history]
    # Ends with "\n" and every question starts with a letter: the cut between them is a token
    # boundary for byte-level BPE tokenizers.
    return "Ratings a user gave (1 = worst, 5 = best), in random order:\n" + (
        "".join(lines) if lines else "- none yet\n"
    )


class _Layout:
    """A template's wording of the three tasks over the candidates `shown`: the subclasses
    write the prefix and the questions; the Prompt of each task (answer, label, hint) is the
    same whichever template worded it."""

    template: str
    catalog: Catalog
    prefix: str
    shown: list[int]
    base_order: list[int]

    def _pointwise_question(self, item: int, predicted: float) -> str:
        raise NotImplementedError

    def _pairwise_question(self, first: int, second: int, hint_first: bool) -> str:
        raise NotImplementedError

    def _listwise_question(self, top: int) -> str:
        raise NotImplementedError

    def _listwise_hint(self) -> dict[str, Any]:
        return {}

    def pointwise(
        self, user: int, history: list[int], item: int, predicted: float, rating: int | None
    ) -> Prompt:
        return Prompt(
            task="pointwise",
            user=user,
            prefix=self.prefix,
            question=self._pointwise_question(item, predicted),
            answer="" if rating is None else str(rating),
            items=[item],
            label={} if rating is None else {"rating": rating},
            history=list(history),
            hint={"predicted_rating": predicted},
            template=self.template,
        )

    def pairwise(
        self,
        user: int,
        history: list[int],
        first: int,
        second: int,
        hint_first: bool,
        prefers_first: bool | None,
    ) -> Prompt:
        return Prompt(
            task="pairwise",
            user=user,
            prefix=self.prefix,
            question=self._pairwise_question(first, second, hint_first),
            answer="" if prefers_first is None else (YES if prefers_first else NO),
            items=[first, second],
            label={} if prefers_first is None else {"prefers_first": prefers_first},
            history=list(history),
            hint={"prefers_first": hint_first},
            template=self.template,
        )

    def listwise(
        self,
        user: int,
        history: list[int],
        top: int,
        order: list[int] | None,
        ratings: list[float] | None = None,
    ) -> Prompt:
        name = {item: IDENTIFIERS[j] for j, item in enumerate(self.shown)}
        label: dict[str, Any] = {}
        if order is not None:
            label = {"order": list(order), "identifiers": [name[i] for i in order]}
            if ratings is not None:
                label["ratings"] = list(ratings)
        return Prompt(
            task="listwise",
            user=user,
            prefix=self.prefix,
            question=self._listwise_question(top),
            answer=", ".join(label.get("identifiers", [])),
            items=list(self.shown),
            label=label,
            history=list(history),
            hint={
                "order": self.base_order,
                "identifiers": [name[i] for i in self.base_order],
                **self._listwise_hint(),
            },
            template=self.template,
        )


class _Layout1(_Layout):
    """Template rr-1: the prefix is the history block; each question names its own candidates
    with their hint."""

    template = "rr-1"

    def __init__(
        self,
        catalog: Catalog,
        block: str,
        shown: list[int] | None = None,
        base_order: list[int] | None = None,
    ) -> None:
        self.catalog = catalog
        self.prefix = block
        self.shown = list(shown or [])
        self.base_order = list(base_order or [])

    def _pointwise_question(self, item: int, predicted: float) -> str:
        return (
            f"Item: {self.catalog.describe(item)}\n"
            f"A conventional model predicts {predicted:.1f}.\n"
            "How would the user rate the item (1-5)? Answer with only the rating."
        )

    def _pairwise_question(self, first: int, second: int, hint_first: bool) -> str:
        return (
            f"X: {self.catalog.describe(first)}\n"
            f"Y: {self.catalog.describe(second)}\n"
            f"A conventional model prefers {'X' if hint_first else 'Y'}.\n"
            f"Would the user prefer X over Y? Answer with only {YES} or {NO}."
        )

    def _listwise_question(self, top: int) -> str:
        name = {item: IDENTIFIERS[j] for j, item in enumerate(self.shown)}
        lines = "".join(f"{name[i]}: {self.catalog.describe(i)}\n" for i in self.shown)
        return (
            f"Candidates:\n{lines}"
            f"A conventional model ranks them: {', '.join(name[i] for i in self.base_order)}.\n"
            f"Which {top} candidates would the user like most, best first? "
            "Answer with only their letters, separated by commas."
        )


class _Layout2(_Layout):
    """Template rr-2: one prefix (how questions are answered, the history block, the candidates
    with their predicted ratings, the conventional model's order) shared by every prompt over
    the same candidates, and questions that only name identifiers."""

    template = "rr-2"

    def __init__(
        self,
        catalog: Catalog,
        block: str,
        shown: list[int],
        predicted: list[float],
        base_order: list[int],
    ) -> None:
        self.catalog = catalog
        self.shown = list(shown)
        self.predicted = list(predicted)
        self.base_order = list(base_order)
        self.name = {item: IDENTIFIERS[j] for j, item in enumerate(self.shown)}
        lines = "".join(
            f"{self.name[i]}: {catalog.describe(i)} ~ {p:.1f}\n"
            for i, p in zip(self.shown, self.predicted, strict=True)
        )
        ranked = ", ".join(self.name[i] for i in self.base_order)
        # The instructions first, then the data they are about.
        self.prefix = (
            f"{_RR2_RULES}{block}{_CANDIDATES_HEADER}{lines}"
            f"The conventional model ranks them: {ranked}.\n"
        )

    def _pointwise_question(self, item: int, predicted: float) -> str:
        return f"{self.name[item]} rating?"

    def _pairwise_question(self, first: int, second: int, hint_first: bool) -> str:
        return f"{self.name[first]} over {self.name[second]}?"

    def _listwise_question(self, top: int) -> str:
        return f"Top {top}?"

    def _listwise_hint(self) -> dict[str, Any]:
        return {"predicted_ratings": self.predicted}


class _Layout3(_Layout2):
    """Template rr-3: rr-2's prefix and questions; its history block (`_history_block`) is the
    most recent ratings in time order."""

    template = "rr-3"


def _layout(
    template: str,
    catalog: Catalog,
    block: str,
    shown: list[int],
    predicted: list[float],
    base_order: list[int],
) -> _Layout:
    """The wording of `template` for prompts over the candidates `shown` (rr-1 does not show
    their predicted ratings, so it ignores `predicted`)."""
    if template == "rr-3":
        return _Layout3(catalog, block, shown, predicted, base_order)
    if template == "rr-2":
        return _Layout2(catalog, block, shown, predicted, base_order)
    return _Layout1(catalog, block, shown, base_order)


# --- helpers ----------------------------------------------------------------------------------


class _RatingIndex:
    """Per-user train-period ratings from SplitData's flat rating arrays."""

    def __init__(self, data: SplitData) -> None:
        users = np.asarray(data.rating_users)
        # build_split emits ratings grouped by user in time order; keep that order (a stable
        # sort) when a caller's arrays are not grouped.
        self._order: npt.NDArray[np.intp] | None = None
        if users.size > 1 and bool(np.any(users[1:] < users[:-1])):
            self._order = np.argsort(users, kind="stable")
            users = users[self._order]
        self._users = users
        self._items = np.asarray(data.rating_items)
        self._values = np.asarray(data.rating_values)

    def of(self, user: int, exclude: Iterable[int] = ()) -> dict[int, float]:
        """item -> rating in time order; the latest rating of an item rated twice wins."""
        lo, hi = np.searchsorted(self._users, [user, user + 1])
        rows = np.arange(lo, hi) if self._order is None else self._order[lo:hi]
        skip = set(exclude)
        rated: dict[int, float] = {}
        for item, value in zip(
            self._items[rows].tolist(), self._values[rows].tolist(), strict=True
        ):
            if item not in skip:
                rated.pop(item, None)
                rated[item] = float(value)
        return rated


def _held_out(data: SplitData, user: int) -> list[int]:
    return [int(i) for i in (data.valid_item[user], data.test_item[user]) if i >= 0]


def _interacted(data: SplitData, user: int) -> set[int]:
    """Every item the user interacted with in any period: never offered as an unseen item."""
    return {int(i) for i in data.seen(user, "test")} | set(_held_out(data, user))


def _sample_unseen(
    rng: np.random.Generator, n_items: int, interacted: set[int], k: int
) -> list[int] | None:
    """k distinct items outside `interacted`, or None when there are not that many."""
    if k == 0:
        return []
    if n_items - len(interacted) < k:
        return None
    if len(interacted) * 2 > n_items:
        free = np.setdiff1d(np.arange(n_items), np.fromiter(interacted, dtype=np.int64))
        return [int(i) for i in rng.choice(free, k, replace=False)]
    # Most items are unseen: rejection sampling avoids building the full complement per prompt.
    picked: list[int] = []
    chosen: set[int] = set()
    while len(picked) < k:
        for i in rng.integers(n_items, size=2 * k).tolist():
            if i not in interacted and i not in chosen:
                chosen.add(i)
                picked.append(i)
                if len(picked) == k:
                    break
    return picked


def _pick_history(
    rng: np.random.Generator, items: list[int], history_max: int, template: str = "rr-2"
) -> list[int]:
    """rr-1/rr-2: position shifting, a random order (and a random subset beyond
    `history_max`). rr-3: the most recent `history_max` of `items` (given in time order), in
    time order. The permutation is drawn either way, so the later draws of a seed (pairs, the
    shown order) do not depend on the template."""
    perm = rng.permutation(len(items))
    if template == "rr-3":
        return list(items[-history_max:]) if history_max > 0 else []
    return [items[j] for j in perm[:history_max]]


def _item_scores(hints: HintModel, user: int, n_items: int) -> npt.NDArray[np.floating]:
    scores = np.asarray(hints.item_scores(user))
    if scores.shape != (n_items,):
        raise DataError(
            f"the hint model's item scores for user {user} have shape {scores.shape}, expected "
            f"({n_items},): train the base model on the same split as the prompts"
        )
    return scores


def _predictions(hints: HintModel, user: int, items: list[int]) -> list[float]:
    if not items:
        return []
    raw = np.asarray(hints.predict_ratings(user, np.asarray(items, dtype=np.int64)), dtype=float)
    if raw.shape != (len(items),) or not np.all(np.isfinite(raw)):
        raise DataError(
            f"the hint model's rating predictions for user {user}, items {items} are {raw!r}: "
            "expected one finite rating per item; check the base rating model"
        )
    return [round(float(v), 1) for v in np.clip(raw, RATING_MIN, RATING_MAX)]


def _preference_key(scores: npt.NDArray[np.floating], item: int) -> tuple[float, int]:
    # Higher score first; equal scores by item index, so that asking a pair in both orders
    # always flips the hint.
    return (-float(scores[item]), item)


def _base_order(scores: npt.NDArray[np.floating], shown: list[int]) -> list[int]:
    return sorted(shown, key=lambda i: _preference_key(scores, i))


def _listwise_top(prompt: Prompt) -> int:
    """How many candidates a listwise prompt asks for: its label's length, or for an unlabelled
    (inference) prompt the number its question names."""
    if prompt.label.get("order"):
        return len(prompt.label["order"])
    found = _TOP_ASKED.search(prompt.question)
    if found is None:
        raise DataError(
            f"the listwise prompt of user {prompt.user} asks for no number of candidates; was it "
            f"written by one of this code's templates ({', '.join(TEMPLATES)})?"
        )
    return int(found.group(1) or found.group(2))


def _base_prefers(scores: npt.NDArray[np.floating], first: int, second: int) -> bool:
    return _preference_key(scores, first) < _preference_key(scores, second)


def _inference_pairs(rng: np.random.Generator, n: int, wanted: int) -> list[tuple[int, int]]:
    """Positions of candidate pairs: disjoint while possible (the paper's 5 pairs of 10), then
    further distinct random pairs; all pairs when `wanted` is 0 or at least their number."""
    total = n * (n - 1) // 2
    if wanted == 0 or wanted >= total:
        return list(itertools.combinations(range(n), 2))
    perm = rng.permutation(n).tolist()
    pairs = [(perm[2 * j], perm[2 * j + 1]) for j in range(min(wanted, n // 2))]
    taken = {frozenset(p) for p in pairs}
    while len(pairs) < wanted:
        x, y = (int(v) for v in rng.choice(n, 2, replace=False))
        if frozenset((x, y)) not in taken:
            taken.add(frozenset((x, y)))
            pairs.append((x, y))
    return pairs


def _label_rating(value: float) -> int:
    # Half ratings round up (3.5 -> 4), unlike Python's round-half-to-even.
    return int(min(RATING_MAX, max(RATING_MIN, math.floor(value + 0.5))))


def _format_rating(value: float) -> str:
    return f"{value:g}"


def _check_settings(settings: PromptSettings) -> None:
    if settings.listwise_top > settings.listwise_candidates:
        raise ConfigError(
            f"prompts.listwise_top ({settings.listwise_top}) exceeds prompts.listwise_candidates "
            f"({settings.listwise_candidates}): the label must fit among the candidates"
        )


def _check_catalog(catalog: Catalog, data: SplitData) -> None:
    if len(catalog) != data.n_items:
        raise DataError(
            f"the catalog describes {len(catalog)} items but the split has {data.n_items}: "
            "build it from the split's item_ids (Catalog.from_database(url, data.item_ids))"
        )


def _check_user(data: SplitData, user: int) -> None:
    if not 0 <= user < data.n_users:
        raise DataError(f"user index {user} is outside the split's 0..{data.n_users - 1}")


def _chat(tokenizer: Any, user_message: str) -> str:
    messages = [
        {"role": "system", "content": SYSTEM_MESSAGE},
        {"role": "user", "content": user_message},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(text)


def _special_tokens(tokenizer: Any) -> list[str]:
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens.update(t.content for t in decoder.values() if getattr(t, "special", False))
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _defuse_special_tokens(text: str, tokenizer: Any) -> str:
    # A title that spells a control token ("<|im_end|>") must not end the message early: a
    # zero-width space keeps it readable but stops it from matching the special token.
    for token in _special_tokens(tokenizer):
        if token in text:
            text = text.replace(token, token[0] + "\u200b" + token[1:])
    return text


def _end_of_turn(tokenizer: Any) -> str:
    """The control token the chat template writes after an assistant message (falls back to
    the tokenizer's eos token)."""
    messages = [
        {"role": "system", "content": SYSTEM_MESSAGE},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": _BOUNDARY},
    ]
    text = str(tokenizer.apply_chat_template(messages, tokenize=False))
    tail = text.split(_BOUNDARY, 1)[1] if _BOUNDARY in text else ""
    for token in _special_tokens(tokenizer):
        if tail.startswith(token):
            return token
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ConfigError(
            "the backbone's tokenizer has no end-of-turn or eos token, so answers cannot be "
            "terminated; set eos_token in its tokenizer_config.json"
        )
    return str(eos)
