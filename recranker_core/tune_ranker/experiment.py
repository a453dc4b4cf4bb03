"""The objectives experiment (issue: ALRO and DMPO against plain SFT): the same sampled users,
instruction data and budget tuned with each objective, each adapter evaluated with the
docs/METHOD.md table and the listwise position-bias measure, and one comparison written as
Markdown and JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recranker_core.evaluate_ranker.bias import PositionBias
from recranker_core.evaluate_ranker.evaluate import EvalReport
from recranker_core.evaluate_ranker.report import METRICS

OBJECTIVE_ORDER = ("sft", "alro", "dmpo")


@dataclass
class ObjectiveResult:
    """One objective's adapter, tuning cost, table and position bias."""

    objective: str
    adapter_id: int
    tuning: dict[str, Any]  # steps, seconds, tokens_per_second, init_adapter_id, ...
    report: EvalReport
    bias: PositionBias
    inference_tokens_per_user: float  # prompt tokens through the model per scored test user
    evaluation_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "adapter_id": self.adapter_id,
            "evaluation_id": self.evaluation_id,
            "tuning": self.tuning,
            "table": self.report.table,
            "diff_ci": self.report.diff_ci,
            "guard": self.report.guard.as_json() if self.report.guard is not None else None,
            "weights": self.report.weights,
            "counts": self.report.counts,
            "position_bias": self.bias.as_json(),
            "inference_tokens_per_user": round(self.inference_tokens_per_user, 1),
        }


def tokens_per_user(report: EvalReport, target: str = "test") -> float:
    counts = report.counts.get(target, {})
    users = counts.get("item_in_candidates", 0)
    return counts.get("prompt_tokens", 0) / users if users else float("nan")


def _fmt(value: float) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.4f}"
    )


def comparison_markdown(results: list[ObjectiveResult], context: dict[str, Any]) -> str:
    """The comparison: one docs/METHOD.md table per objective (validation and test), then the
    position bias and cost of each objective side by side."""
    lines = ["# Tuning objectives: SFT vs ALRO vs DMPO", ""]
    lines += [f"- {key}: {value}" for key, value in context.items()]
    lines += [
        "",
        "## Ranking quality (HR/NDCG over all sampled evaluable users; misses count as misses)",
        "",
    ]
    header = "| objective | method | split | " + " | ".join(METRICS) + " |"
    lines += [header, "|" + "---|" * (3 + len(METRICS))]
    for r in results:
        for method, targets in r.report.table.items():
            for split, metrics in targets.items():
                values = " | ".join(_fmt(metrics.get(m, float("nan"))) for m in METRICS)
                lines.append(f"| {r.objective} | {method} | {split} | {values} |")
    lines += _against_base(results)
    lines += [
        "",
        "## Listwise position bias and cost",
        "",
        "Spearman correlation between a listwise prompt's scores in the shown order and with "
        "the candidates shuffled (mapped back to items; 1.0 = the order does not matter), and "
        "the share of shuffles that keep the same top item. Inference cost: prompt tokens run "
        "per scored test user (all three tasks, shared prefix once).",
        "",
        "| objective | adapter | listwise spearman | top-1 kept | prompts x shuffles | "
        "tuning steps | kept step | tuning s | tokens/user (inference) | test hybrid ndcg@3 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        test_hybrid = r.report.table.get("hybrid", {}).get("test", {}).get("ndcg@3", float("nan"))
        lines.append(
            f"| {r.objective} | {r.adapter_id} | {_fmt(r.bias.mean_spearman)} | "
            f"{_fmt(r.bias.top1_agreement)} | {r.bias.prompts} x {r.bias.shuffles} | "
            f"{r.tuning.get('steps', '')} | {r.tuning.get('best_step', '')} | "
            f"{r.tuning.get('seconds', '')} | "
            f"{r.inference_tokens_per_user:.0f} | {_fmt(test_hybrid)} |"
        )
    unmoved = [r.objective for r in results if r.tuning.get("best_step") == 0]
    if unmoved:
        lines += [
            "",
            f"Kept step 0 ({', '.join(unmoved)}): validation never improved on the starting point, "
            "so the stored adapter is that starting point (the untuned backbone for sft and alro, "
            "the SFT adapter for dmpo) and its rows measure it, not the objective. A larger "
            "budget (more users and steps) is needed to compare those objectives.",
        ]
    return "\n".join(lines) + "\n"


# The rows of the comparison against the base model, in this order where present.
_AGAINST_BASE = ("fused", "published", "hybrid", "pointwise", "pairwise", "listwise")


def _against_base(results: list[ObjectiveResult]) -> list[str]:
    """Per objective, each method's test NDCG@3 minus the base model's with its paired-bootstrap
    95% interval over the same users, and the guard's decision on the validation users."""
    lines = [
        "",
        "## Test NDCG@3 against the base model",
        "",
        "Difference to the base model's order on the same test users, with its paired-bootstrap "
        "95% interval (an interval that holds 0 is no measurable difference). The guard here is "
        "the evaluation's, cross-fitted on all validation users; `published` is what it serves: "
        "the fused ranking when that gain exceeds one standard error, else the base order.",
        "",
        "| objective | guard (gain ± se on validation) | method | test ndcg@3 | minus base | "
        "95% interval |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        table = r.report.table
        base = table.get("base", {}).get("test", {}).get("ndcg@3")
        guard = r.report.guard
        said = (
            f"serves {guard.served} ({guard.gain:+.4f} ± {guard.se:.4f})"
            if guard is not None
            else "n/a"
        )
        for method in _AGAINST_BASE:
            value = table.get(method, {}).get("test", {}).get("ndcg@3")
            if value is None or base is None:
                continue
            ci = r.report.diff_ci.get(method, {}).get("test", {}).get("ndcg@3")
            interval = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "n/a"
            lines.append(
                f"| {r.objective} | {said} | {method} | {_fmt(value)} | {value - base:+.4f} "
                f"| {interval} |"
            )
    return lines


def write_comparison(
    results: list[ObjectiveResult], context: dict[str, Any], directory: Path
) -> tuple[Path, Path]:
    """objectives-<UTC stamp>.md and .json under `directory`; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    md = directory / f"objectives-{stamp}.md"
    js = directory / f"objectives-{stamp}.json"
    md.write_text(comparison_markdown(results, context))
    js.write_text(
        json.dumps(
            {"context": context, "results": [r.as_json() for r in results]},
            indent=2,
            default=str,
        )
    )
    return md, js
