"""The model registry (recranker.models): register a trained model with its metrics, lineage and
stored artifact, decide promotion against the champion, promote and roll back. One champion at a
time; every change is one transaction."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from recranker_core.db.connect import connect
from recranker_core.errors import ConfigError

log = logging.getLogger(__name__)

GATE_METRIC = "ndcg@10"
_REGISTRY_LOCK = 7_310_003


@dataclass(frozen=True)
class ModelRecord:
    model_id: int
    kind: str
    status: str
    metrics: dict[str, dict[str, float]]
    hyperparameters: dict[str, Any]
    data_watermark: datetime | None
    artifact_uri: str
    files: dict[str, str]
    lineage: dict[str, Any]
    note: str | None
    created_at: datetime
    promoted_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "kind": self.kind,
            "status": self.status,
            "metrics": self.metrics,
            "hyperparameters": self.hyperparameters,
            "data_watermark": self.data_watermark.isoformat() if self.data_watermark else None,
            "artifact_uri": self.artifact_uri,
            "note": self.note,
            "created_at": self.created_at.isoformat(),
            "promoted_at": self.promoted_at.isoformat() if self.promoted_at else None,
        }


_COLUMNS = (
    "model_id, kind, status, metrics, hyperparameters, data_watermark, artifact_uri, files, "
    "lineage, note, created_at, promoted_at"
)


def _record(row: dict[str, Any]) -> ModelRecord:
    return ModelRecord(**row)


def register_model(
    database_url: str,
    *,
    kind: str,
    hyperparameters: dict[str, Any],
    metrics: dict[str, dict[str, float]],
    data_watermark: datetime | None,
    artifact_uri: str,
    files: dict[str, str],
    lineage: dict[str, Any],
) -> int:
    """Record a trained model as a candidate; returns its id."""
    with connect(database_url) as conn:
        row = conn.execute(
            """INSERT INTO recranker.models
                   (kind, status, hyperparameters, metrics, data_watermark, artifact_uri, files,
                    lineage)
               VALUES (%s, 'candidate', %s, %s, %s, %s, %s, %s) RETURNING model_id""",
            (
                kind,
                json.dumps(hyperparameters),
                json.dumps(metrics),
                data_watermark,
                artifact_uri,
                json.dumps(files),
                json.dumps(lineage),
            ),
        ).fetchone()
        conn.commit()
    assert row is not None
    log.info("registered %s model %s at %s", kind, row[0], artifact_uri)
    return int(row[0])


def get_model(database_url: str, model_id: int) -> ModelRecord:
    with connect(database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            f"SELECT {_COLUMNS} FROM recranker.models WHERE model_id = %s", (model_id,)
        ).fetchone()
    if row is None:
        raise ConfigError(f"no model {model_id} in recranker.models (see `recranker models list`)")
    return _record(row)


def champion(database_url: str) -> ModelRecord | None:
    with connect(database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            f"SELECT {_COLUMNS} FROM recranker.models WHERE status = 'champion'"
        ).fetchone()
    return _record(row) if row else None


def list_models(database_url: str, limit: int = 50) -> list[ModelRecord]:
    with connect(database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"SELECT {_COLUMNS} FROM recranker.models ORDER BY model_id DESC LIMIT %s", (limit,)
        ).fetchall()
    return [_record(r) for r in rows]


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


def gate(
    candidate: dict[str, dict[str, float]],
    current: ModelRecord | None,
    tolerance: float,
) -> GateDecision:
    """Promote when there is no champion, or when the candidate's validation NDCG@10 is not
    below the champion's by more than `tolerance`. Test metrics never decide."""
    new = candidate.get("valid", {}).get(GATE_METRIC)
    if new is None:
        return GateDecision(False, f"the candidate has no validation {GATE_METRIC}")
    if current is None:
        return GateDecision(True, f"no champion yet; validation {GATE_METRIC} {new:.4f}")
    old = current.metrics.get("valid", {}).get(GATE_METRIC, 0.0)
    if new >= old - tolerance:
        return GateDecision(
            True,
            f"validation {GATE_METRIC} {new:.4f} vs champion {current.model_id} ({current.kind}) "
            f"{old:.4f}, within tolerance {tolerance}",
        )
    return GateDecision(
        False,
        f"validation {GATE_METRIC} {new:.4f} is below champion {current.model_id} "
        f"({current.kind}) {old:.4f} by more than {tolerance}",
    )


def promote(database_url: str, model_id: int, note: str) -> ModelRecord:
    """Make `model_id` the champion and retire the previous one, in one transaction."""
    with connect(database_url) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_REGISTRY_LOCK,))
        _require_exists(conn, model_id)
        conn.execute(
            "UPDATE recranker.models SET status = 'retired', retired_at = now() "
            "WHERE status = 'champion' AND model_id <> %s",
            (model_id,),
        )
        conn.execute(
            "UPDATE recranker.models SET status = 'champion', promoted_at = now(), note = %s "
            "WHERE model_id = %s",
            (note, model_id),
        )
        conn.commit()
    log.info("model %s is the champion: %s", model_id, note)
    return get_model(database_url, model_id)


def reject(database_url: str, model_id: int, note: str) -> None:
    """Mark a candidate that lost the gate, with the reason."""
    with connect(database_url) as conn:
        conn.execute(
            "UPDATE recranker.models SET status = 'rejected', note = %s "
            "WHERE model_id = %s AND status = 'candidate'",
            (note, model_id),
        )
        conn.commit()


def rollback(database_url: str) -> ModelRecord:
    """Bring back the most recently retired champion; the current one is retired."""
    with connect(database_url) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_REGISTRY_LOCK,))
        row = conn.execute(
            "SELECT model_id FROM recranker.models WHERE status = 'retired' "
            "AND promoted_at IS NOT NULL ORDER BY retired_at DESC, model_id DESC LIMIT 1"
        ).fetchone()
        if row is None:
            raise ConfigError("no earlier champion to roll back to")
        conn.execute(
            "UPDATE recranker.models SET status = 'retired', retired_at = now() "
            "WHERE status = 'champion'"
        )
        conn.execute(
            "UPDATE recranker.models SET status = 'champion', promoted_at = now(), "
            "note = 'restored by rollback' WHERE model_id = %s",
            (row[0],),
        )
        conn.commit()
    log.info("rolled back: model %s is the champion again", row[0])
    return get_model(database_url, int(row[0]))


def _require_exists(conn: psycopg.Connection, model_id: int) -> None:
    if (
        conn.execute("SELECT 1 FROM recranker.models WHERE model_id = %s", (model_id,)).fetchone()
        is None
    ):
        raise ConfigError(f"no model {model_id} in recranker.models (see `recranker models list`)")
