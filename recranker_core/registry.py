"""The registries of trained things: base models (recranker.models) and ranker adapters
(recranker.adapters). Register with metrics, lineage and stored artifact, decide promotion against
the champion, promote and roll back. One champion per table; every change is one transaction."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from recranker_core.db.connect import connect
from recranker_core.errors import ConfigError

if TYPE_CHECKING:
    from recranker_core.batch_rank.fusion import GuardDecision

log = logging.getLogger(__name__)

GATE_METRIC = "ndcg@10"
_REGISTRY_LOCK = 7_310_003


@dataclass(frozen=True)
class ModelRecord:
    model_id: int
    kind: str
    status: str
    metrics: dict[str, Any]  # "valid"/"test": metric -> value; "sample": the users (EvalSample)
    hyperparameters: dict[str, Any]
    data_watermark: datetime | None
    artifact_uri: str
    files: dict[str, str]
    lineage: dict[str, Any]
    note: str | None
    created_at: datetime
    promoted_at: datetime | None

    @property
    def label(self) -> str:
        return f"{self.model_id} ({self.kind})"

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
    metrics: dict[str, Any],
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
    # What the base-model gate compared: the metric, both sides' values and samples, and
    # whether the champion was re-measured (stored in the candidate's lineage as `gate`).
    record: dict[str, Any] = field(default_factory=dict)


class _Champion(Protocol):
    @property
    def model_id(self) -> int: ...

    @property
    def metrics(self) -> dict[str, Any]: ...

    @property
    def label(self) -> str: ...


def gate(
    candidate: dict[str, Any],
    current: _Champion | None,
    tolerance: float,
    *,
    remeasured: dict[str, Any] | None = None,
) -> GateDecision:
    """Promote when there is no champion, or when the candidate's validation NDCG@10 is not
    below the champion's by more than `tolerance`, both measured on the same users. Test
    metrics never decide.

    Both sides' metrics carry the users they were measured on (`metrics["sample"]`, an
    EvalSample: count and hash of the user ids, split watermark and like threshold). A
    champion's registered metric measured on other users (another sample size or seed, an
    earlier split, or not recorded) is not compared: that raises ConfigError unless
    `remeasured` ({"valid": ..., "sample": ...}: the champion measured again on the candidate's
    users, `base.retrain.measure_registered`) is given, which is then compared instead. The
    decision's `record` says both sides' sample sizes and whether the champion was
    re-measured."""
    from recranker_core.base.evaluate import EvalSample

    new = candidate.get("valid", {}).get(GATE_METRIC)
    mine = EvalSample.from_metrics(candidate)
    record: dict[str, Any] = {
        "metric": GATE_METRIC,
        "tolerance": tolerance,
        "candidate": {"value": new, "sample": mine.as_json() if mine else None},
        "champion": None,
    }
    if new is None:
        return _decided(False, f"the candidate has no validation {GATE_METRIC}", record)
    if mine is None:
        raise ConfigError(
            "the candidate's metrics do not say which users they were measured on "
            '(metrics["sample"]): measure it with `train_candidate`'
        )
    on = f"on {mine.n_users} users"
    if current is None:
        return _decided(True, f"no champion yet; validation {GATE_METRIC} {new:.4f} {on}", record)
    registered = current.metrics.get("valid", {}).get(GATE_METRIC)
    theirs = EvalSample.from_metrics(current.metrics)
    registered_on = (
        f"{theirs.n_users} users of the split as of {theirs.data_watermark or 'all data'}"
        if theirs
        else "users that were not recorded"
    )
    if remeasured is not None:
        again = EvalSample.from_metrics(remeasured)
        if again != mine:
            raise ConfigError(
                f"champion {current.label} was re-measured on "
                f"{again.describe() if again else 'unrecorded users'}, not the candidate's "
                f"{mine.describe()}: re-measure it on the candidate's users"
            )
        old = remeasured.get("valid", {}).get(GATE_METRIC, 0.0)
        versus = (
            f"champion {current.label} {old:.4f} re-measured on the same {mine.n_users} users "
            f"(its registered {_value(registered)} was measured on {registered_on})"
        )
    elif theirs == mine:
        old = registered if registered is not None else 0.0
        versus = f"champion {current.label} {old:.4f} on the same {mine.n_users} users"
    else:
        raise ConfigError(
            f"champion {current.label}'s validation {GATE_METRIC} was measured on "
            f"{registered_on}, the candidate's on {mine.describe()}: re-measure the champion "
            "on the candidate's users before gating"
        )
    record["champion"] = {
        "model_id": current.model_id,
        "value": old,
        "remeasured": remeasured is not None,
        "sample": mine.as_json(),
        "registered_value": registered,
        "registered_sample": theirs.as_json() if theirs else None,
    }
    if new >= old - tolerance:
        return _decided(
            True,
            f"validation {GATE_METRIC} {new:.4f} {on} vs {versus}, within tolerance {tolerance}",
            record,
        )
    return _decided(
        False,
        f"validation {GATE_METRIC} {new:.4f} {on} is below {versus} by more than {tolerance}",
        record,
    )


def _decided(promote: bool, reason: str, record: dict[str, Any]) -> GateDecision:
    return GateDecision(promote, reason, {**record, "promote": promote, "reason": reason})


def _value(value: float | None) -> str:
    return "(none)" if value is None else f"{value:.4f}"


def adapter_gate(
    candidate: GuardDecision, champion: GuardDecision | None, tolerance: float
) -> GateDecision:
    """The adapter promotion gate on the metric that is served (docs/METHOD.md sections 5 and 6).

    Promote only when the candidate's guard serves the fusion (its cross-fitted fused NDCG@k
    beats the base order on validation by more than one standard error) and, given the
    champion adapter's decision, the candidate's out-of-sample fused NDCG is not below the
    champion's by more than `tolerance`. `champion` None: no champion adapter to compare with.

    The two decisions must be measured on the same users (equal `users_hash`, user count and
    k); a champion decision stored at another time, on other users (a new base model, another
    validation sample), cannot be compared and raises ConfigError: the caller re-measures the
    champion adapter on the candidate's users (`cross_fit_guard` over its scores) and passes
    that decision."""
    if candidate.served != "fused":
        return GateDecision(
            False,
            f"the candidate's fused ranking does not beat the base order on validation by more "
            f"than one standard error ({candidate.reason})",
        )
    if champion is None:
        return GateDecision(
            True,
            f"no champion adapter to compare with; the candidate's fused ranking beats the base "
            f"order ({candidate.reason})",
        )
    same = (candidate.users_hash, candidate.n_users, candidate.k) == (
        champion.users_hash,
        champion.n_users,
        champion.k,
    )
    if not same:
        raise ConfigError(
            f"the champion adapter's decision was measured on other users ({champion.n_users} "
            f"users, NDCG@{champion.k}, users {champion.users_hash[:12]}) than the candidate's "
            f"({candidate.n_users} users, NDCG@{candidate.k}, users {candidate.users_hash[:12]}):"
            " re-measure the champion on the candidate's validation users before gating"
        )
    new, old = candidate.fused_ndcg, champion.fused_ndcg
    k = candidate.k
    if new >= old - tolerance:
        return GateDecision(
            True,
            f"fused NDCG@{k} {new:.4f} vs the champion's {old:.4f} on the same "
            f"{candidate.n_users} validation users, within tolerance {tolerance}; the fusion "
            f"beats the base order by {candidate.gain:+.4f} (se {candidate.se:.4f})",
        )
    return GateDecision(
        False,
        f"fused NDCG@{k} {new:.4f} is below the champion's {old:.4f} on the same "
        f"{candidate.n_users} validation users by more than {tolerance}",
    )


@dataclass(frozen=True)
class _Table:
    name: str
    key: str
    noun: str
    listing: str

    def sql(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(
            table=sql.Identifier("recranker", self.name), key=sql.Identifier(self.key)
        )


MODELS = _Table("models", "model_id", "model", "recranker models list")
ADAPTERS = _Table("adapters", "adapter_id", "adapter", "recranker adapters list")


def promote(
    database_url: str, model_id: int, note: str, *, gate: dict[str, Any] | None = None
) -> ModelRecord:
    """Make `model_id` the champion and retire the previous one, in one transaction; `gate`,
    the gate's record, is kept in its lineage."""
    _promote(database_url, MODELS, model_id, note, _gate_lineage(gate))
    return get_model(database_url, model_id)


