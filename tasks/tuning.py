"""Prefect tasks of the ranker tuning stage: the base context, sampled users, the instruction
dataset, the tuning run itself, and the artifacts a person reads to see what was tuned."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from recranker_core.config import Settings
from recranker_core.ranker.tuning import BaseContext
from recranker_core.registry import AdapterRecord
from tasks.common import TRANSIENT_RETRIES, store_for


@task(
    name="load-base-context",
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def load_base_task(database_url: str, settings: Settings) -> BaseContext:
    """The champion base model, its split, and the hint regressor trained on that split."""
    from recranker_core.ranker.tuning import load_base_context, train_hint_regressor

    ctx = load_base_context(
        database_url,
        store_for(settings),
        settings.home / "cache" / "artifacts",
        settings.retrain.like_threshold,
    )
    train_hint_regressor(ctx, settings)
    get_run_logger().info("base model %d (%s); hint regressor trained", ctx.model_id, ctx.kind)
    return ctx


@task(name="sample-users", cache_policy=NO_CACHE)
def sample_users_task(ctx: BaseContext, settings: Settings) -> Any:
    from recranker_core.ranker.tuning import sample_training_users

    sample = sample_training_users(ctx, settings)
    get_run_logger().info("sampled users (%s): %s", sample.method, sample.counts)
    return sample


@task(
    name="build-dataset",
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def build_dataset_task(
    ctx: BaseContext, sample: Any, settings: Settings, database_url: str
) -> tuple[list[Any], dict[str, int], str, Any]:
    """Three-task prompts of the sampled users, written as JSONL to S3 with a manifest."""
    from recranker_core.ranker.prompts import Catalog, build_training_prompts
    from recranker_core.ranker.tuning import BaseHints, write_dataset

    catalog = Catalog.from_database(database_url, ctx.data.item_ids)
    hints = BaseHints(ctx)
    prompts, counts = build_training_prompts(
        ctx.data, catalog, hints, sample.users, settings.prompts
    )
    stamp = ctx.data.watermark.strftime("%Y%m%dT%H%M%S") if ctx.data.watermark else "all"
    stored = write_dataset(
        prompts,
        {
            "template_version": settings.prompts.template,
            "base_model_id": ctx.model_id,
            "data_watermark": ctx.data.watermark.isoformat() if ctx.data.watermark else None,
            "sampling": sample.counts,
            "prompts": counts,
        },
        store_for(settings),
        f"datasets/{stamp}-{settings.prompts.template}",
    )
    get_run_logger().info("%d prompts %s -> %s", len(prompts), counts, stored.uri)
    return prompts, counts, stored.uri, catalog


@task(
    name="find-start-adapter",
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def start_adapter_task(database_url: str, settings: Settings) -> AdapterRecord | None:
    """The SFT adapter a DMPO run starts from (None for the other objectives); checked before
    any data is built, so a DMPO run without one fails at once."""
    from recranker_core.ranker.tuning import sft_start_adapter

    if settings.tune.objective != "dmpo":
        return None
    record = sft_start_adapter(database_url, settings.prompts.template)
    get_run_logger().info("DMPO starts from %s (%s)", record.label, record.artifact_uri)
    return record


@task(name="tune-adapter", cache_policy=NO_CACHE, task_run_name="tune {settings.tune.objective}")
def tune_adapter_task(
    ctx: BaseContext,
    prompts: list[Any],
    catalog: Any,
    sample: Any,
    dataset_uri: str,
    settings: Settings,
    database_url: str,
    max_steps: int | None,
    start: AdapterRecord | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """Load the backbone, tune LoRA on the prompts with the configured objective (from `start`,
    the SFT adapter, for DMPO), store, register and gate the adapter. An `experiment`'s adapter
    is registered under that label and left a candidate (no gate, no promotion)."""

    from recranker_core.ranker.backbone import load_backbone
    from recranker_core.ranker.prompts import verbalizer_ids
    from recranker_core.ranker.tune import OBJECTIVES, encode_for, tune
    from recranker_core.ranker.tuning import (
        BaseHints,
        fetch_adapter,
        kept_start_note,
        make_validate,
        publish_adapter,
        validation_set,
    )

    logger = get_run_logger()
    objective = settings.tune.objective
    loss_fn = OBJECTIVES[objective](settings.tune)
    backbone = load_backbone(settings.backbone, settings.home)
    verbalizer_ids(backbone.tokenizer, settings.retrain.candidates)  # fails early, clearly
    init_adapter = None
    if start is not None:
        init_adapter = fetch_adapter(
            start,
            store_for(settings),
            settings.home / "cache" / "artifacts",
            backbone.backbone_hash,
        )
    examples, dropped = encode_for(prompts, backbone.tokenizer, settings.tune, catalog)
    valid = validation_set(ctx, catalog, BaseHints(ctx), settings)
    logger.info(
        "%s: %d training examples (%d left out), %d validation users (%.1f%% of evaluable users "
        "have their validation item among the candidates); base ndcg@10 on them %.4f",
        objective,
        len(examples),
        dropped,
        len(valid.users),
        100 * valid.hit_share,
        valid.base_metrics["ndcg@10"],
    )
    run_name = f"{ctx.model_id}-{objective}" + (f"-{experiment}" if experiment else "")
    if start is not None:
        run_name += f"-from-{start.adapter_id}"
    work_dir = settings.home / "tuning" / run_name
    result = tune(
        backbone.model,
        backbone.tokenizer,
        examples,
        make_validate(valid, backbone.tokenizer, settings.tune.batch_size),
        settings.tune,
        work_dir,
        loss_fn=loss_fn,
        max_steps=max_steps,
        init_adapter=init_adapter,
    )
    started_from = {}
    if start is not None:
        # DMPO's policy starts from this adapter and its reference is this adapter, frozen.
        started_from = {"init_adapter_id": start.adapter_id, "init_adapter_uri": start.artifact_uri}
    metrics = {"valid": result.best_metrics, "valid_base": valid.base_metrics}
    outcome = publish_adapter(
        result.adapter_dir,
        ctx,
        {
            "objective": objective,
            "backbone_id": backbone.backbone_id,
            "backbone_hash": backbone.backbone_hash,
            "template_version": settings.prompts.template,
            "base_model_id": ctx.model_id,
            "data_watermark": ctx.data.watermark.isoformat() if ctx.data.watermark else None,
            "sampled_users": int(len(sample.users)),
            "sampled_distinct_users": int(sample.counts.get("final_distinct", 0)),
            "dataset": dataset_uri,
            "hyperparameters": settings.tune.model_dump(mode="json"),
            "lineage": {
                "sampling": sample.counts,
                "validation_users": len(valid.users),
                "validation_hit_share": valid.hit_share,
                "best_step": result.best_step,
                "steps": result.steps,
                "device": backbone.device,
                "dtype": backbone.dtype,
                **started_from,
                **({"experiment": experiment} if experiment else {}),
            },
        },
        metrics,
        store_for(settings),
        database_url,
        settings.tune.promotion_tolerance,
        gate=experiment is None,
    )
    logger.info(
        "adapter %d (%s): %s; %d steps in %.0f s, %.0f tokens/s",
        outcome.adapter_id,
        "promoted" if outcome.promoted else "not promoted",
        outcome.reason,
        result.steps,
        result.seconds,
        result.tokens_per_second,
    )
    note = kept_start_note(result.steps, result.best_step, objective)
    if note:
        logger.warning("adapter %d: %s", outcome.adapter_id, note)
    return {
        "note": note,
        "adapter_id": outcome.adapter_id,
        "promoted": outcome.promoted,
        "reason": outcome.reason,
        "artifact_uri": outcome.artifact_uri,
        "metrics": metrics,
        "history": result.history,
        "steps": result.steps,
        "best_step": result.best_step,
        "seconds": round(result.seconds, 1),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "resumed_from": result.resumed_from,
        "backbone": backbone.backbone_id,
        "device": backbone.device,
        "objective": objective,
        **started_from,
    }


def publish_tuning_artifacts(summary: dict[str, Any], counts: dict[str, Any], profile: str) -> None:
    rows = [
        {"step": h["step"], **{k: round(v, 4) for k, v in h.items() if k != "step"}}
        for h in summary["history"]
    ]
    create_table_artifact(
        key="ranker-validation",
        table=rows,
        description="Validation (listwise, fixed users) at each evaluation of the tuning run",
    )
    valid, base = summary["metrics"]["valid"], summary["metrics"]["valid_base"]
    lines = [
        "### Ranker tuning",
        "",
        f"- {profile}; backbone {summary['backbone']} on {summary['device']}",
        f"- data: {counts}",
        f"- {summary['steps']} steps in {summary['seconds']} s "
        f"({summary['tokens_per_second']} tokens/s)",
        f"- validation ndcg@10: adapter {valid.get('ndcg@10', float('nan')):.4f}, "
        f"base order of the same candidates {base['ndcg@10']:.4f}",
        "",
        f"**Adapter {summary['adapter_id']} "
        f"{'promoted' if summary['promoted'] else 'not promoted'}**: {summary['reason']}.",
    ]
    if summary.get("note"):
        lines += ["", f"**Warning**: {summary['note']}."]
    create_markdown_artifact(
        key="ranker-tuning", markdown="\n".join(lines), description="What was tuned and promoted"
    )
