"""Flow `batch-rank`: every active user's candidates from the champion base model, re-ranked as
the champion adapter's guard decided (mode `fused`: the fused order, or the base order with no
LLM time), written shard by shard under a new run id, then published by moving one pointer, so
consumers of `recommendations_current` switch runs atomically."""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger

from recranker_core.config import load_settings
from recranker_core.interrupts import stop_on_signals, stop_reason
from tasks.batch_rank import (
    load_champion_task,
    publish_rank_artifacts,
    rank_shard_task,
    serving_plan_task,
)
from tasks.common import resolve_database
from tasks.runner import task_runner

# The run's counts in its summary (users and rows of every shard, resumed ones included).
_COUNTS = (
    "users",
    "rows",
    "llm_users",
    "base_users",
    "cold_users",
    "llm_failures",
    "llm_retries",
    "prompt_tokens",
)


@flow(name="batch-rank")
def batch_rank_flow(
    run_id: str | None = None, mode: str | None = None, publish: bool = True
) -> dict[str, Any]:
    """Rank all active users; `run_id` of an unfinished run resumes it from its done shards.

    SIGINT/SIGTERM stop it: shards in progress end at their next step, the run is marked
    cancelled (resumable with its run id), nothing is published, and the process ends with
    130/143."""
    with stop_on_signals():
        return _batch_rank(run_id, mode, publish)


def _batch_rank(run_id: str | None, mode: str | None, publish: bool) -> dict[str, Any]:
    from recranker_core.base.candidates import active_users, data_watermark
    from recranker_core.batch_rank import runs
    from recranker_core.batch_rank.publish import (
        cancel_run,
        fail_abandoned_runs,
        fail_run,
        finish_run,
        publish_run,
    )
    from recranker_core.batch_rank.rank import most_active_users, popular_items, shards_of
    from recranker_core.batch_rank.retention import drop_old_runs

    started = time.perf_counter()
    settings = load_settings()
    if mode:
        settings = settings.model_copy(
            update={"rank": settings.rank.model_copy(update={"mode": mode})}
        )
    logger = get_run_logger()
    database_url = resolve_database(settings)
    with runs.batch_rank_lock(database_url):
        # Holding the lock: a run still 'running' has lost its process (killed, machine gone).
        fail_abandoned_runs(database_url)
        champion = load_champion_task(database_url, settings)
        watermark = data_watermark(database_url)
        users = active_users(
            database_url, watermark, settings.rank.active_window_days, settings.rank.work_mem
        )
        llm_users = None
        if settings.rank.llm_max_users is not None:
            llm_users = most_active_users(
                database_url,
                users,
                watermark,
                settings.rank.llm_max_users,
                settings.rank.work_mem,
            )
        plan = serving_plan_task(database_url, settings)
        # The run's lineage names the adapter consulted (whose decision it serves); shards load
        # it only when the LLM re-ranks.
        adapter_id = plan.adapter.adapter_id if plan.adapter is not None else None
        shard_adapter_id = adapter_id if plan.llm else None
        prompts = settings.prompts.model_dump(mode="json")
        if plan.llm and plan.adapter is not None:  # it scores with the template it was tuned with
            prompts["template"] = plan.adapter.template_version
        params: dict[str, Any] = {
            "mode": settings.rank.mode,
            "weights": settings.rank.weights,
            "k": settings.rank.k,
            "active_window_days": settings.rank.active_window_days,
            "llm_max_users": settings.rank.llm_max_users,
            "prompts": prompts,
        }
        if plan.fusion is not None:
            params["fusion"] = plan.fusion
        if settings.rank.fused_weights is not None:
            params["fused_weights"] = settings.rank.fused_weights
        state = runs.start_run(
            database_url,
            run_id=run_id,
            model_id=champion.model_id,
            adapter_id=adapter_id,
            data_watermark=watermark,
            params=params,
            shards=shards_of(users, settings.rank.shard_size),
        )
        logger.info(
            "run %s: %d users in %d shards (%d done already), watermark %s; %s",
            state.run_id,
            len(users),
            len(state.shards),
            len(state.done_shards),
            watermark,
            plan.note,
        )
        popular = popular_items(database_url, watermark)
        results: list[dict[str, Any]] = []
        try:
            # Each shard loads the models (once per process) and reads its users' data itself:
            # only ids and settings travel to the task runner.
            with task_runner(settings.runner) as runner:
                futures = [
                    runner.submit(
                        rank_shard_task,
                        parameters={
                            "database_url": database_url,
                            "run_id": state.run_id,
                            "shard": shard,
                            "users": shard_users,
                            "watermark": watermark,
                            "settings": settings,
                            "model_id": champion.model_id,
                            "adapter_id": shard_adapter_id,
                            "fused_weights": plan.fused.as_list() if plan.fused else None,
                            "llm_users": None
                            if llm_users is None
                            else sorted(llm_users.intersection(shard_users)),
                            "popular": popular,
                        },
                    )
                    for shard, shard_users in enumerate(state.shards)
                    if shard not in state.done_shards
                ]
                for future in futures:
                    results.append(future.result())
                    logger.info(
                        "shard %d/%d done: %s",
                        results[-1]["shard"] + 1,
                        len(state.shards),
                        results[-1],
                    )
            # Counted in the database: a resumed run's shards written earlier count too.
            counts = finish_run(
                database_url,
                state.run_id,
                timings={"seconds": round(time.perf_counter() - started, 1)},
            )
            previous = publish_run(database_url, state.run_id) if publish else None
            dropped = drop_old_runs(database_url, settings.rank.retention_days)
        except BaseException as exc:
            stopped = stop_reason(exc)
            if stopped is not None:
                cancel_run(database_url, state.run_id, stopped)
            else:
                fail_run(database_url, state.run_id, f"{type(exc).__name__}: {exc}")
            raise
    summary = {
        "run_id": state.run_id,
        "status": "published" if publish else "complete",
        "previous": previous,
        **{k: counts.get(k, 0) for k in _COUNTS},
        # Shard-seconds summed over this run's shards (with N workers, wall time is less).
        "candidates_s": round(sum(r["candidates_s"] for r in results), 1),
        "llm_s": round(sum(r["llm_s"] for r in results), 1),
        "model_id": champion.model_id,
        "adapter_id": adapter_id,
        "mode": settings.rank.mode,
        "served": plan.served,
        "serving": plan.note,
        "fusion": plan.fusion,
        "resumed_shards": len(state.done_shards),
        "dropped": dropped,
        "seconds": round(time.perf_counter() - started, 1),
    }
    publish_rank_artifacts(summary, results)
    return summary
