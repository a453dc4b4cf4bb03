"""Training data on the served task: the shadow split ends before each user's last likes, the
prompts of a cut are built as serving builds them (history before the cut, the shadow model's
candidates in base order, the next like as the answer), and nothing from the validation or test
period reaches a prompt, its candidates or the shadow models."""

from __future__ import annotations

import numpy as np
import pytest

from recranker_core.base.split import SplitData, build_split
from recranker_core.config import BaseTrainSettings, PromptSettings
from recranker_core.llm.prompts import IDENTIFIERS, Catalog
from recranker_core.tune_ranker.served_data import (
    ShadowData,
    ShadowModels,
    build_served_prompts,
    shadow_split,
    train_shadow_models,
    user_ratings,
)

N_ITEMS = 80


def rows() -> list[tuple[str, str, float, int]]:
    rng = np.random.default_rng(3)
    out: list[tuple[str, str, float, int]] = []
    for u in range(30):
        items = rng.choice(N_ITEMS, 30, replace=False)
        ratings = rng.choice([1, 2, 3, 4, 4, 5, 5], 30)
        out += [
            (f"u{u:02d}", f"i{int(i):02d}", float(r), t)
            for t, (i, r) in enumerate(zip(items, ratings, strict=True))
        ]
    # Re-rates an item it rated before: that like is no next like (no cut there).
    out += [("again", f"i{k:02d}", 5.0, k) for k in range(8)]
    out += [("again", "i00", 5.0, 8), ("again", "i70", 1.0, 9)]
    out += [("again", f"i{k:02d}", 4.0, 10 + k) for k in range(60, 63)]
    return out


@pytest.fixture(scope="module")
def data() -> SplitData:
    users, items, ratings, ts = zip(*rows(), strict=True)
    return build_split(users, items, ratings, ts, like_threshold=4.0)


@pytest.fixture(scope="module")
def catalog(data: SplitData) -> Catalog:
    return Catalog(
        titles=[f"Film {i}#" for i in data.item_ids],
        years=[1990] * data.n_items,
        genres=[["Drama"]] * data.n_items,
        item_ids=list(data.item_ids),
    )


@pytest.fixture(scope="module")
def shadow(data: SplitData) -> ShadowData:
    return shadow_split(data, 3)


@pytest.fixture(scope="module")
def models(shadow: ShadowData) -> ShadowModels:
    settings = BaseTrainSettings()
    settings.mf.epochs = 3
    settings.biasedmf.epochs = 3
    return train_shadow_models("mf", shadow, settings)


def test_cuts_are_the_last_likes_and_the_shadow_split_ends_before_them(data, shadow):
    per_user = user_ratings(data)
    shadow_rows = user_ratings(shadow.data)
    assert shadow.cuts, "the synthetic users have likes to cut at"
    for user, cuts in shadow.cuts.items():
        items, values = per_user[user]
        likes = [j for j in range(1, items.size) if values[j] >= 4 and items[j] not in items[:j]]
        assert [c.at for c in cuts] == likes[-3:]
        assert all(c.item == items[c.at] for c in cuts)
        kept, _ = shadow_rows[user]
        # The shadow models see the user's ratings strictly before the first cut, and no more.
        assert kept.tolist() == items[: cuts[0].at].tolist()
        assert shadow.data.valid_item[user] == cuts[0].item
        assert set(shadow.data.train_items(user).tolist()) <= set(items[: cuts[0].at].tolist())
    again = data.user_ids.index("again")
    items, _ = per_user[again]
    assert all(items[c.at] != data.item_ids.index("i00") for c in shadow.cuts[again])


