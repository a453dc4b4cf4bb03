"""Flow `tune-ranker`: sample users, build the three-task instruction data from the champion
base model's split, tune a LoRA adapter on the backbone with the chosen objective (SFT, ALRO, or
DMPO from the SFT adapter), store and register it, and promote it only if it passes the gate.
Runs on the `gpu` work pool in production, on CPU with the demo profile here."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from recranker_core.config import load_settings
from recranker_core.interrupts import stop_on_signals
from tasks.common import resolve_database
from tasks.tune_ranker import (
    build_dataset_task,
    load_base_task,
    publish_tuning_artifacts,
    sample_users_task,
    start_adapter_task,
    tune_adapter_task,
)


@flow(name="tune-ranker")
def tune_ranker_flow(
    objective: str | None = None, profile: str | None = None, max_steps: int | None = None
) -> dict[str, Any]:
    """Tune a ranker adapter (objective and profile default to RECRANKER_TUNE__*).

    SIGINT/SIGTERM stop it at once, without a retry: an adapter whose registration had not
    committed is not registered, the last checkpoint stays for a resumed run, and the process
    ends with 130/143."""
    with stop_on_signals():
        return _tune_ranker(objective, profile, max_steps)


def _tune_ranker(
    objective: str | None, profile: str | None, max_steps: int | None
) -> dict[str, Any]:
    from recranker_core.tune_ranker.context import effective_settings

    overrides: dict[str, Any] = {}
    if objective:
        overrides["objective"] = objective
    if profile:
        overrides["profile"] = profile
    settings = load_settings()
    if overrides:
        settings = settings.model_copy(update={"tune": settings.tune.model_copy(update=overrides)})
    settings, profile_line = effective_settings(settings)
    get_run_logger().info("tuning with the %s", profile_line)
    database_url = resolve_database(settings)
    start = start_adapter_task(database_url, settings)
    ctx = load_base_task(database_url, settings)
    sample = sample_users_task(ctx, settings)
    prompts, counts, dataset_uri, catalog = build_dataset_task(ctx, sample, settings, database_url)
    summary = tune_adapter_task(
        ctx, prompts, catalog, sample, dataset_uri, settings, database_url, max_steps, start
    )
    publish_tuning_artifacts(summary, counts, profile_line)
    return {**summary, "profile": profile_line, "dataset": dataset_uri}
