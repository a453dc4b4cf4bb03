"""The objectives comparison as Markdown: every objective's rows, and a plain statement when an
adapter kept its starting point (validation never improved), so nobody reads that row as the
objective's effect."""

from __future__ import annotations

from recranker_core.ranker.bias import PositionBias
from recranker_core.ranker.evaluate import EvalReport
from recranker_core.ranker.experiment import ObjectiveResult, comparison_markdown


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
    from recranker_core.ranker.tuning import kept_start_note

    note = kept_start_note(steps=15, best_step=0, objective="sft")
    assert note is not None and "kept step 0 of 15" in note and "untuned backbone" in note
    dmpo = kept_start_note(steps=4, best_step=0, objective="dmpo")
    assert dmpo is not None and "SFT adapter it started from" in dmpo
    assert kept_start_note(steps=15, best_step=8, objective="sft") is None
    assert kept_start_note(steps=0, best_step=0, objective="sft") is None  # nothing was tried
