"""Flow `experiment-objectives`: tune SFT, ALRO and DMPO adapters on the same sampled users,
instruction data and budget, evaluate each (docs/METHOD.md table on validation and test, listwise
position bias over shuffled candidate orders), and write one comparison. The adapters are
registered as candidates of the experiment and never promoted."""

from __future__ import annotations

import uuid
from typing import Any

from prefect import flow, get_run_logger

from recranker_core.config import load_settings
from tasks.common import resolve_database
from tasks.experiment import evaluate_objective_task, publish_experiment_artifacts
from tasks.tune_ranker import (
    build_dataset_task,
    load_base_task,
    sample_users_task,
    start_adapter_task,
    tune_adapter_task,
)


@flow(name="experiment-objectives")
def experiment_objectives_flow(
    objectives: list[str] | None = None,
    profile: str | None = None,
    max_steps: int | None = None,
    max_users: int | None = None,
    shuffles: int = 3,
    bias_users: int = 100,
) -> dict[str, Any]:
    """Compare tuning objectives (default sft, alro, dmpo; DMPO starts from this run's SFT
    adapter when SFT is among them, else from the registry's SFT champion)."""
    from recranker_core.errors import ConfigError
    from recranker_core.registry import get_adapter
    from recranker_core.tune_ranker.context import effective_settings
    from recranker_core.tune_ranker.experiment import OBJECTIVE_ORDER, write_comparison

    chosen = list(objectives or OBJECTIVE_ORDER)
    unknown = sorted(set(chosen) - set(OBJECTIVE_ORDER))
    if unknown or len(set(chosen)) != len(chosen):
        raise ConfigError(
            f"objectives must be distinct names among {list(OBJECTIVE_ORDER)}, not {chosen}"
        )
    chosen = [o for o in OBJECTIVE_ORDER if o in chosen]  # SFT first: DMPO starts from it
    if shuffles < 1 or bias_users < 1:
        raise ConfigError("shuffles and bias_users must be at least 1")
    settings = load_settings()
    if profile:
        settings = settings.model_copy(
            update={"tune": settings.tune.model_copy(update={"profile": profile})}
        )
    settings, profile_line = effective_settings(settings)
    limit = max_users or settings.rank.eval_max_users
    experiment = f"exp-{uuid.uuid4().hex[:8]}"
    logger = get_run_logger()
    logger.info("experiment %s: %s with the %s", experiment, ", ".join(chosen), profile_line)
    database_url = resolve_database(settings)
    ctx = load_base_task(database_url, settings)
    sample = sample_users_task(ctx, settings)
    prompts, counts, dataset_uri, catalog = build_dataset_task(ctx, sample, settings, database_url)

    results = []
    sft_record = None
    for objective in chosen:
        tuned_settings = settings.model_copy(
            update={"tune": settings.tune.model_copy(update={"objective": objective})}
        )
        start = None
        if objective == "dmpo":
            start = sft_record or start_adapter_task(database_url, tuned_settings)
        summary = tune_adapter_task(
            ctx,
            prompts,
            catalog,
            sample,
            dataset_uri,
            tuned_settings,
            database_url,
            max_steps,
            start,
            experiment,
        )
        record = get_adapter(database_url, summary["adapter_id"])
        if objective == "sft":
            sft_record = record
        tuning = {
            k: summary.get(k)
            for k in (
                "steps",
                "best_step",
                "seconds",
                "tokens_per_second",
                "init_adapter_id",
                "device",
                "backbone",
            )
        }
        results.append(
            evaluate_objective_task(
                ctx,
                catalog,
                record,
                tuning,
                tuned_settings,
                database_url,
                limit,
                shuffles,
                bias_users,
            )
        )
    context = {
        "experiment": experiment,
        "base model": f"{ctx.model_id} ({ctx.kind})",
        "backbone": results[0].tuning.get("backbone") if results else None,
        "device": results[0].tuning.get("device") if results else None,
        "budget": profile_line + (f", at most {max_steps} steps" if max_steps else ""),
        "sampled users": int(len(sample.users)),
        "training prompts": counts,
        "evaluation users": limit or "all evaluable",
        "shuffles": shuffles,
    }
    md, js = write_comparison(results, context, settings.home / "reports")
    markdown = md.read_text()
    publish_experiment_artifacts(results, markdown)
    logger.info("comparison written to %s and %s", md, js)
    return {
        "experiment": experiment,
        "markdown": str(md),
        "json": str(js),
        "results": [r.as_json() for r in results],
        "context": context,
    }