def reject(
    database_url: str, model_id: int, note: str, *, gate: dict[str, Any] | None = None
) -> None:
    """Mark a candidate that lost the gate, with the reason (and the gate's record, `gate`, in
    its lineage)."""
    _reject(database_url, MODELS, model_id, note, _gate_lineage(gate))


def _gate_lineage(gate: dict[str, Any] | None) -> dict[str, Any] | None:
    return {"gate": gate} if gate is not None else None


def rollback(database_url: str) -> ModelRecord:
    """Bring back the most recently retired champion; the current one is retired."""
    return get_model(database_url, _rollback(database_url, MODELS))


def _promote(
    database_url: str, table: _Table, key: int, note: str, lineage: dict[str, Any] | None = None
) -> None:
    with connect(database_url) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_REGISTRY_LOCK,))
        _require_exists(conn, table, key)
        conn.execute(
            table.sql(
                "UPDATE {table} SET status = 'retired', retired_at = now() "
                "WHERE status = 'champion' AND {key} <> %s"
            ),
            (key,),
        )
        conn.execute(
            table.sql(
                "UPDATE {table} SET status = 'champion', promoted_at = now(), note = %s, "
                "lineage = lineage || %s::jsonb WHERE {key} = %s"
            ),
            (note, json.dumps(lineage or {}), key),
        )
        conn.commit()
    log.info("%s %s is the champion: %s", table.noun, key, note)


