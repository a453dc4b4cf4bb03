"""A tuned adapter in the store and the registry: stored with its manifest, registered and gated
(`publish_adapter`), fetched and checked (`fetch_adapter`), the SFT adapter a DMPO run starts
from, and the prompt settings an adapter scores with."""

from __future__ import annotations

import json
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recranker_core import registry
from recranker_core.errors import ArtifactIntegrityError, ConfigError, DataError
from recranker_core.llm.prompts import TEMPLATES
from recranker_core.store import ArtifactStore, fetch_registered
from recranker_core.tune_ranker.context import BaseContext


def adapter_prompt_settings(record: registry.AdapterRecord, prompts: Any) -> Any:
    """`prompts` (PromptSettings) with what an adapter was tuned with: its template, history
    length and pair scheme score it (the settings choose them for new tuning only)."""
    tuned = dict(record.lineage.get("prompts") or {})
    update = {"template": record.template_version}
    for key in ("history_max", "pair_scheme", "pairwise_pairs", "listwise_top"):
        if key in tuned:
            update[key] = tuned[key]
    if all(getattr(prompts, k) == v for k, v in update.items()):
        return prompts
    return prompts.model_copy(update=update)


@dataclass
class AdapterOutcome:
    adapter_id: int
    promoted: bool
    reason: str
    artifact_uri: str
    prefix: str


def publish_adapter(
    adapter_dir: Path,
    ctx: BaseContext,
    manifest_meta: dict[str, Any],
    metrics: dict[str, dict[str, float]],
    store: ArtifactStore,
    database_url: str,
    decision: registry.GateDecision | None,
) -> AdapterOutcome:
    """Store the adapter + metrics with a manifest, register it, and promote or reject it as the
    gate `decision` says (`adapter_gate`: its fused ranking against the base order and the
    champion adapter on the same users). Without a decision (an experiment's adapters) it stays
    a candidate: never champion, never rejected.

    The rating model it was tuned with is named in its lineage (`rating_model`); the adapter
    carries a copy only when this run fitted it (a champion stored without one): see
    `base.rating.adapter_rating_model` for why and how serving finds it."""
    import shutil

    from recranker_core.base.models import write_state
    from recranker_core.base.rating import ADAPTER_STEM

    with tempfile.TemporaryDirectory(prefix="recranker-adapter-") as tmp:
        local = Path(tmp) / "adapter"
        shutil.copytree(adapter_dir, local)
        if ctx.rating_model.get("model_id") is None:
            write_state(ctx.regressor, local, ADAPTER_STEM)
            # The rating model's own index of users and items (the split it was trained on),
            # so that serving maps ids correctly whatever base model is champion by then.
            (local / "user_ids.json").write_text(json.dumps(ctx.data.user_ids))
            (local / "item_ids.json").write_text(json.dumps(ctx.data.item_ids))
        (local / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        stamp = ctx.data.watermark.strftime("%Y%m%dT%H%M%S") if ctx.data.watermark else "all"
        prefix = f"adapters/{manifest_meta['objective']}/{stamp}-{uuid.uuid4().hex[:8]}"
        stored = store.put_directory(local, prefix, {**manifest_meta, "metrics": metrics})
    adapter_id = registry.register_adapter(
        database_url,
        objective=manifest_meta["objective"],
        backbone_id=manifest_meta["backbone_id"],
        backbone_hash=manifest_meta["backbone_hash"],
        template_version=manifest_meta["template_version"],
        base_model_id=ctx.model_id,
        hyperparameters=manifest_meta.get("hyperparameters", {}),
        metrics=metrics,
        data_watermark=ctx.data.watermark,
        artifact_uri=stored.uri,
        files={path: entry.sha256 for path, entry in stored.manifest.files.items()},
        lineage={"prefix": stored.prefix, **manifest_meta.get("lineage", {})},
    )
    if decision is None:
        reason = "experiment adapter: registered as a candidate, not gated"
        return AdapterOutcome(adapter_id, False, reason, stored.uri, stored.prefix)
    if decision.promote:
        registry.promote_adapter(database_url, adapter_id, decision.reason)
    else:
        registry.reject_adapter(database_url, adapter_id, decision.reason)
    return AdapterOutcome(adapter_id, decision.promote, decision.reason, stored.uri, stored.prefix)


# The registry keeps every adapter; a DMPO run looks this far back for its SFT adapter.
_ADAPTER_LOOKBACK = 10_000


def kept_start_note(steps: int, best_step: int, objective: str) -> str | None:
    """In words, when early stopping kept the starting point of a run that took steps: the
    stored adapter then scores like where it started, which a promotion line alone hides."""
    if best_step != 0 or steps <= 0:
        return None
    start = (
        "the SFT adapter it started from"
        if objective == "dmpo"
        else "the untuned backbone (LoRA starts at zero)"
    )
    return (
        f"kept step 0 of {steps}: no validated step beat the starting point, so this adapter "
        f"scores like {start}; tune with more data or steps, or a lower learning rate"
    )


def sft_start_adapter(database_url: str, template: str) -> registry.AdapterRecord:
    """The SFT adapter a DMPO run starts from and keeps frozen as its reference: the champion
    adapter when it is an SFT adapter, else the SFT adapter that was champion most recently
    (an ALRO or DMPO adapter may be champion now), tuned with prompt template `template`."""
    sft = [
        a
        for a in registry.list_adapters(database_url, limit=_ADAPTER_LOOKBACK)
        if a.objective == "sft" and a.promoted_at is not None and a.template_version == template
    ]
    if not sft:
        raise ConfigError(
            "objective dmpo starts from a champion SFT adapter (its policy and frozen "
            f"reference), and no SFT adapter for prompt template {template} has been "
            "champion: run `recranker tune --objective sft` first (with the same "
            "RECRANKER_PROMPTS__TEMPLATE)"
        )
    champion = [a for a in sft if a.status == "champion"]
    if champion:
        return champion[0]
    return max(sft, key=lambda a: (a.promoted_at, a.adapter_id))


def fetch_adapter(
    record: registry.AdapterRecord,
    store: ArtifactStore,
    cache_root: Path,
    backbone_hash: str,
) -> Path:
    """The adapter's local copy, every file checked against the registry's digests; refused
    when built for another backbone or another prompt template than this code writes."""
    if record.backbone_hash != backbone_hash:
        raise ArtifactIntegrityError(
            f"adapter {record.adapter_id} was tuned on backbone {record.backbone_id} "
            f"(sha256 {record.backbone_hash[:12]}), not the configured one "
            f"(sha256 {backbone_hash[:12]}): set RECRANKER_BACKBONE__PATH to that backbone or "
            "tune a new adapter"
        )
    if record.template_version not in TEMPLATES:
        raise ArtifactIntegrityError(
            f"adapter {record.adapter_id} was tuned with prompt template "
            f"{record.template_version}, this code writes {', '.join(TEMPLATES)}: tune a new "
            "adapter"
        )
    prefix = record.lineage.get("prefix")
    if not prefix:
        raise DataError(f"{record.label} has no artifact prefix in its lineage: tune a new adapter")
    return fetch_registered(
        store,
        prefix,
        cache_root,
        record.files,
        f"{record.label} in recranker.adapters",
        remedy="tune a new adapter (`recranker tune`)",
    )
