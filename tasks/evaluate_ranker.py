"""Prefect tasks of the evaluation stage: the ranker to evaluate, and the artifacts a person
reads."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from recranker_core.batch_rank.serving import Ranker
from recranker_core.config import Settings
from tasks.common import TRANSIENT_RETRIES, store_for


@task(
    name="load-ranker",
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def load_ranker_task(
    database_url: str, settings: Settings, adapter_id: int | None = None
) -> Ranker | None:
    """The champion adapter (or adapter `adapter_id`, champion or not) on the backbone."""
    from recranker_core import registry
    from recranker_core.batch_rank.serving import load_ranker

    record = None if adapter_id is None else registry.get_adapter(database_url, adapter_id)
    ranker = load_ranker(database_url, store_for(settings), settings, record)
    if ranker is None:
        get_run_logger().warning("no champion adapter: this run publishes base rankings only")
    else:
        get_run_logger().info(
            "ranker: %s on %s (%s)", ranker.adapter.label, ranker.backbone_id, ranker.device
        )
    return ranker


def publish_eval_artifacts(report: Any, report_path: str) -> None:
    """The docs/METHOD.md table with each method's difference to the base and its interval, the
    guard's decision and the slices, as a table artifact and a markdown artifact."""
    from recranker_core.evaluate_ranker.report import (
        guard_line,
        markdown_table,
        slice_rows,
        table_rows,
    )

    rows = table_rows(report)
    create_table_artifact(
        key="ranker-evaluation",
        table=rows,
        description="HR/NDCG of the base model, each task, the hybrid, the fused and the "
        "published ranking, with each difference to the base and its 95% paired-bootstrap "
        "interval (docs/METHOD.md table)",
    )
    lines = ["### Ranker evaluation", "", f"- {guard_line(report)}"]
    if report.sample:
        lines.append(f"- sample: {report.sample}")
    lines += [
        f"- HTML report with plots: `{report_path}` (file://{report_path})",
        f"- weights: `{report.weights}`",
        "",
        'A difference whose interval contains 0 is written "no measurable difference".',
        "",
        markdown_table(rows),
    ]
    if report.slices:
        lines += ["", "#### Slices (test NDCG@3)", "", markdown_table(slice_rows(report))]
    create_markdown_artifact(
        key="ranker-evaluation-report",
        markdown="\n".join(lines),
        description="The evaluation table with intervals, the guard's decision and the slices",
    )
