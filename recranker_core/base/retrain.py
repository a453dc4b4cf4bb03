"""One base-model retrain, end to end: train on the split, export the ONNX top-k scorer with a
parity check, store weights + ONNX + id maps + metrics (+ the run's rating model) as one artifact
with a manifest, register it, and promote it only if the gate says so, the champion measured on
the candidate's users. A failed or worse retrain leaves the champion."""

from __future__ import annotations

import json
import logging
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from recranker_core import registry
from recranker_core.base.evaluate import EvalSample
from recranker_core.base.split import SplitData

if TYPE_CHECKING:
    from recranker_core.base.train import TrainResult
    from recranker_core.config import BaseTrainSettings
    from recranker_core.store import ArtifactStore

log = logging.getLogger(__name__)

PARITY_USERS = 64


@dataclass
class RetrainOutcome:
    kind: str
    model_id: int
    metrics: dict[str, dict[str, Any]]  # "valid", "test", and "sample": the users (EvalSample)
    promoted: bool
    reason: str
    artifact_uri: str
    seconds: dict[str, float] = field(default_factory=dict)
    parity_max_abs_diff: float = 0.0
    rating_model: dict[str, Any] | None = None  # lineage of the rating model stored with it
    gate: dict[str, Any] = field(default_factory=dict)  # the gate's record (the best only)


def write_artifact(
    directory: Path,
    model: Any,
    data: SplitData,
    metrics: dict[str, Any],
    k: int,
    rating: Any = None,
) -> float:
    """Weights (safetensors + JSON), ONNX scorer, id maps and metrics into `directory`, and the
    rating model `rating` (fitted on the same split, so the id maps index it too) when given;
    returns the parity diff."""
    from recranker_core.base.models import pad_sequences, write_state
    from recranker_core.base.onnx_export import export_topk, pad_exclusions
    from recranker_core.base.rating import RATING_STEM

    directory.mkdir(parents=True, exist_ok=True)
    write_state(model, directory, "model")
    if rating is not None:
        write_state(rating, directory, RATING_STEM)
    (directory / "user_ids.json").write_text(json.dumps(data.user_ids))
    (directory / "item_ids.json").write_text(json.dumps(data.item_ids))
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    users = data.evaluable_users()[:PARITY_USERS].astype(np.int64)
    if users.size == 0:
        users = np.arange(min(PARITY_USERS, data.n_users), dtype=np.int64)
    exclude = pad_exclusions([data.seen(int(u), "test") for u in users])
    seq_len = getattr(model, "max_len", None)
    sequences = (
        pad_sequences([data.train_sequences[int(u)] for u in users], seq_len) if seq_len else None
    )
    report = export_topk(
        model.scoring_module(),
        data.n_items,
        directory / "model.onnx",
        k=min(k, data.n_items),
        sequence_len=seq_len,
        parity_users=users,
        parity_exclude=exclude,
        parity_sequences=sequences,
    )
    return report.parity_max_abs_diff


def train_candidate(
    kind: str,
    data: SplitData,
    train_settings: Any,
    store: Any,
    database_url: str,
    *,
    k: int = 10,
    rating: TrainResult | None = None,
) -> RetrainOutcome:
    """Train one model kind, export and store it (with the run's rating model `rating`, fitted
    on the same split, when given), and register it as a candidate. Its metrics carry the users
    they were measured on (`metrics["sample"]`), which the gate compares."""
    from recranker_core.base.rating import rating_lineage
    from recranker_core.base.train import evaluation_users, train_model

    result = train_model(kind, data, train_settings)
    sample = EvalSample.of(data, evaluation_users(data, train_settings))
    metrics: dict[str, dict[str, Any]] = {**result.metrics, "sample": sample.as_json()}
    rating_info = rating_lineage(rating) if rating is not None else None
    with tempfile.TemporaryDirectory(prefix=f"recranker-{kind}-") as tmp:
        local = Path(tmp) / "artifact"
        diff = write_artifact(
            local, result.model, data, metrics, k, rating.model if rating is not None else None
        )
        stamp = data.watermark.strftime("%Y%m%dT%H%M%S") if data.watermark else "all"
        prefix = f"models/{kind}/{stamp}-{uuid.uuid4().hex[:8]}"
        meta = {
            "kind": kind,
            "metrics": metrics,
            "hyperparameters": result.hyperparameters,
            "data_watermark": data.watermark.isoformat() if data.watermark else None,
            "split": data.stats,
            "rating_model": rating_info,
        }
        stored = store.put_directory(local, prefix, meta)
    model_id = registry.register_model(
        database_url,
        kind=kind,
        hyperparameters=result.hyperparameters,
        metrics=metrics,
        data_watermark=data.watermark,
        artifact_uri=stored.uri,
        files={path: entry.sha256 for path, entry in stored.manifest.files.items()},
        lineage={
            "split": data.stats,
            "best_epoch": result.best_epoch,
            "like_threshold": data.like_threshold,
            "prefix": stored.prefix,
            "rating_model": rating_info,
        },
    )
    return RetrainOutcome(
        kind,
        model_id,
        metrics,
        False,
        "candidate",
        stored.uri,
        {"train": round(result.seconds, 2)},
        diff,
        rating_info,
    )


