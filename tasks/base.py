"""Prefect tasks of the base-model stage: split, the rating model, train one candidate, promote
the best, and the artifacts a person reads to see what was trained and what now serves."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from recranker_core.base.retrain import RetrainOutcome, promote_best, train_candidate
from recranker_core.base.split import SplitData, load_split
from recranker_core.base.train import TrainResult
from recranker_core.config import Settings
from tasks.common import TRANSIENT_RETRIES, store_for


@task(
    name="load-split",
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def load_split_task(database_url: str, settings: Settings, watermark: datetime | None) -> SplitData:
    data = load_split(
        database_url, like_threshold=settings.retrain.like_threshold, watermark=watermark
    )
    get_run_logger().info("split as of %s: %s", data.watermark, data.stats)
    return data


@task(name="train-rating-model", cache_policy=NO_CACHE)
def train_rating_model_task(data: SplitData, settings: Settings) -> TrainResult:
    """The rating model behind the pointwise hint, on the split's train-period ratings: stored
    with every model of this run, so that tuning reuses the champion's instead of fitting one."""
    from recranker_core.base.rating import train_rating_model

    result = train_rating_model(data, settings.base)
    get_run_logger().info(
        "trained the rating model (biasedmf) for the pointwise hint: held-out RMSE %.4f, best "
        "epoch %d, %.1f s; stored with every model of this run",
        result.metrics["valid"].get("rmse", float("nan")),
        result.best_epoch,
        result.seconds,
    )
    return result


@task(name="train-candidate", cache_policy=NO_CACHE, task_run_name="train {kind}")
def train_candidate_task(
    kind: str,
    data: SplitData,
    settings: Settings,
    database_url: str,
    rating: TrainResult | None = None,
) -> RetrainOutcome:
    outcome = train_candidate(
        kind,
        data,
        settings.base,
        store_for(settings),
        database_url,
        k=settings.retrain.candidates,
        rating=rating,
    )
    get_run_logger().info(
        "%s: model %s, valid ndcg@10 %.4f, test ndcg@10 %.4f, stored at %s",
        kind,
        outcome.model_id,
        outcome.metrics["valid"]["ndcg@10"],
        outcome.metrics["test"]["ndcg@10"],
        outcome.artifact_uri,
    )
    return outcome


@task(name="promote-best", cache_policy=NO_CACHE)
def promote_best_task(
    outcomes: list[RetrainOutcome], data: SplitData, settings: Settings, database_url: str
) -> RetrainOutcome | None:
    """Gate the best candidate against the champion on the candidate's validation users (the
    champion re-measured on them when it was measured on others)."""
    winner = promote_best(
        outcomes,
        data,
        settings.base,
        store_for(settings),
        settings.home / "cache" / "artifacts",
        database_url,
        settings.retrain.promotion_tolerance,
    )
    best = winner or next((o for o in outcomes if o.gate), None)
    if best is not None:
        get_run_logger().info("gate on model %d (%s): %s", best.model_id, best.kind, best.reason)
    return winner


def publish_retrain_artifacts(
    outcomes: list[RetrainOutcome],
    winner: RetrainOutcome | None,
    failed: list[str],
    rating: TrainResult | None = None,
) -> None:
    rows: list[dict[str, Any]] = []
    for o in outcomes:
        row: dict[str, Any] = {"model": o.model_id, "kind": o.kind, "promoted": o.promoted}
        for split in ("valid", "test"):
            for key, value in o.metrics[split].items():
                row[f"{split} {key}"] = round(value, 4)
        row["train s"] = o.seconds.get("train")
        rows.append(row)
    create_table_artifact(
        key="base-model-metrics",
        table=rows,
        description="Base models trained in this run (validation decides)",
    )
    lines = ["### Base-model retrain", ""]
    if winner is not None:
        lines.append(f"**Promoted** model {winner.model_id} ({winner.kind}): {winner.reason}.")
    else:
        lines.append("**Nothing promoted**; the champion keeps serving.")
    gated = winner or next((o for o in outcomes if o.gate), None)
    champion = gated.gate.get("champion") if gated is not None else None
    if gated is not None and champion:
        candidate = gated.gate["candidate"]["sample"]
        registered = champion.get("registered_sample")
        lines += [
            "",
            f"Gate samples: the candidate on {candidate['n_users']} validation users; the "
            f"champion (model {champion['model_id']}) registered on "
            f"{registered['n_users'] if registered else 'unrecorded'} users, "
            + (
                "re-measured on the candidate's users."
                if champion["remeasured"]
                else "the same users (not re-measured)."
            ),
        ]
    lines.append("")
    if rating is not None:
        lines.append(
            f"Rating model (pointwise hint, biasedmf): trained, held-out RMSE "
            f"{rating.metrics['valid'].get('rmse', float('nan')):.4f} in {rating.seconds:.1f} s; "
            "stored with every model of this run (tuning reuses the champion's)."
        )
    else:
        lines.append(
            "Rating model (pointwise hint): not trained (see the logs); this run's models are "
            "stored without one, and tuning on them fits its own."
        )
    lines.append("")
    lines += [f"- {o.kind} (model {o.model_id}): {o.reason}" for o in outcomes if o is not winner]
    lines += [f"- {kind}: training failed (see the task run's logs)" for kind in failed]
    create_markdown_artifact(
        key="base-model-promotion",
        markdown="\n".join(lines),
        description="What was promoted and why",
    )
