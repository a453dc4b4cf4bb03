"""Flow `retrain-base`: split the interactions as of a watermark, train the rating model behind
the pointwise hint and the configured base models, store (each with the rating model) and
register each, and promote the best one only if it passes the gate."""

from __future__ import annotations

from datetime import datetime

from prefect import flow, get_run_logger

from recranker_core.config import load_settings
from recranker_core.errors import RecrankerError
from tasks.base import (
    load_split_task,
    promote_best_task,
    publish_retrain_artifacts,
    train_candidate_task,
    train_rating_model_task,
)
from tasks.common import resolve_database


@flow(name="retrain-base")
def retrain_base_flow(
    kinds: list[str] | None = None, watermark: datetime | None = None
) -> dict[str, object]:
    """Train `kinds` (default: RECRANKER_BASE__KINDS) and promote the best if it passes."""
    settings = load_settings()
    logger = get_run_logger()
    database_url = resolve_database(settings)
    data = load_split_task(database_url, settings, watermark)
    rating_state = train_rating_model_task(data, settings, return_state=True)
    rating = rating_state.result() if rating_state.is_completed() else None
    if rating is None:
        logger.error(
            "the rating model failed to train (%s): this run's models are stored without one, "
            "and tuning on them fits its own",
            rating_state.message,
        )
    outcomes, failed = [], []
    for kind in kinds or settings.retrain.kinds:
        state = train_candidate_task(kind, data, settings, database_url, rating, return_state=True)
        if state.is_completed():
            outcomes.append(state.result())
        else:
            failed.append(kind)
            logger.error("training %s failed: %s", kind, state.message)
    winner = promote_best_task(outcomes, data, settings, database_url)
    publish_retrain_artifacts(outcomes, winner, failed, rating)
    if not outcomes:
        raise RecrankerError(
            f"every model failed to train ({', '.join(failed)}); the champion is unchanged"
        )
    return {
        "promoted": winner.model_id if winner else None,
        "models": {o.kind: o.model_id for o in outcomes},
        "failed": failed,
        "seconds": {o.kind: o.seconds for o in outcomes},
        "rating_model": outcomes[0].rating_model if outcomes else None,
        "gate": next((o.gate for o in outcomes if o.gate), None),
    }