def _reject(
    database_url: str, table: _Table, key: int, note: str, lineage: dict[str, Any] | None = None
) -> None:
    with connect(database_url) as conn:
        conn.execute(
            table.sql(
                "UPDATE {table} SET status = 'rejected', note = %s, "
                "lineage = lineage || %s::jsonb WHERE {key} = %s AND status = 'candidate'"
            ),
            (note, json.dumps(lineage or {}), key),
        )
        conn.commit()


def _rollback(database_url: str, table: _Table) -> int:
    with connect(database_url) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_REGISTRY_LOCK,))
        row = conn.execute(
            table.sql(
                "SELECT {key} FROM {table} WHERE status = 'retired' "
                "AND promoted_at IS NOT NULL ORDER BY retired_at DESC, {key} DESC LIMIT 1"
            )
        ).fetchone()
        if row is None:
            raise ConfigError(f"no earlier champion {table.noun} to roll back to")
        conn.execute(
            table.sql(
                "UPDATE {table} SET status = 'retired', retired_at = now() "
                "WHERE status = 'champion'"
            )
        )
        conn.execute(
            table.sql(
                "UPDATE {table} SET status = 'champion', promoted_at = now(), "
                "note = 'restored by rollback' WHERE {key} = %s"
            ),
            (row[0],),
        )
        conn.commit()
    log.info("rolled back: %s %s is the champion again", table.noun, row[0])
    return int(row[0])


def _require_exists(conn: psycopg.Connection, table: _Table, key: int) -> None:
    if conn.execute(table.sql("SELECT 1 FROM {table} WHERE {key} = %s"), (key,)).fetchone() is None:
        raise ConfigError(
            f"no {table.noun} {key} in recranker.{table.name} (see `{table.listing}`)"
        )


# ---------------------------------------------------------------------------------------------
# ranker adapters


@dataclass(frozen=True)
class AdapterRecord:
    adapter_id: int
    objective: str
    status: str
    backbone_id: str
    backbone_hash: str
    template_version: str
    base_model_id: int | None
    metrics: dict[str, Any]  # split -> metric -> value, and "fusion": the guard's decision
    hyperparameters: dict[str, Any]
    data_watermark: datetime | None
    artifact_uri: str
    files: dict[str, str]
    lineage: dict[str, Any]
    note: str | None
    created_at: datetime
    promoted_at: datetime | None

    @property
    def label(self) -> str:
        return f"adapter {self.adapter_id} ({self.objective})"

    @property
    def fusion(self) -> GuardDecision | None:
        """The guard's decision stored with the adapter (`metrics["fusion"]`): whether batch
        ranking serves the fused order and with which weights. None when none is stored."""
        from recranker_core.batch_rank.fusion import GuardDecision

        stored = self.metrics.get("fusion")
        return GuardDecision.from_json(stored) if stored else None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.adapter_id,
            "objective": self.objective,
            "status": self.status,
            "backbone_id": self.backbone_id,
            "backbone_hash": self.backbone_hash,
            "template_version": self.template_version,
            "base_model_id": self.base_model_id,
            "metrics": self.metrics,
            "fusion": self.metrics.get("fusion"),
            "hyperparameters": self.hyperparameters,
            "data_watermark": self.data_watermark.isoformat() if self.data_watermark else None,
            "artifact_uri": self.artifact_uri,
            "note": self.note,
            "created_at": self.created_at.isoformat(),
            "promoted_at": self.promoted_at.isoformat() if self.promoted_at else None,
        }


