"""The ranker's evaluation table without an LLM: hints at evaluation follow the candidates'
own order (also for the test target of a sequence model), scoring only the hits gives the
table of scoring everyone, and the new rows (fused, published), intervals and slices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recranker_core.batch_rank.fusion import FusedWeights, fused_order
from recranker_core.batch_rank.hybrid import Weights, order_for_mode
from recranker_core.config import Settings
from recranker_core.evaluate_ranker.evaluate import (
    METHODS,
    TargetScores,
    build_report,
    popularity_tiers,
    target_candidates,
    target_prompts,
)
from recranker_core.llm.score import UserScores
from recranker_core.metrics import rank_metrics


def sasrec_context():
    import torch

    from recranker_core.base.models import BiasedMF, SASRec
    from recranker_core.base.split import build_split
    from recranker_core.tune_ranker.context import BaseContext

    rng = np.random.default_rng(7)
    n = 4000
    users = rng.integers(0, 60, n).astype(str)
    items = rng.integers(0, 80, n).astype(str)
    data = build_split(users, items, rng.integers(1, 6, n), np.arange(n))
    torch.manual_seed(0)
    model = SASRec(data.n_users, data.n_items, dim=16, max_len=8, layers=1, heads=2)
    model.set_sequences(data.train_sequences)
    model.eval()
    return BaseContext(1, "sasrec", model, data, BiasedMF(data.n_users, data.n_items, 8))


def catalog_for(data):
    from recranker_core.llm.prompts import Catalog

    return Catalog(
        titles=[f"Film {i}" for i in data.item_ids],
        years=[1990 + k % 20 for k in range(data.n_items)],
        genres=[["Drama"] for _ in range(data.n_items)],
        item_ids=list(data.item_ids),
    )


def test_test_prompts_show_the_candidates_order_not_the_stale_train_sequence_order(tmp_path):
    from recranker_core.llm.builders import build_inference_prompts
    from recranker_core.tune_ranker.context import BaseHints

    ctx = sasrec_context()
    settings = Settings(home=tmp_path)
    catalog = catalog_for(ctx.data)
    hints = BaseHints(ctx)
    ts = target_candidates(ctx, settings, "test")
    rows = np.flatnonzero(ts.positions >= 0).tolist()
    assert len(rows) >= 5
    stale = 0
    for user, row, prompts in target_prompts(ctx, catalog, hints, ts, settings, rows):
        listwise = next(p for p in prompts if p.task == "listwise")
        assert listwise.hint["order"] == row, user
        # The candidates' base scores are in their order, best first.
        scores = ts.base_scores[ts.users.tolist().index(user)]
        assert np.all(np.diff(scores) <= 0)
        old = build_inference_prompts(ctx.data, catalog, hints, user, row, "test", settings.prompts)
        stale += next(p for p in old if p.task == "listwise").hint["order"] != row
    # What this replaces: the train-sequence scores order the same candidates differently.
    assert stale > 0


def synthetic_target(target: str, rng, n_users: int = 60, n: int = 6):
    """A target with candidates, base scores, positions and LLM scores for EVERY user (misses
    included), and the TargetScores the shortcut keeps (only the hits' scores)."""
    users = np.arange(n_users, dtype=np.int64)
    cands = np.array([rng.choice(100, n, replace=False) for _ in users])
    held = np.where(
        rng.random(n_users) < 0.6,
        cands[np.arange(n_users), rng.integers(0, n, n_users)],
        100 + users,
    )
    hit = cands == held[:, None]
    positions = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
    everyone = {
        int(u): UserScores(
            int(u),
            cands[u].tolist(),
            rng.integers(1, 6, n).astype(float),
            rng.normal(size=n),
            rng.normal(size=n) + 2.0 * hit[u],  # listwise knows something
            3,
            100,
        )
        for u in users
    }
    ts = TargetScores(
        target,
        users,
        positions.astype(np.int64),
        {u: s for u, s in everyone.items() if positions[u] >= 0},
        candidates=cands,
        base_scores=np.sort(rng.random((n_users, n)), axis=1)[:, ::-1],  # best first
        likes=rng.integers(3, 80, n_users),
        item_tier=rng.integers(0, 3, n_users),
        n_evaluable=n_users,
    )
    return ts, everyone, held


def full_computation(ts, everyone, held, order, n):
    """Every user scored and ranked: the held-out item's rank in the re-ordered candidate
    items, or a miss (n) when it is not one of them."""
    ranks = []
    for i, u in enumerate(ts.users.tolist()):
        ranked = [int(ts.candidates[i][j]) for j in order(ts.base_scores[i], everyone[u])]
        ranks.append(ranked.index(int(held[i])) if held[i] in ranked else n)
    return rank_metrics(np.array(ranks))


def test_scoring_only_the_hits_gives_the_table_of_scoring_everyone():
    rng = np.random.default_rng(11)
    valid, all_valid, held_valid = synthetic_target("valid", rng)
    test, all_test, held_test = synthetic_target("test", rng)
    configured = Weights(0.2, 0.3, 0.5)
    report = build_report([valid, test], configured, 6, tune_step=0.25, n_boot=200)
    assert list(report.table) == list(METHODS)
    tuned = Weights(**report.weights["tuned_on_valid"])
    fused = FusedWeights.from_dict(report.weights["fused_on_valid"])
    assert report.guard is not None

    def task(mode, w):
        return lambda base, s: order_for_mode(mode, s.pointwise, s.pairwise, s.listwise, w)

    def fusion(w):
        return lambda base, s: fused_order(base, s.pointwise, s.pairwise, s.listwise, w)

    def base_order(base, s):
        return np.arange(len(base))

    orders = {
        "base": base_order,
        "pointwise": task("pointwise", configured),
        "pairwise": task("pairwise", configured),
        "listwise": task("listwise", configured),
        "hybrid": task("hybrid", configured),
        "hybrid_tuned": task("hybrid", tuned),
        "fused": fusion(fused),
        "published": fusion(fused) if report.guard.served == "fused" else base_order,
    }
    for ts, everyone, held in ((valid, all_valid, held_valid), (test, all_test, held_test)):
        for method, order in orders.items():
            expected = full_computation(ts, everyone, held, order, 6)
            assert report.table[method][ts.target] == pytest.approx(expected), method
    # Listwise carries signal: the guard serves the fusion, and its interval on test is > 0.
    assert report.guard.served == "fused"
    lo, hi = report.diff_ci["published"]["test"]["ndcg@3"]
    assert 0 < lo < hi
    assert set(report.diff_ci) == set(METHODS) - {"base"}
    assert set(report.diff_ci["fused"]["valid"]) == {"ndcg@3", "ndcg@10", "hr@3"}


def test_published_is_the_base_order_when_the_guard_says_so_and_slices_add_up():
    rng = np.random.default_rng(5)
    valid, _, _ = synthetic_target("valid", rng)
    test, _, _ = synthetic_target("test", rng)
    for ts in (valid, test):  # LLM scores that know nothing: the guard keeps the base order
        for s in ts.scores.values():
            s.pointwise[:] = 3.0
            s.pairwise[:] = 0.0
            s.listwise[:] = 0.0
    report = build_report([valid, test], Weights(), 6, tune_step=0.25, n_boot=200)
    assert report.guard is not None and report.guard.served == "base"
    assert report.table["published"] == report.table["base"]
    assert report.diff_ci["published"]["test"]["ndcg@3"] == [0.0, 0.0]
    likes = report.slices["train_likes"]
    assert sum(s["users"] for s in likes.values()) == test.users.size
    assert likes["<=10"]["users"] == int((test.likes <= 10).sum())
    items = report.slices["item_popularity"]
    assert [items[t]["users"] for t in ("head", "torso", "tail")] == [
        int((test.item_tier == t).sum()) for t in range(3)
    ]
    # A slice's NDCG@3 of the base model is the mean over its users (misses 0).
    few = test.likes <= 10
    gains = [1 / math.log2(p + 2) if 0 <= p < 3 else 0.0 for p in test.positions[few].tolist()]
    assert likes["<=10"]["methods"]["base"]["ndcg@3"] == pytest.approx(np.mean(gains))
    assert likes["<=10"]["methods"]["published"]["ci"] == [0.0, 0.0]
    as_json = report.as_json()
    assert as_json["guard"]["served"] == "base" and as_json["base"] == report.table["base"]
    assert set(as_json) >= {"diff_ci", "slices", "weights"}


def test_a_sample_says_so():
    rng = np.random.default_rng(1)
    test, _, _ = synthetic_target("test", rng)
    test.n_evaluable = 500
    report = build_report([test], Weights(), 6, n_boot=50)
    assert report.sample is not None and "60 of 500" in report.sample
    assert report.guard is None and "fused" not in report.table  # no validation target
    assert report.counts["test"]["all_evaluable_users"] == 500


def test_popularity_tiers_by_hand():
    # Likes per item: 5 0 9 1 1 7 -> most liked first: items 2, 5 | 0, 3 | 4, 1 (ties by index).
    assert popularity_tiers([5, 0, 9, 1, 1, 7]).tolist() == [1, 2, 0, 1, 2, 0]
    assert popularity_tiers([3, 3, 3]).tolist() == [0, 1, 2]


def test_the_report_shows_intervals_in_words_tables_and_error_bars(tmp_path):
    from recranker_core.evaluate_ranker.report import (
        NO_DIFFERENCE,
        difference_text,
        slice_rows,
        table_rows,
        write_html,
    )

    rng = np.random.default_rng(11)
    valid, _, _ = synthetic_target("valid", rng)
    test, _, _ = synthetic_target("test", rng)
    report = build_report([valid, test], Weights(), 6, tune_step=0.25, n_boot=200)
    assert difference_text(0.01, -0.001, 0.02).startswith(NO_DIFFERENCE)
    assert difference_text(-0.01, -0.02, -0.001) == "-0.0100 [-0.0200, -0.0010]"
    rows = {(r["method"], r["split"]): r for r in table_rows(report)}
    published = rows[("published", "test")]["ndcg@3 vs base"]
    lo, hi = report.diff_ci["published"]["test"]["ndcg@3"]
    assert published.startswith("+") and f"{lo:+.4f}" in published and f"{hi:+.4f}" in published
    # Identical to the base on every user: never written as a gain.
    assert rows[("base", "test")]["ndcg@3 vs base"] == ""
    assert len(slice_rows(report)) == 6 * len(report.table)
    page = write_html(report, tmp_path, title="t", context={"base model": "1 (mf)"}).read_text()
    assert "<td>base model</td>" in page and "{" not in page.split("<h2>Run</h2>")[1][:300]
    assert page.count('stroke-width="1.5"') >= len(report.diff_ci)  # one error bar each
    assert 'text-anchor="end">0.000</text>' in page  # the bar charts' value axis
    assert "95% paired-bootstrap" in page and report.guard.reason in page


def test_recranker_eval_prints_the_guard_the_rows_and_the_intervals(capsys):
    from cli.common import _served
    from cli.ranker import _print_evaluation
    from recranker_core.evaluate_ranker.report import slice_rows, table_rows

    rng = np.random.default_rng(11)
    valid, _, _ = synthetic_target("valid", rng)
    test, _, _ = synthetic_target("test", rng)
    test.n_evaluable = 90
    report = build_report([valid, test], Weights(), 6, tune_step=0.25, n_boot=100)
    assert report.guard is not None
    _print_evaluation(
        {
            "sample": report.sample,
            "guard": report.guard.as_json(),
            "rows": table_rows(report),
            "slices": slice_rows(report),
            "weights": report.weights,
            "report": "/tmp/r.html",
        }
    )
    out = capsys.readouterr().out
    assert out.startswith("SAMPLE: a seeded random sample of 60 of 90")
    assert f"guard: serves FUSED: {report.guard.reason}" in out
    assert "published     test   ndcg@3 vs base +" in out
    assert "train_likes <=10" in out and "report: /tmp/r.html" in out
    assert _served(report.guard.as_json()).startswith("fused +")
    assert _served(None) == "-" and _served({"served": "base"}) == "base"


def test_published_follows_the_decision_stored_with_the_adapter():
    """What a `fused` run serves is the adapter's stored decision: a stored "base" publishes
    the base order even where the evaluation's own guard would serve the fusion, and a stored
    "fused" publishes its own weights."""
    from dataclasses import replace

    rng = np.random.default_rng(11)
    valid, _, _ = synthetic_target("valid", rng)
    test, _, _ = synthetic_target("test", rng)
    measured = build_report([valid, test], Weights(), 6, tune_step=0.25, n_boot=200)
    assert measured.guard is not None and measured.guard.served == "fused"
    stored_base = replace(measured.guard, served="base", reason="stored: base")
    report = build_report(
        [valid, test], Weights(), 6, tune_step=0.25, n_boot=200, stored=stored_base
    )
    assert report.table["published"] == report.table["base"]
    assert report.table["fused"] == measured.table["fused"]
    as_json = report.as_json()
    assert as_json["guard"]["served"] == "base"
    assert as_json["guard_evaluation"]["served"] == "fused"
    listwise_only = FusedWeights(0.0, 0.0, 0.0, 1.0)
    stored_fused = replace(measured.guard, served="fused", weights=listwise_only)
    report = build_report(
        [valid, test], Weights(), 6, tune_step=0.25, n_boot=200, stored=stored_fused
    )
    assert report.table["published"]["test"] == pytest.approx(
        build_report([valid, test], Weights(), 6, n_boot=50).table["listwise"]["test"]
    )