def promote_best(
    outcomes: list[RetrainOutcome],
    data: SplitData,
    train_settings: BaseTrainSettings,
    store: ArtifactStore,
    cache_root: Path,
    database_url: str,
    tolerance: float,
) -> RetrainOutcome | None:
    """Gate the run's best candidate (validation NDCG@10) against the champion; the others are
    rejected as not the best of the run. Returns the promoted outcome, if any.

    The champion's registered metric was measured on its own users (another sample size or
    seed, an earlier split, or unknown for a model registered before samples were recorded).
    When they are not the candidate's users, the champion is loaded from the store and measured
    again on them (`measure_registered`) before the comparison; the gate's record (stored in
    the candidate's lineage as `gate`) says both sides' sample sizes and whether it was. A
    champion that cannot be loaded (ArtifactIntegrityError) stops the gate, loudly: the run's
    best model stays a candidate (`recranker models promote ID` after a look)."""
    from recranker_core.base.train import evaluation_users

    if not outcomes:
        return None

    def valid_ndcg(o: RetrainOutcome) -> float:
        return float(o.metrics.get("valid", {}).get(registry.GATE_METRIC, float("-inf")))

    best = max(outcomes, key=valid_ndcg)
    for other in outcomes:
        if other is not best:
            other.reason = (
                f"not the best of this run ({best.kind} {valid_ndcg(best):.4f} > "
                f"{valid_ndcg(other):.4f} validation {registry.GATE_METRIC})"
            )
            registry.reject(database_url, other.model_id, other.reason)
    current = registry.champion(database_url)
    remeasured = None
    if current is not None:
        mine = EvalSample.from_metrics(best.metrics)
        theirs = EvalSample.from_metrics(current.metrics)
        if theirs != mine:
            users = evaluation_users(data, train_settings)
            remeasured = measure_registered(current, data, users, store, cache_root)
            log.info(
                "champion %s was measured on %s; re-measured on the candidate's %s: validation "
                "%s %.4f",
                current.label,
                theirs.describe() if theirs else "users that were not recorded",
                EvalSample.of(data, users).describe(),
                registry.GATE_METRIC,
                remeasured["valid"].get(registry.GATE_METRIC, float("nan")),
            )
    decision = registry.gate(best.metrics, current, tolerance, remeasured=remeasured)
    best.reason = decision.reason
    best.gate = {"model_id": best.model_id, **decision.record}
    if decision.promote:
        registry.promote(database_url, best.model_id, decision.reason, gate=best.gate)
        best.promoted = True
        return best
    registry.reject(database_url, best.model_id, decision.reason, gate=best.gate)
    return None


def measure_registered(
    record: registry.ModelRecord,
    data: SplitData,
    users: npt.NDArray[np.int64] | None,
    store: ArtifactStore,
    cache_root: Path,
) -> dict[str, Any]:
    """Validation metrics of registered model `record` on `users` of `data` (None: every
    evaluable user), as it would serve them (`scores_across_splits`: its own users and items
    mapped by id), with the sample they were measured on: {"valid": {...}, "sample": {...}}.
    The model is fetched from the store and checked against its registry row like any load."""
    from recranker_core.base.candidates import fetch_model
    from recranker_core.base.evaluate import scores_across_splits, target_ranks
    from recranker_core.base.models import read_state
    from recranker_core.metrics import DEFAULT_KS, rank_metrics

    directory = fetch_model(record, store, cache_root)
    model = read_state(directory, "model")
    score_fn = scores_across_splits(
        model,
        json.loads((directory / "user_ids.json").read_text()),
        json.loads((directory / "item_ids.json").read_text()),
        data,
    )
    ranks = target_ranks(score_fn, data, "valid", users)
    return {
        "valid": rank_metrics(ranks, DEFAULT_KS),
        "sample": EvalSample.of(data, users).as_json(),
    }
