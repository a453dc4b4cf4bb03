"""What a batch-ranking run serves (`plan_serving`: in mode `fused`, the champion adapter's stored
guard decision) and the models it serves with: the ranker (the LLM with the champion adapter,
`load_ranker`) and the champion's scorer, loaded once per process (`serving_models`)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recranker_core import registry
from recranker_core.base.candidates import ChampionScorer, load_champion
from recranker_core.base.rating import RatingModel
from recranker_core.batch_rank.fusion import FusedWeights
from recranker_core.batch_rank.hybrid import MODES
from recranker_core.errors import ArtifactIntegrityError, ConfigError
from recranker_core.llm.prompts import Catalog

log = logging.getLogger(__name__)


# RECRANKER_RANK__MODE: `fused` (the default) serves what the adapter's guard decided.
SERVING_MODES = ("fused", *MODES)


@dataclass(frozen=True)
class ServingPlan:
    """What a batch-ranking run serves, decided once per run: whether shards load the LLM and,
    in mode `fused`, with which weights; `note` says it in one sentence (log, params,
    artifact)."""

    mode: str
    adapter: registry.AdapterRecord | None  # the champion adapter consulted (None: none)
    llm: bool  # shards load the backbone and re-rank with it
    fused: FusedWeights | None  # mode fused with the LLM: the weights served
    note: str
    fusion: dict[str, Any] | None = None  # mode fused: what the run records in its params

    @property
    def served(self) -> str:
        """'fused', 'base' or the ablation mode served."""
        if self.mode == "fused":
            return "fused" if self.llm else "base"
        return self.mode if self.llm else "base"


def served_weights(record: registry.AdapterRecord) -> FusedWeights | None:
    """The weights an adapter's stored guard decision serves; None when it serves the base
    order or no decision is stored."""
    decision = record.fusion
    return decision.weights if decision is not None and decision.served == "fused" else None


def plan_serving(
    mode: str, adapter: registry.AdapterRecord | None, override: list[float] | None = None
) -> ServingPlan:
    """What a run in `mode` serves with the champion `adapter`.

    Mode `fused` reads the adapter's stored guard decision (`metrics["fusion"]`): "base" (or
    none stored) serves the base order and spends no LLM time; "fused" re-ranks with its
    weights. `override` (RECRANKER_RANK__FUSED_WEIGHTS) replaces the stored weights and the
    guard. Weights with nothing on the LLM tasks serve the base order without the LLM too."""
    if mode not in SERVING_MODES:
        raise ConfigError(f"RECRANKER_RANK__MODE={mode!r}: use one of {', '.join(SERVING_MODES)}")
    if mode == "base":
        return ServingPlan(mode, None, False, None, "mode base: no LLM re-ranking in this run")
    if adapter is None:
        return ServingPlan(
            mode,
            None,
            False,
            None,
            f"mode {mode}: no champion adapter (none tuned yet, or every tuned one was "
            "rejected by its gate: `recranker adapters list` says why), every user gets the "
            "base ranking (source 'base')",
            {"served": "base", "source": "no adapter"} if mode == "fused" else None,
        )
    if mode != "fused":
        return ServingPlan(mode, adapter, True, None, f"mode {mode}: {adapter.label}")
    decision = adapter.fusion
    record: dict[str, Any] = {
        "adapter_id": adapter.adapter_id,
        "guard": decision.served if decision is not None else None,
    }
    if decision is not None:
        record.update({k: decision.as_json()[k] for k in ("gain", "se", "k", "n_users", "reason")})
    if override is not None:
        weights: FusedWeights | None = FusedWeights.from_list(override)
        record["source"] = "RECRANKER_RANK__FUSED_WEIGHTS"
        why = (
            "RECRANKER_RANK__FUSED_WEIGHTS overrides the stored decision ("
            + (f"whose guard served {decision.served}" if decision else "none stored")
            + ")"
        )
    elif decision is None:
        weights = None
        record["source"] = "none stored"
        why = (
            f"{adapter.label} has no stored guard decision (run `recranker tune-weights` to "
            "measure one)"
        )
    else:
        weights = decision.weights if decision.served == "fused" else None
        record["source"] = "stored"
        why = f"{adapter.label}'s guard: {decision.reason}"
    if weights is None or not weights.tasks:
        record.update({"served": "base", "weights": weights.as_list() if weights else None})
        note = f"mode fused: {why}; every user gets the base list (source 'base'), no LLM time"
        return ServingPlan(mode, adapter, False, None, note, record)
    record.update({"served": "fused", "weights": weights.as_list()})
    note = f"mode fused: {why}; re-ranking with weights {weights.label()}"
    return ServingPlan(mode, adapter, True, weights, note, record)


@dataclass
class Ranker:
    """The LLM with the champion adapter applied, and the rating model its pointwise hint reads
    (the one it was tuned with: `base.rating.adapter_rating_model`)."""

    model: Any
    tokenizer: Any
    adapter: registry.AdapterRecord
    rating: RatingModel
    backbone_id: str
    device: str

    def settings_for(self, settings: Any) -> Any:
        """`settings` with the prompt settings this adapter was tuned with (template, history
        length, pair scheme): its wording is the one it scores (`RECRANKER_PROMPTS__*` only
        choose those of new tuning)."""
        from recranker_core.tune_ranker.adapter import adapter_prompt_settings

        prompts = adapter_prompt_settings(self.adapter, settings.prompts)
        if prompts is settings.prompts:
            return settings
        return settings.model_copy(update={"prompts": prompts})


def load_ranker(
    database_url: str, store: Any, settings: Any, record: registry.AdapterRecord | None = None
) -> Ranker | None:
    """`record` (default: the champion adapter) on the configured backbone (checksums, backbone
    and template verified), with the rating model it was tuned with (the champion base model's
    in the usual case; see `adapter_rating_model`); None when no adapter has been tuned yet (the
    run is then base-only)."""
    from peft import PeftModel

    from recranker_core.base.rating import adapter_rating_model
    from recranker_core.llm.backbone import load_backbone
    from recranker_core.tune_ranker.adapter import fetch_adapter

    record = record or registry.champion_adapter(database_url)
    if record is None:
        log.warning("no champion adapter: every user gets the base ranking (source 'base')")
        return None
    backbone = load_backbone(settings.backbone, settings.home)
    cache = settings.home / "cache" / "artifacts"
    directory = fetch_adapter(record, store, cache, backbone.backbone_hash)
    if not (directory / "adapter_model.safetensors").is_file():
        raise ArtifactIntegrityError(
            f"{record.label}: no adapter_model.safetensors in {directory}; only safetensors "
            "weights are loaded: tune a new adapter (`recranker tune`)"
        )
    rating = adapter_rating_model(record, directory, database_url, store, cache)
    model = PeftModel.from_pretrained(backbone.model, directory)
    model.eval()
    log.info(
        "ranker: %s on %s (%s, %s)",
        record.label,
        backbone.backbone_id,
        backbone.device,
        backbone.dtype,
    )
    tuned_dtype = record.lineage.get("dtype")
    if tuned_dtype and tuned_dtype != backbone.dtype:
        # bfloat16 moves a verbalizer log-probability by up to about 0.1 against float32: the
        # guard's decision and the fused weights were measured with the other one.
        log.warning(
            "%s was tuned and guarded in %s and is scored here in %s "
            "(RECRANKER_BACKBONE__DTYPE): its scores differ slightly from those its guard read",
            record.label,
            tuned_dtype,
            backbone.dtype,
        )
    if record.template_version != settings.prompts.template:
        log.info(
            "%s was tuned with prompt template %s: its prompts use it (RECRANKER_PROMPTS__"
            "TEMPLATE=%s applies to new tuning)",
            record.label,
            record.template_version,
            settings.prompts.template,
        )
    return Ranker(model, backbone.tokenizer, record, rating, backbone.backbone_id, backbone.device)


@dataclass
class ServingModels:
    """What a shard needs besides its users' data: the base model's scorer, the ranker (None for
    a base-only run) and the catalogue of item titles the prompts show."""

    champion: ChampionScorer
    ranker: Ranker | None
    catalog: Catalog | None


_SERVING_LOCK = threading.Lock()
_SERVING: dict[tuple[Any, ...], ServingModels] = {}


def serving_models(
    database_url: str, store: Any, settings: Any, model_id: int, adapter_id: int | None
) -> ServingModels:
    """Model `model_id`'s scorer and adapter `adapter_id` on the configured backbone, loaded once
    per process (threads share them; each Dask worker process loads its own copy, from S3, with
    every checksum verified). One set is kept: a run with other models replaces it."""
    key = (
        database_url,
        model_id,
        adapter_id,
        str(settings.home),
        settings.backbone.model_dump_json(),
    )
    with _SERVING_LOCK:
        found = _SERVING.get(key)
        if found is not None:
            return found
        _SERVING.clear()
        champion = load_champion(database_url, store, cache_root(settings), model_id)
        ranker = None
        catalog = None
        if adapter_id is not None:
            record = registry.get_adapter(database_url, adapter_id)
            ranker = load_ranker(database_url, store, settings, record)
            catalog = Catalog.from_database(database_url, champion.item_ids)
        _SERVING[key] = ServingModels(champion, ranker, catalog)
        return _SERVING[key]


def cache_root(settings: Any) -> Path:
    return Path(settings.home) / "cache" / "artifacts"
