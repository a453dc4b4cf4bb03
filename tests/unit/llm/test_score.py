"""Verbalizer scoring on a tiny random Llama: the prefix-cached path equals running every full
prompt, padding changes nothing, each task's score follows its formula from the answer tokens'
log-probabilities, task subsets read fewer prompts, and a model that prefers one answer token
shows it in the scores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from recranker_core.base.split import SplitData, build_split
from recranker_core.config import PromptSettings
from recranker_core.errors import ConfigError, DataError
from recranker_core.llm import score as score_module
from recranker_core.llm.builders import build_inference_prompts
from recranker_core.llm.prompts import IDENTIFIERS, Catalog, Prompt
from recranker_core.llm.render import render, verbalizer_ids
from recranker_core.llm.score import UserScores, answer_logprobs, score_users

N_ITEMS = 60
N_USERS = 6
TITLE_WORDS = ("Star", "Night", "River", "Golden", "Lost", "King", "Blue", "Dream", "Fire", "War")
GENRES = ("Drama", "Comedy", "Action", "Thriller", "Romance", "Sci-Fi")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The tiny model's ops are too small to split: with a second busy process on a 2-core machine,
    # OpenMP threads waiting for each other made this module 30x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> SplitData:
    rng = np.random.default_rng(11)
    rows: list[tuple[str, str, float, int]] = []
    for u in range(N_USERS):
        # Histories of different lengths, so that prefixes batched together need padding.
        n = 6 + 3 * u
        items = rng.choice(N_ITEMS, n, replace=False)
        ratings = rng.choice([1, 2, 3, 4, 5, 5], n)
        rows += [
            (f"u{u}", f"m{int(i):02d}", float(r), t)
            for t, (i, r) in enumerate(zip(items, ratings, strict=True))
        ]
        # Three closing likes: every user is evaluable.
        rows += [(f"u{u}", f"m{int(i):02d}", 5.0, n + k) for k, i in enumerate(items[:3])]
    users, items_, values, ts = zip(*rows, strict=True)
    return build_split(users, items_, values, ts, like_threshold=4.0)


@pytest.fixture(scope="module")
def catalog(data: SplitData) -> Catalog:
    titles = [
        f"{TITLE_WORDS[k % 10]} {TITLE_WORDS[(k // 10) % 10]} {k}" for k in range(data.n_items)
    ]
    return Catalog(
        titles=titles,
        years=[1970 + k % 28 for k in range(data.n_items)],
        genres=[[GENRES[k % 6], GENRES[(k + 2) % 6]] for k in range(data.n_items)],
        item_ids=list(data.item_ids),
    )


class PopularityHints:
    """Train-period popularity as item scores and per-item mean ratings as predictions."""

    def __init__(self, data: SplitData) -> None:
        n = data.n_items
        self.counts = np.bincount(data.rating_items, minlength=n).astype(np.float64)
        sums = np.bincount(data.rating_items, weights=data.rating_values, minlength=n)
        self.means = np.where(self.counts > 0, sums / np.maximum(self.counts, 1), 3.0)

    def item_scores(self, user: int) -> npt.NDArray[np.floating]:
        return self.counts

    def predict_ratings(self, user: int, items: npt.NDArray[np.int64]) -> npt.NDArray[np.floating]:
        return self.means[items]


@pytest.fixture(scope="module")
def hints(data: SplitData) -> PopularityHints:
    return PopularityHints(data)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recranker_core.llm.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def loaded(tiny: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    tokenizer.padding_side = "left"
    return model, tokenizer


def entries(
    data: SplitData,
    catalog: Catalog,
    hints: PopularityHints,
    users: list[int],
    settings: PromptSettings | None = None,
) -> list[tuple[int, list[int], list[Prompt]]]:
    """(user, top-10 unseen candidates by popularity, their inference prompts) per user."""
    settings = settings or PromptSettings()
    out = []
    for user in users:
        scores = hints.counts.copy()
        scores[data.seen(user, "test")] = -np.inf
        cands = [int(i) for i in np.argsort(-scores, kind="stable")[:10]]
        prompts = build_inference_prompts(data, catalog, hints, user, cands, "test", settings)
        out.append((user, cands, prompts))
    return out


def assert_same(a: list[UserScores], b: list[UserScores], atol: float = 1e-4) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.user == y.user and x.candidates == y.candidates and x.prompts == y.prompts
        for task in ("pointwise", "pairwise", "listwise"):
            np.testing.assert_allclose(getattr(x, task), getattr(y, task), atol=atol, err_msg=task)


@pytest.mark.parametrize("template", ["rr-1", "rr-2"])
def test_prefix_cached_scores_equal_full_prompt_scores(
    data: SplitData,
    catalog: Catalog,
    hints: PopularityHints,
    loaded: tuple[Any, Any],
    template: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, tokenizer = loaded
    batch = entries(data, catalog, hints, list(range(N_USERS)), PromptSettings(template=template))
    prefix_lengths = [len(tokenizer.encode(render(p[0], tokenizer)[0])) for _, _, p in batch]
    # The users' prefixes differ in length: grouped into one pass they are padded.
    assert len(set(prefix_lengths)) == N_USERS
    reference = score_users(model, tokenizer, batch, prefix_cache=False, batch_size=16)
    assert all(np.all(np.isfinite(s.pointwise)) for s in reference)
    assert all(np.any(s.pairwise != 0) for s in reference)
    # 64 rows: three users' prefixes share one pass; 5 rows: each user alone, several batches.
    for batch_size in (64, 5):
        cached = score_users(model, tokenizer, batch, batch_size=batch_size)
        assert_same(cached, reference)
        for c, r, prefix in zip(cached, reference, prefix_lengths, strict=True):
            # 10 pointwise + 5 pairs in both orders + 1 listwise, the prefix read once.
            assert c.prompts == r.prompts == 21
            assert r.prompt_tokens - c.prompt_tokens == 20 * prefix
    # A user's questions packed into several rows (here a few questions per row) read the
    # same prefix cache and give the same scores.
    monkeypatch.setattr(score_module, "_PACK_TOKENS", 40)
    assert len(score_module._pack_rows([[[0] * 15] * 21])) > 5
    assert_same(score_users(model, tokenizer, batch, batch_size=64), reference)


def test_padding_changes_nothing(
    data: SplitData, catalog: Catalog, hints: PopularityHints, loaded: tuple[Any, Any]
) -> None:
    model, tokenizer = loaded
    batch = entries(data, catalog, hints, [1, 4], PromptSettings(template="rr-1"))
    lengths = [
        [len(tokenizer.encode(render(p, tokenizer)[1])) for p in prompts] for _, _, prompts in batch
    ]
    # The large batch size really pads: both users share a pass, and the questions in one slot
    # of the packed rows differ in length between them.
    assert len(lengths[0]) + len(lengths[1]) <= 64 and lengths[0] != lengths[1]
    alone = score_users(model, tokenizer, batch, batch_size=1)
    together = score_users(model, tokenizer, batch, batch_size=64)
    assert_same(alone, together)
    uncached_alone = score_users(model, tokenizer, batch[:1], batch_size=1, prefix_cache=False)
    assert_same(uncached_alone, together[:1])


def test_each_task_follows_its_formula(
    data: SplitData, catalog: Catalog, hints: PopularityHints, loaded: tuple[Any, Any]
) -> None:
    model, tokenizer = loaded
    [(user, cands, prompts)] = entries(data, catalog, hints, [2])
    [scores] = score_users(model, tokenizer, [(user, cands, prompts)])
    ids = verbalizer_ids(tokenizer, len(cands))
    texts = ["".join(render(p, tokenizer)[:2]) for p in prompts]
    rating = answer_logprobs(model, tokenizer, texts, ids["rating"]).astype(np.float64)
    yes_no = answer_logprobs(model, tokenizer, texts, ids["pairwise"]).astype(np.float64)
    letters = answer_logprobs(model, tokenizer, texts, ids["identifiers"]).astype(np.float64)

    assert np.all((scores.pointwise >= 1) & (scores.pointwise <= 5))
    for n, p in enumerate(prompts):
        if p.task == "pointwise":
            probs = np.exp(rating[n]) / np.exp(rating[n]).sum()
            expected = float(probs @ np.arange(1, 6))
            assert scores.pointwise[cands.index(p.items[0])] == pytest.approx(expected, abs=1e-4)

    # Five disjoint pairs, each asked in both orders: a candidate's score is its one pair's.
    margin = {tuple(p.items): yes_no[n, 0] - yes_no[n, 1] for n, p in enumerate(prompts)}
    pairs = {frozenset(p.items) for p in prompts if p.task == "pairwise"}
    assert len(pairs) == 5 and set().union(*pairs) == set(cands)
    for pair in pairs:
        x, y = sorted(pair)
        pref = (margin[(x, y)] - margin[(y, x)]) / 2
        assert scores.pairwise[cands.index(x)] == pytest.approx(pref, abs=1e-4)
        assert scores.pairwise[cands.index(y)] == pytest.approx(-pref, abs=1e-4)

    (n,) = [n for n, p in enumerate(prompts) if p.task == "listwise"]
    shown = prompts[n].items
    assert sorted(shown) == sorted(cands) and shown != cands  # the letters are shuffled
    assert float(np.logaddexp.reduce(scores.listwise)) == pytest.approx(0.0, abs=1e-9)
    raw = letters[n, : len(shown)]
    for j, item in enumerate(shown):
        expected = raw[j] - np.logaddexp.reduce(raw)
        assert scores.listwise[cands.index(item)] == pytest.approx(expected, abs=1e-4)


def test_all_pairs_are_antisymmetric(
    data: SplitData, catalog: Catalog, hints: PopularityHints, loaded: tuple[Any, Any]
) -> None:
    model, tokenizer = loaded
    batch = entries(data, catalog, hints, [0, 3], PromptSettings(pairwise_pairs=0))
    for scores in score_users(model, tokenizer, batch, tasks=("pairwise",), batch_size=64):
        assert scores.prompts == 90
        # Every candidate meets the same 9 others: the prefs of each pair cancel in the sum.
        assert float(scores.pairwise.sum()) == pytest.approx(0.0, abs=1e-9)
        assert np.ptp(scores.pairwise) > 0


def test_a_task_subset_reads_fewer_prompts(
    data: SplitData, catalog: Catalog, hints: PopularityHints, loaded: tuple[Any, Any]
) -> None:
    model, tokenizer = loaded
    batch = entries(data, catalog, hints, [0, 5])
    full = score_users(model, tokenizer, batch)
    only = score_users(model, tokenizer, batch, tasks=("listwise",))
    for f, o in zip(full, only, strict=True):
        assert o.prompts == 1 and f.prompts == 21
        assert o.prompt_tokens < f.prompt_tokens
        assert np.all(np.isnan(o.pointwise)) and np.all(o.pairwise == 0)
        np.testing.assert_allclose(o.listwise, f.listwise, atol=1e-4)
    uncached = score_users(model, tokenizer, batch, tasks=("listwise",), prefix_cache=False)
    assert_same(uncached, only)


def test_a_model_that_prefers_one_answer_token(
    data: SplitData, catalog: Catalog, hints: PopularityHints, tiny: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model.eval()
    batch = entries(data, catalog, hints, list(range(4)))
    plain = score_users(model, tokenizer, batch)

    ids = verbalizer_ids(tokenizer, 10)
    favourite = "C"
    head = model.lm_head
    # The output layer is tied to the input embeddings: a bias moves only the answers read.
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[ids["identifiers"][IDENTIFIERS.index(favourite)]] = 30.0
        biased.bias[ids["rating"][4]] = 30.0  # "5"
        biased.bias[ids["pairwise"][0]] = 30.0  # "Yes", whatever is asked
    model.lm_head = biased
    preferred = score_users(model, tokenizer, batch)
    assert_same(preferred, score_users(model, tokenizer, batch, prefix_cache=False))

    for (_, cands, prompts), before, after in zip(batch, plain, preferred, strict=True):
        (listwise,) = [p for p in prompts if p.task == "listwise"]
        named = listwise.items[IDENTIFIERS.index(favourite)]
        assert int(np.argmax(after.listwise)) == cands.index(named)
        assert after.listwise[cands.index(named)] > -1e-6
        np.testing.assert_allclose(after.pointwise, 5.0, atol=1e-6)
        # A "Yes" bias shifts both orders of a pair alike: asking both cancels it.
        np.testing.assert_allclose(after.pairwise, before.pairwise, atol=1e-4)


def test_bad_inputs_are_refused(
    data: SplitData, catalog: Catalog, hints: PopularityHints, loaded: tuple[Any, Any]
) -> None:
    model, tokenizer = loaded
    [(user, cands, prompts)] = entries(data, catalog, hints, [0])
    with pytest.raises(ConfigError, match="tasks"):
        score_users(model, tokenizer, [(user, cands, prompts)], tasks=("ranking",))
    with pytest.raises(DataError, match="prompt of user 0"):
        score_users(model, tokenizer, [(1, cands, prompts)])
    with pytest.raises(DataError, match="not among the candidates"):
        score_users(model, tokenizer, [(user, cands[:5], prompts)])
    assert score_users(model, tokenizer, []) == []
    [empty] = score_users(model, tokenizer, [(user, cands, [])])
    assert empty.prompts == 0 and empty.prompt_tokens == 0
    assert np.all(np.isnan(empty.listwise)) and np.all(empty.pairwise == 0)