def test_served_prompts_are_built_as_serving_builds_them(data, shadow, models, catalog):
    settings = PromptSettings(history_max=10, template="rr-3", pairwise_pairs=3)
    users = np.array(sorted(shadow.cuts), dtype=np.int64)
    prompts, counts = build_served_prompts(shadow, models, catalog, users, settings, 10)
    assert counts["cuts"] == sum(len(c) for c in shadow.cuts.values())
    assert counts["listwise"] == counts["cuts"]
    per_user = user_ratings(data)
    by_cut: dict[tuple[int, int], list] = {}
    for p in prompts:
        by_cut.setdefault((p.user, p.label["cut"]), []).append(p)
    assert len(by_cut) == counts["cuts"]
    for (user, at), mine in by_cut.items():
        items, values = per_user[user]
        next_like = int(items[at])
        before = items[:at].tolist()
        assert len({p.prefix for p in mine}) == 1, "one shared prefix per cut"
        listwise = next(p for p in mine if p.task == "listwise")
        assert len(listwise.items) == 10 and next_like in listwise.items
        # The answer's first identifier names the next like.
        first = listwise.answer.split(",")[0].strip()
        assert listwise.items[IDENTIFIERS.index(first)] == next_like
        assert listwise.label["order"][0] == next_like
        # Candidates are unseen at the cut; the history is the most recent ratings before it.
        assert not set(listwise.items) & set(before)
        assert listwise.history == list(dict.fromkeys(reversed(before)))[::-1][-10:]
        # Pointwise only for candidates rated later, with that rating.
        later = dict(zip(items[at:].tolist(), values[at:].tolist(), strict=True))
        for p in (p for p in mine if p.task == "pointwise"):
            assert p.items[0] in later and int(p.answer) == round(later[p.items[0]])
        pairs = [p for p in mine if p.task == "pairwise"]
        assert len(pairs) == 2 * min(3, sum(1 for i in listwise.items if later.get(i, 0) < 4))
        for p in pairs:
            assert next_like in p.items
            assert p.answer == ("Yes" if p.items[0] == next_like else "No")


def test_nothing_from_the_validation_or_test_period_reaches_a_prompt(data, shadow, models, catalog):
    settings = PromptSettings(history_max=50, template="rr-3")
    users = np.array(sorted(shadow.cuts), dtype=np.int64)
    prompts, _ = build_served_prompts(shadow, models, catalog, users, settings, 10)
    for p in prompts:
        held = {int(data.valid_item[p.user]), int(data.test_item[p.user])} - {-1}
        shown = set(p.items) | set(p.history) | set(p.label.get("order", []))
        assert not shown & held, f"user {p.user} sees a held-out item"
        for item in held:
            assert catalog.describe(item) not in p.prefix + p.question
    # The shadow models were fitted on fewer ratings than the train period holds.
    assert shadow.counts["shadow_ratings"] < shadow.counts["train_ratings"]
    assert models.model.full_scores(np.array([0])).shape == (1, data.n_items)


def test_base_order_hint_is_the_candidates_order(data, shadow, models, catalog):
    settings = PromptSettings(history_max=10, template="rr-3")
    users = np.array(sorted(shadow.cuts)[:5], dtype=np.int64)
    prompts, _ = build_served_prompts(shadow, models, catalog, users, settings, 10)
    for p in (p for p in prompts if p.task == "listwise"):
        order = p.hint["order"]
        assert sorted(order) == sorted(p.items)
        # The hint lists the candidates in the shadow model's order (the next like in its
        # own place or a random slot): the shown order is a shuffle of it.
        assert "The conventional model ranks them: " in p.prefix


def test_repeated_entries_get_fresh_shuffles(shadow, models, catalog):
    settings = PromptSettings(history_max=10, template="rr-3")
    user = sorted(shadow.cuts)[0]
    prompts, counts = build_served_prompts(
        shadow, models, catalog, np.array([user, user]), settings, 10
    )
    lists = [p for p in prompts if p.task == "listwise"]
    assert len(lists) == 2 * len(shadow.cuts[user])
    half = len(lists) // 2
    assert any(a.items != b.items for a, b in zip(lists[:half], lists[half:], strict=True))
    assert all(
        sorted(a.items) == sorted(b.items) for a, b in zip(lists[:half], lists[half:], strict=True)
    )
