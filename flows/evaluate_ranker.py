"""Flow `evaluate-ranker`: the docs/METHOD.md table (base, pointwise, pairwise, listwise, hybrid,
fused, published; on validation and test, with intervals, the guard's decision and slices) for
the champion base model and adapter, stored in the database, shown as a Prefect artifact and
written as an HTML report with plots."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from recranker_core.config import load_settings
from tasks.common import resolve_database
from tasks.evaluate_ranker import load_ranker_task, publish_eval_artifacts
from tasks.tune_ranker import load_base_task


@flow(name="evaluate-ranker")
def evaluate_ranker_flow(
    targets: list[str] | None = None,
    max_users: int | None = None,
    step: float = 0.1,
    adapter_id: int | None = None,
) -> dict[str, Any]:
    """Evaluate on `targets` (default validation and test); `max_users` caps the evaluable
    users (a seeded random subset; default RECRANKER_RANK__EVAL_MAX_USERS: unset, all of
    them); `step` is the grid step of the weights chosen on validation users; `adapter_id`
    evaluates that adapter (a candidate the gate rejected, say) instead of the champion."""
    from recranker_core.base.rating import RatingHints
    from recranker_core.errors import ConfigError
    from recranker_core.evaluate_ranker.evaluate import TARGETS, evaluate
    from recranker_core.evaluate_ranker.report import (
        guard_line,
        save_evaluation,
        slice_rows,
        table_rows,
        write_html,
    )
    from recranker_core.llm.prompts import Catalog
    from recranker_core.tune_ranker.context import BaseHints

    settings = load_settings()
    logger = get_run_logger()
    targets = list(targets or TARGETS)
    if not set(targets) <= set(TARGETS):
        raise ConfigError(f"targets must be among {TARGETS}, not {targets}")
    database_url = resolve_database(settings)
    # The hint's predicted ratings come from the adapter's rating model (the one it was tuned
    # with, as serving reads it), so the champion's is not needed here.
    ctx = load_base_task(database_url, settings, hint_ratings=False)
    ranker = load_ranker_task(database_url, settings, adapter_id)
    if ranker is None:
        raise ConfigError(
            "no champion adapter to evaluate: run `recranker tune` first, or name an adapter "
            "(`recranker eval --adapter ID`)"
        )
    settings = ranker.settings_for(settings)
    catalog = Catalog.from_database(database_url, ctx.data.item_ids)
    hints = BaseHints(ctx, RatingHints(ranker.rating, ctx.data))
    limit = max_users or settings.rank.eval_max_users
    report, _ = evaluate(
        ctx,
        catalog,
        hints,
        ranker.model,
        ranker.tokenizer,
        settings,
        targets,
        max_users=limit,
        step=step,
        stored=ranker.adapter.fusion,
    )
    context = {
        "base model": f"{ctx.model_id} ({ctx.kind})",
        "adapter": ranker.adapter.label,
        "prompt template": settings.prompts.template,
        "backbone": ranker.backbone_id,
        "users": report.sample or "all evaluable users",
        "seconds scoring": ", ".join(f"{t} {s} s" for t, s in report.seconds.items()),
    }
    path = write_html(
        report, settings.home / "reports", title="recranker: ranker evaluation", context=context
    )
    evaluation_id = save_evaluation(
        database_url,
        report,
        model_id=ctx.model_id,
        adapter_id=ranker.adapter.adapter_id,
        params={
            "targets": targets,
            "max_users": limit,
            "weights": settings.rank.weights,
            "step": step,
            "template": settings.prompts.template,
        },
        report_path=path,
    )
    publish_eval_artifacts(report, str(path))
    logger.info("%s", guard_line(report))
    if report.sample:
        logger.warning("evaluated on %s", report.sample)
    logger.info("evaluation %d written to %s", evaluation_id, path)
    return {
        "table": report.as_json(),
        "weights": report.weights,
        "counts": report.counts,
        "guard": report.guard.as_json() if report.guard is not None else None,
        "sample": report.sample,
        "rows": table_rows(report),
        "slices": slice_rows(report),
        "report": str(path),
        "evaluation_id": evaluation_id,
        "adapter_id": ranker.adapter.adapter_id,
    }
