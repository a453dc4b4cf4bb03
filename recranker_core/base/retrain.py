"""One base-model retrain, end to end: train on the split, export the ONNX top-k scorer with a
parity check, store weights + ONNX + id maps + metrics as one artifact with a manifest, register
it, and promote it only if the gate says so. A failed or worse retrain leaves the champion."""

from __future__ import annotations

import json
import logging
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recranker_core import registry
from recranker_core.base.split import SplitData

log = logging.getLogger(__name__)

PARITY_USERS = 64


@dataclass
class RetrainOutcome:
    kind: str
    model_id: int
    metrics: dict[str, dict[str, float]]
    promoted: bool
    reason: str
    artifact_uri: str
    seconds: dict[str, float] = field(default_factory=dict)
    parity_max_abs_diff: float = 0.0


def write_artifact(
    directory: Path, model: Any, data: SplitData, metrics: dict[str, Any], k: int
) -> float:
    """Weights (safetensors + JSON), ONNX scorer, id maps and metrics into `directory`; returns
    the parity diff."""
    from recranker_core.base.models import pad_sequences, write_state
    from recranker_core.base.onnx_export import export_topk, pad_exclusions

    directory.mkdir(parents=True, exist_ok=True)
    write_state(model, directory, "model")
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
) -> RetrainOutcome:
    """Train one model kind, export and store it, and register it as a candidate."""
    from recranker_core.base.train import train_model

    result = train_model(kind, data, train_settings)
    metrics = result.metrics
    with tempfile.TemporaryDirectory(prefix=f"recranker-{kind}-") as tmp:
        local = Path(tmp) / "artifact"
        diff = write_artifact(local, result.model, data, metrics, k)
        stamp = data.watermark.strftime("%Y%m%dT%H%M%S") if data.watermark else "all"
        prefix = f"models/{kind}/{stamp}-{uuid.uuid4().hex[:8]}"
        meta = {
            "kind": kind,
            "metrics": metrics,
            "hyperparameters": result.hyperparameters,
            "data_watermark": data.watermark.isoformat() if data.watermark else None,
            "split": data.stats,
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
    )


def promote_best(
    outcomes: list[RetrainOutcome], database_url: str, tolerance: float
) -> RetrainOutcome | None:
    """Gate the run's best candidate (validation NDCG@10) against the champion; the others are
    rejected as not the best of the run. Returns the promoted outcome, if any."""
    if not outcomes:
        return None

    def valid_ndcg(o: RetrainOutcome) -> float:
        return o.metrics.get("valid", {}).get(registry.GATE_METRIC, float("-inf"))

    best = max(outcomes, key=valid_ndcg)
    for other in outcomes:
        if other is not best:
            other.reason = (
                f"not the best of this run ({best.kind} {valid_ndcg(best):.4f} > "
                f"{valid_ndcg(other):.4f} validation {registry.GATE_METRIC})"
            )
            registry.reject(database_url, other.model_id, other.reason)
    decision = registry.gate(best.metrics, registry.champion(database_url), tolerance)
    best.reason = decision.reason
    if decision.promote:
        registry.promote(database_url, best.model_id, decision.reason)
        best.promoted = True
        return best
    registry.reject(database_url, best.model_id, decision.reason)
    return None
