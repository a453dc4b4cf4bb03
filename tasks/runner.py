"""The task runner the shards of a batch-ranking run are submitted to (RECRANKER_RUNNER__*):
threads of the flow's process, or prefect-dask's DaskTaskRunner on a scheduler or a local
cluster of worker processes."""

from __future__ import annotations

from typing import Any

from recranker_core.config import RunnerSettings


def task_runner(settings: RunnerSettings) -> Any:
    """A fresh, not yet started task runner; use it as a context manager."""
    if settings.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=settings.workers)
    from prefect_dask import DaskTaskRunner

    if settings.address:
        return DaskTaskRunner(address=settings.address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": settings.workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
            "host": "127.0.0.1",
        },
    )
