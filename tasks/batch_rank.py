"""Prefect tasks of the batch-ranking stage: the champion scorer, what the run serves, one
shard ranked and written, and the artifacts a person reads."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from recranker_core.base.candidates import ChampionScorer
from recranker_core.batch_rank.serving import ServingPlan
from recranker_core.config import Settings
from tasks.common import TRANSIENT_RETRIES, store_for


@task(
    name="load-champion",
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def load_champion_task(database_url: str, settings: Settings) -> ChampionScorer:
    from recranker_core.base.candidates import load_champion
    from recranker_core.batch_rank.serving import cache_root

    champion = load_champion(database_url, store_for(settings), cache_root(settings))
    get_run_logger().info(
        "champion model %d (%s), scorer on %s",
        champion.model_id,
        champion.kind,
        champion.scorer.provider,
    )
    return champion


@task(
    name="serving-plan",
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def serving_plan_task(database_url: str, settings: Settings) -> ServingPlan:
    """What a batch-ranking run serves: in mode `base` no adapter; otherwise the champion
    adapter, and in mode `fused` its stored guard decision (base order and no LLM time, or the
    fused order with its weights; RECRANKER_RANK__FUSED_WEIGHTS overrides them)."""
    from recranker_core import registry
    from recranker_core.batch_rank.serving import plan_serving

    mode = settings.rank.mode
    record = None if mode == "base" else registry.champion_adapter(database_url)
    plan = plan_serving(mode, record, settings.rank.fused_weights)
    logger = get_run_logger()
    (logger.warning if record is None and mode != "base" else logger.info)("%s", plan.note)
    return plan


@task(
    name="rank-shard",
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
    task_run_name="shard {shard}",
)
def rank_shard_task(
    database_url: str,
    run_id: str,
    shard: int,
    users: list[str],
    watermark: datetime,
    settings: Settings,
    model_id: int,
    adapter_id: int | None,
    llm_users: list[str] | None,
    popular: list[str] | None = None,
    fused_weights: list[float] | None = None,
) -> dict[str, Any]:
    """Rank one shard and write its rows in one transaction (idempotent: a retry, or the same
    shard run twice, replaces its rows). The models come from this process's serving cache
    (fetched from S3 and verified once per process), the users' data from PostgreSQL (read
    once per shard, on a connection of the process's pool); mode
    `fused` re-ranks with `fused_weights` (base, pointwise, pairwise, listwise), decided once
    for the run."""
    import time

    from recranker_core.batch_rank.fusion import FusedWeights
    from recranker_core.batch_rank.publish import write_shard
    from recranker_core.batch_rank.rank import rank_shard
    from recranker_core.batch_rank.serving import serving_models
    from recranker_core.db.pool import pooled
    from recranker_core.interrupts import check_stop

    check_stop()
    started = time.perf_counter()
    models = serving_models(database_url, store_for(settings), settings, model_id, adapter_id)
    # This process's pool: thousands of shards in a run, not a connection set-up per read.
    db = pooled(database_url)
    result = rank_shard(
        db,
        models.champion,
        models.ranker,
        models.catalog,
        users,
        watermark,
        settings,
        llm_users=None if llm_users is None else set(llm_users),
        popular=popular,
        fused=None if fused_weights is None else FusedWeights.from_list(fused_weights),
    )
    seconds = time.perf_counter() - started
    check_stop()  # a stopped run writes no more shards
    written = write_shard(
        db,
        run_id,
        shard,
        result.rows,
        users=users,
        llm_users=result.llm_users,
        base_users=result.base_users,
        seconds=seconds,
        counts={
            "cold_users": result.cold_users,
            "llm_failures": result.llm_failures,
            "llm_retries": result.llm_retries,
            "prompt_tokens": result.prompt_tokens,
        },
    )
    return {
        "shard": shard,
        "users": result.users,
        "rows": written,
        "llm_users": result.llm_users,
        "base_users": result.base_users,
        "cold_users": result.cold_users,
        "llm_failures": result.llm_failures,
        "llm_retries": result.llm_retries,
        "prompt_tokens": result.prompt_tokens,
        "seconds": round(seconds, 2),
        "candidates_s": round(result.seconds.get("candidates", 0.0), 2),
        "llm_s": round(result.seconds.get("llm", 0.0), 2),
    }


def publish_rank_artifacts(summary: dict[str, Any], shards: list[dict[str, Any]]) -> None:
    create_table_artifact(
        key="batch-rank-shards", table=shards, description="Shards of this ranking run"
    )
    lines = [
        f"### Ranking run `{summary['run_id']}`",
        "",
        f"- status: **{summary['status']}**"
        + (f" (previous run `{summary['previous']}`)" if summary.get("previous") else ""),
        f"- users: {summary['users']:,} active, {summary['llm_users']:,} re-ranked by the LLM, "
        f"{summary['base_users']:,} base ranking, {summary['cold_users']:,} cold (unknown to "
        "the base model: most popular items)",
        f"- rows: {summary['rows']:,} in `recranker.recommendations`; consumers read "
        "`recranker.recommendations_current`",
        f"- base model {summary['model_id']}, adapter {summary['adapter_id']}, "
        f"mode {summary['mode']}, served **{summary['served']}**",
        f"- {summary['serving']}",
        f"- {summary['seconds']} s in all",
    ]
    if summary.get("dropped"):
        lines.append(f"- dropped old runs: {', '.join(summary['dropped'])}")
    create_markdown_artifact(
        key="batch-rank", markdown="\n".join(lines), description="What was ranked and published"
    )