_ADAPTER_COLUMNS = (
    "adapter_id, objective, status, backbone_id, backbone_hash, template_version, base_model_id, "
    "metrics, hyperparameters, data_watermark, artifact_uri, files, lineage, note, created_at, "
    "promoted_at"
)


def register_adapter(
    database_url: str,
    *,
    objective: str,
    backbone_id: str,
    backbone_hash: str,
    template_version: str,
    base_model_id: int | None,
    hyperparameters: dict[str, Any],
    metrics: dict[str, Any],
    data_watermark: datetime | None,
    artifact_uri: str,
    files: dict[str, str],
    lineage: dict[str, Any],
) -> int:
    """Record a tuned adapter as a candidate; returns its id."""
    with connect(database_url) as conn:
        row = conn.execute(
            """INSERT INTO recranker.adapters
                   (objective, status, backbone_id, backbone_hash, template_version,
                    base_model_id, hyperparameters, metrics, data_watermark, artifact_uri, files,
                    lineage)
               VALUES (%s, 'candidate', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
               RETURNING adapter_id""",
            (
                objective,
                backbone_id,
                backbone_hash,
                template_version,
                base_model_id,
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
    log.info("registered %s adapter %s at %s", objective, row[0], artifact_uri)
    return int(row[0])


def get_adapter(database_url: str, adapter_id: int) -> AdapterRecord:
    with connect(database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            f"SELECT {_ADAPTER_COLUMNS} FROM recranker.adapters WHERE adapter_id = %s",
            (adapter_id,),
        ).fetchone()
    if row is None:
        raise ConfigError(f"no adapter {adapter_id} in recranker.adapters ({ADAPTERS.listing})")
    return AdapterRecord(**row)


def champion_adapter(database_url: str) -> AdapterRecord | None:
    with connect(database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            f"SELECT {_ADAPTER_COLUMNS} FROM recranker.adapters WHERE status = 'champion'"
        ).fetchone()
    return AdapterRecord(**row) if row else None


def list_adapters(database_url: str, limit: int = 50) -> list[AdapterRecord]:
    with connect(database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"SELECT {_ADAPTER_COLUMNS} FROM recranker.adapters ORDER BY adapter_id DESC LIMIT %s",
            (limit,),
        ).fetchall()
    return [AdapterRecord(**r) for r in rows]


def update_adapter_fusion(database_url: str, adapter_id: int, decision: GuardDecision) -> None:
    """Store (or replace) the guard's decision with an adapter, as `metrics["fusion"]`: what a
    batch-ranking run in mode `fused` serves with this adapter (`recranker tune-weights`)."""
    with connect(database_url) as conn:
        row = conn.execute(
            "UPDATE recranker.adapters SET metrics = jsonb_set(metrics, '{fusion}', %s::jsonb) "
            "WHERE adapter_id = %s RETURNING adapter_id",
            (json.dumps(decision.as_json()), adapter_id),
        ).fetchone()
        conn.commit()
    if row is None:
        raise ConfigError(f"no adapter {adapter_id} in recranker.adapters ({ADAPTERS.listing})")
    log.info("adapter %s: fusion decision stored (%s)", adapter_id, decision.reason)


def promote_adapter(database_url: str, adapter_id: int, note: str) -> AdapterRecord:
    _promote(database_url, ADAPTERS, adapter_id, note)
    return get_adapter(database_url, adapter_id)


def reject_adapter(database_url: str, adapter_id: int, note: str) -> None:
    _reject(database_url, ADAPTERS, adapter_id, note)


def rollback_adapter(database_url: str) -> AdapterRecord:
    return get_adapter(database_url, _rollback(database_url, ADAPTERS))
