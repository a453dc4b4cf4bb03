"""Prefect tasks of the objectives experiment: evaluate one tuned adapter (the docs/METHOD.md table
and the listwise position bias) and publish the comparison."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from recranker_core.config import Settings
from recranker_core.registry import AdapterRecord
from recranker_core.tune_ranker.context import BaseContext
from recranker_core.tune_ranker.experiment import ObjectiveResult
from tasks.common import store_for


@task(name="evaluate-objective", cache_policy=NO_CACHE, task_run_name="evaluate {record.objective}")
def evaluate_objective_task(
    ctx: BaseContext,
    catalog: Any,
    record: AdapterRecord,
    tuning: dict[str, Any],
    settings: Settings,
    database_url: str,
    max_users: int | None,
    shuffles: int,
    bias_users: int,
) -> ObjectiveResult:
    """Validation and test table of `record`'s adapter, stored as an evaluation, and the position
    bias of its listwise scores on up to `bias_users` test users (a seeded random subset of those
    whose test item is a candidate)."""
    import numpy as np

    from recranker_core.base.rating import RatingHints
    from recranker_core.batch_rank.serving import load_ranker
    from recranker_core.errors import ConfigError
    from recranker_core.evaluate_ranker.bias import position_bias
    from recranker_core.evaluate_ranker.evaluate import evaluate
    from recranker_core.evaluate_ranker.report import save_evaluation
    from recranker_core.llm.builders import build_inference_prompts
    from recranker_core.tune_ranker.context import BaseHints
    from recranker_core.tune_ranker.experiment import tokens_per_user

    logger = get_run_logger()
    ranker = load_ranker(database_url, store_for(settings), settings, record)
    if ranker is None:  # load_ranker returns None only without any adapter
        raise ConfigError(f"adapter {record.adapter_id} could not be loaded")
    settings = ranker.settings_for(settings)
    # The rating model this adapter was tuned with (the one serving reads).
    hints = BaseHints(ctx, RatingHints(ranker.rating, ctx.data))
    report, scored = evaluate(
        ctx,
        catalog,
        hints,
        ranker.model,
        ranker.tokenizer,
        settings,
        ("valid", "test"),
        max_users=max_users,
    )
    evaluation_id = save_evaluation(
        database_url,
        report,
        model_id=ctx.model_id,
        adapter_id=record.adapter_id,
        params={"experiment": "objectives", "max_users": max_users, "objective": record.objective},
        report_path=None,
    )
    test = next(t for t in scored if t.target == "test")
    users = sorted(test.scores)
    if len(users) > bias_users:
        rng = np.random.default_rng(settings.tune.seed)
        users = sorted(rng.choice(users, size=bias_users, replace=False).tolist())
    listwise = []
    for user in users:
        prompts = build_inference_prompts(
            ctx.data, catalog, hints, user, test.scores[user].candidates, "test", settings.prompts
        )
        listwise += [p for p in prompts if p.task == "listwise"]
    bias = position_bias(
        ranker.model,
        ranker.tokenizer,
        catalog,
        listwise,
        shuffles=shuffles,
        seed=settings.tune.seed,
        batch_size=settings.rank.score_batch_size,
    )
    logger.info(
        "%s (adapter %d): test ndcg@3 base %.4f, fused %.4f, hybrid %.4f; %s; listwise position "
        "bias: spearman %.3f, top-1 kept %.3f over %d prompts x %d shuffles",
        record.objective,
        record.adapter_id,
        report.table["base"]["test"]["ndcg@3"],
        report.table.get("fused", {}).get("test", {}).get("ndcg@3", float("nan")),
        report.table["hybrid"]["test"]["ndcg@3"],
        report.guard.reason if report.guard is not None else "no guard (no validation target)",
        bias.mean_spearman,
        bias.top1_agreement,
        bias.prompts,
        bias.shuffles,
    )
    return ObjectiveResult(
        objective=record.objective,
        adapter_id=record.adapter_id,
        tuning=tuning,
        report=report,
        bias=bias,
        inference_tokens_per_user=tokens_per_user(report),
        evaluation_id=evaluation_id,
    )


def publish_experiment_artifacts(results: list[ObjectiveResult], markdown: str) -> None:
    from recranker_core.evaluate_ranker.report import table_rows

    # The evaluation's own rows (each difference to the base with its interval, in words), per
    # objective.
    rows = [{"objective": r.objective, **row} for r in results for row in table_rows(r.report)]
    create_table_artifact(
        key="objectives-comparison",
        table=rows,
        description="HR/NDCG of each tuning objective's adapter (docs/METHOD.md table), each "
        "method's differences to the base model with their 95% intervals",
    )
    create_markdown_artifact(
        key="objectives-comparison-report",
        markdown=markdown,
        description="SFT vs ALRO vs DMPO: quality, listwise position bias, cost",
    )
