"""Prefect tasks of the ranker tuning stage: the base context, sampled users, the instruction
dataset, the tuning run itself, and the artifacts a person reads to see what was tuned."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from recranker_core.config import Settings
from recranker_core.registry import AdapterRecord
from recranker_core.tune_ranker.context import BaseContext
from tasks.common import TRANSIENT_RETRIES, store_for


@task(
    name="load-base-context",
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def load_base_task(database_url: str, settings: Settings, hint_ratings: bool = True) -> BaseContext:
    """The champion base model, its split, and (`hint_ratings`) the rating model behind the
    pointwise hint: the one stored with the champion by its retrain, reused, or for a champion
    stored without one, fitted on its split now. An evaluation reads the adapter's own rating
    model instead and passes hint_ratings=False."""
    from recranker_core.tune_ranker.context import hint_rating_model, load_base_context

    ctx = load_base_context(
        database_url,
        store_for(settings),
        settings.home / "cache" / "artifacts",
        settings.retrain.like_threshold,
    )
    logger = get_run_logger()
    logger.info("base model %d (%s)", ctx.model_id, ctx.kind)
    if hint_ratings:
        logger.info("%s", hint_rating_model(ctx, settings))
    return ctx


@task(name="sample-users", cache_policy=NO_CACHE)
def sample_users_task(ctx: BaseContext, settings: Settings) -> Any:
    from recranker_core.tune_ranker.context import sample_training_users

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
) -> tuple[list[Any], dict[str, Any], str, Any]:
    """The sampled users' prompts (on the served task by default: shadow base models, cut
    points, the next like as the answer), written as JSONL to S3 with a manifest."""
    from recranker_core.llm.prompts import Catalog
    from recranker_core.tune_ranker.dataset import build_training_data, write_dataset

    logger = get_run_logger()
    catalog = Catalog.from_database(database_url, ctx.data.item_ids)
    prompts, counts = build_training_data(ctx, catalog, sample.users, settings)
    stamp = ctx.data.watermark.strftime("%Y%m%dT%H%M%S") if ctx.data.watermark else "all"
    stored = write_dataset(
        prompts,
        {
            "template_version": settings.prompts.template,
            "training_data": settings.tune.training_data,
            "base_model_id": ctx.model_id,
            "data_watermark": ctx.data.watermark.isoformat() if ctx.data.watermark else None,
            "sampling": sample.counts,
            "prompts": counts,
        },
        store_for(settings),
        f"datasets/{stamp}-{settings.prompts.template}-{settings.tune.training_data}",
    )
    logger.info("%d prompts %s -> %s", len(prompts), counts, stored.uri)
    return prompts, counts, stored.uri, catalog


@task(
    name="find-start-adapter",
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def start_adapter_task(database_url: str, settings: Settings) -> AdapterRecord | None:
    """The SFT adapter a DMPO run starts from (None for the other objectives); checked before
    any data is built, so a DMPO run without one fails at once."""
    from recranker_core.tune_ranker.adapter import sft_start_adapter

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
    the SFT adapter, for DMPO), store, register and gate the adapter: its fused ranking against
    the base order and the champion adapter on the same validation users. An `experiment`'s
    adapter is registered under that label and left a candidate (no gate, no promotion)."""
    from recranker_core.tune_ranker.run import run_tuning

    logger = get_run_logger()
    summary = run_tuning(
        ctx,
        prompts,
        catalog,
        sample,
        dataset_uri,
        settings,
        database_url,
        store_for(settings),
        max_steps=max_steps,
        start=start,
        experiment=experiment,
    )
    logger.info(
        "adapter %d (%s): %s; %d steps in %.0f s, %.0f tokens/s",
        summary["adapter_id"],
        "promoted" if summary["promoted"] else "not promoted",
        summary["reason"],
        summary["steps"],
        summary["seconds"],
        summary["tokens_per_second"],
    )
    logger.info("guard: %s", summary["fusion"]["reason"])
    if summary.get("note"):
        logger.warning("adapter %d: %s", summary["adapter_id"], summary["note"])
    return summary


def publish_tuning_artifacts(summary: dict[str, Any], counts: dict[str, Any], profile: str) -> None:
    rows = [
        {"step": h["step"], **{k: round(v, 4) for k, v in h.items() if k != "step"}}
        for h in summary["history"]
    ]
    create_table_artifact(
        key="ranker-validation",
        table=rows,
        description="Validation at each evaluation of the tuning run: the fused ranking's "
        "cross-fitted NDCG@3 against the base order of the same candidates (fixed users)",
    )
    fusion = summary["fusion"]
    weights = ", ".join(f"{k} {v:.2f}" for k, v in fusion["weights"].items())
    lines = [
        "### Ranker tuning",
        "",
        f"- {profile}; backbone {summary['backbone']} on {summary['device']}",
        f"- data: {counts}",
        f"- hint rating model: {_rating_line(summary.get('rating_model') or {})}",
        f"- {summary['steps']} steps in {summary['seconds']} s "
        f"({summary['tokens_per_second']} tokens/s); kept step {summary['best_step']}",
        f"- validation (fixed users, NDCG@3, cross-fitted): fused {fusion['fused_ndcg']:.4f}, "
        f"base order {fusion['base_ndcg']:.4f}, gain {fusion['gain']:+.4f} "
        f"(se {fusion['se']:.4f}) on {fusion['n_users']} users",
        f"- guard: serves **{fusion['served']}** ({fusion['reason']}); weights {weights}",
        "",
        f"**Adapter {summary['adapter_id']} "
        f"{'promoted' if summary['promoted'] else 'not promoted'}**: {summary['reason']}.",
    ]
    if summary.get("note"):
        lines += ["", f"**Warning**: {summary['note']}."]
    create_markdown_artifact(
        key="ranker-tuning", markdown="\n".join(lines), description="What was tuned and promoted"
    )


def _rating_line(rating: dict[str, Any]) -> str:
    rmse = "unknown" if rating.get("rmse") is None else f"{float(rating['rmse']):.4f}"
    if rating.get("model_id") is not None:
        return (
            f"reused champion model {rating['model_id']}'s (sha256 {rating['sha256'][:12]}, "
            f"held-out RMSE {rmse}); no fit"
        )
    return f"fitted by this run (held-out RMSE {rmse}); stored with the adapter"
