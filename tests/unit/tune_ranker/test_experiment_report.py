"""The objectives comparison as Markdown: every objective's rows, and a plain statement when an
adapter kept its starting point (validation never improved), so nobody reads that row as the
objective's effect."""

from __future__ import annotations

from recranker_core.evaluate_ranker.bias import PositionBias
from recranker_core.evaluate_ranker.evaluate import EvalReport
from recranker_core.tune_ranker.experiment import ObjectiveResult, comparison_markdown


def result(objective: str, best_step: int, ndcg3: float) -> ObjectiveResult:
    metrics = {"hr@3": 0.1, "ndcg@3": ndcg3}
    report = EvalReport(
        table={"hybrid": {"valid": metrics, "test": metrics}},
        weights={},
        counts={"test": {"item_in_candidates": 4, "prompt_tokens": 400}},
        positions={},
        seconds={},
    )
    return ObjectiveResult(
        objective=objective,
        adapter_id=1,
        tuning={"steps": 15, "best_step": best_step, "seconds": 10.0},
        report=report,
        bias=PositionBias(prompts=5, shuffles=3, mean_spearman=0.5, top1_agreement=0.2),
        inference_tokens_per_user=100.0,
    )


def test_markdown_lists_each_objective_and_flags_adapters_that_kept_step_0() -> None:
    text = comparison_markdown(
        [result("sft", 0, 0.05), result("alro", 8, 0.06), result("dmpo", 0, 0.05)],
        {"device": "cpu"},
    )
    assert "| alro | hybrid | test | 0.1000 | n/a | n/a | 0.0600 |" in text
    assert "| sft | 1 | 0.5000 | 0.2000 | 5 x 3 | 15 | 0 | 10.0 | 100 | 0.0500 |" in text
    assert "Kept step 0 (sft, dmpo)" in text

    moved = comparison_markdown([result("sft", 15, 0.05)], {})
    assert "Kept step 0" not in moved


def test_a_tuning_run_that_kept_its_starting_point_says_so() -> None:
    from recranker_core.tune_ranker.adapter import kept_start_note

    note = kept_start_note(steps=15, best_step=0, objective="sft")
    assert note is not None and "kept step 0 of 15" in note and "untuned backbone" in note
    dmpo = kept_start_note(steps=4, best_step=0, objective="dmpo")
    assert dmpo is not None and "SFT adapter it started from" in dmpo
    assert kept_start_note(steps=15, best_step=8, objective="sft") is None
    assert kept_start_note(steps=0, best_step=0, objective="sft") is None  # nothing was tried


def test_each_objective_is_compared_with_the_base_with_its_interval_and_guard() -> None:
    from recranker_core.batch_rank.fusion import FusedWeights, GuardDecision

    def row(v: float) -> dict[str, dict[str, float]]:
        return {"valid": {"ndcg@3": v}, "test": {"ndcg@3": v}}

    guard = GuardDecision(
        served="base",
        gain=0.0018,
        se=0.0036,
        weights=FusedWeights(0.6, 0.1, 0.2, 0.1),
        k=3,
        n_users=942,
        n_hits=223,
        base_ndcg=0.12,
        fused_ndcg=0.1218,
        users_hash="x",
        reason="no gain",
    )
    r = result("alro", 8, 0.06)
    r.report.table.update(base=row(0.0773), fused=row(0.0800), published=row(0.0773))
    r.report.diff_ci = {
        "fused": {"test": {"ndcg@3": [-0.0038, 0.0091]}},
        "published": {"test": {"ndcg@3": [0.0, 0.0]}},
    }
    r.report.guard = guard
    text = comparison_markdown([r], {})
    served = "serves base (+0.0018 ± 0.0036)"
    assert f"| alro | {served} | fused | 0.0800 | +0.0027 | [-0.0038, +0.0091] |" in text
    assert f"| alro | {served} | published | 0.0773 | +0.0000 | [+0.0000, +0.0000] |" in text
    # The hybrid row has no interval in this report: said, not invented.
    assert f"| alro | {served} | hybrid | 0.0600 | -0.0173 | n/a |" in text
    js = r.as_json()
    assert js["diff_ci"]["fused"]["test"]["ndcg@3"] == [-0.0038, 0.0091]
    assert js["guard"]["served"] == "base" and js["guard"]["se"] == 0.0036
