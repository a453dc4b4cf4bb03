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
from collections.abc import Iterable
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
