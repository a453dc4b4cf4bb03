"""One ranker tuning run (`run_tuning`): the adapter tuned on the instruction prompts, the guard's
decision on the kept step, the gate against the champion adapter on the same users, and the
adapter stored and registered."""

from __future__ import annotations

import logging
from typing import Any

from recranker_core import registry
from recranker_core.config import Settings
from recranker_core.llm.prompts import Catalog, Prompt
from recranker_core.store import ArtifactStore
from recranker_core.tune_ranker.adapter import (
    adapter_prompt_settings,
    fetch_adapter,
    kept_start_note,
    publish_adapter,
)
from recranker_core.tune_ranker.context import BaseContext, BaseHints
from recranker_core.tune_ranker.dataset import (
    MIN_GUARD_USERS,
    SELECT_METRIC,
    ValidationSet,
    Validator,
    validation_prompts,
    validation_sets,
)

log = logging.getLogger(__name__)


def run_tuning(
    ctx: BaseContext,
    prompts: list[Prompt],
    catalog: Catalog,
    sample: Any,
    dataset_uri: str,
    settings: Settings,
    database_url: str,
    store: ArtifactStore,
    *,
    max_steps: int | None = None,
    start: registry.AdapterRecord | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """Tune an adapter on `prompts`, keep the step whose fused ranking scores best on the fixed
    validation users, decide whether its fusion is served (the guard), gate it against the
    base order and the champion adapter on the same users, store and register it."""
    from recranker_core.llm.backbone import load_backbone
    from recranker_core.llm.render import verbalizer_ids
    from recranker_core.tune_ranker.loop import tune
    from recranker_core.tune_ranker.losses import OBJECTIVES, encode_for

    objective = settings.tune.objective
    loss_fn = OBJECTIVES[objective](settings.tune)
    backbone = load_backbone(settings.backbone, settings.home)
    verbalizer_ids(backbone.tokenizer, settings.retrain.candidates)  # fails early, clearly
    cache = settings.home / "cache" / "artifacts"
    init_adapter = None
    if start is not None:
        init_adapter = fetch_adapter(start, store, cache, backbone.backbone_hash)
    examples, dropped = encode_for(prompts, backbone.tokenizer, settings.tune, catalog)
    hints = BaseHints(ctx)
    valid, guard = validation_sets(ctx, catalog, hints, settings)
    log.info(
        "%s: %d training examples (%d left out), %d validation users (%.1f%% of evaluable users "
        "have their validation item among the candidates); base ndcg@3 on them %.4f",
        objective,
        len(examples),
        dropped,
        len(valid.users),
        100 * valid.hit_share,
        valid.base_metrics["ndcg@3"],
    )
    validator = Validator(
        valid, backbone.tokenizer, settings.rank.score_batch_size, seed=settings.tune.seed
    )
    run_name = f"{ctx.model_id}-{objective}" + (f"-{experiment}" if experiment else "")
    if start is not None:
        run_name += f"-from-{start.adapter_id}"
    result = tune(
        backbone.model,
        backbone.tokenizer,
        examples,
        validator,
        settings.tune,
        settings.home / "tuning" / run_name,
        loss_fn=loss_fn,
        max_steps=max_steps,
        init_adapter=init_adapter,
        select=SELECT_METRIC,
    )
    decision, guard_validator = _guard_decision(result, validator, guard, settings)
    log.info("guard: %s", decision.reason)
    gate = None
    if experiment is None:
        champion = registry.champion_adapter(database_url)
        mine = None
        if champion is not None:
            mine = champion_on_users(
                champion, guard_validator, ctx, catalog, settings, store, database_url
            )
        gate = registry.adapter_gate(decision, mine, settings.tune.promotion_tolerance)
    started_from = {}
    if start is not None:
        # DMPO's policy starts from this adapter and its reference is this adapter, frozen.
        started_from = {"init_adapter_id": start.adapter_id, "init_adapter_uri": start.artifact_uri}
    metrics: dict[str, Any] = {
        "valid": result.best_metrics,
        "valid_base": valid.base_metrics,
        "fusion": decision.as_json(),
    }
    outcome = publish_adapter(
        result.adapter_dir,
        ctx,
        {
            "objective": objective,
            "backbone_id": backbone.backbone_id,
            "backbone_hash": backbone.backbone_hash,
            "template_version": settings.prompts.template,
            "base_model_id": ctx.model_id,
            "data_watermark": ctx.data.watermark.isoformat() if ctx.data.watermark else None,
            "sampled_users": int(len(sample.users)),
            "sampled_distinct_users": int(sample.counts.get("final_distinct", 0)),
            "dataset": dataset_uri,
            "hyperparameters": settings.tune.model_dump(mode="json"),
            "lineage": {
                "sampling": sample.counts,
                "prompts": settings.prompts.model_dump(mode="json"),
                "training_data": settings.tune.training_data,
                "validation_users": len(valid.users),
                "validation_hit_share": valid.hit_share,
                "rating_model": ctx.rating_model,
                "best_step": result.best_step,
                "steps": result.steps,
                "device": backbone.device,
                "dtype": backbone.dtype,
                **started_from,
                **({"experiment": experiment} if experiment else {}),
            },
        },
        metrics,
        store,
        database_url,
        gate,
    )
    return {
        "note": kept_start_note(result.steps, result.best_step, objective),
        "adapter_id": outcome.adapter_id,
        "promoted": outcome.promoted,
        "reason": outcome.reason,
        "artifact_uri": outcome.artifact_uri,
        "metrics": metrics,
        "fusion": decision.as_json(),
        "history": result.history,
        "steps": result.steps,
        "best_step": result.best_step,
        "seconds": round(result.seconds, 1),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "resumed_from": result.resumed_from,
        "backbone": backbone.backbone_id,
        "device": backbone.device,
        "objective": objective,
        "training_examples": len(examples),
        "rating_model": ctx.rating_model,
        **started_from,
    }


def _guard_decision(
    result: Any, validator: Validator, guard: ValidationSet | None, settings: Settings
) -> tuple[Any, Validator]:
    """The guard's decision on the kept adapter, and the validator of the users it read: the
    guard's own users (early stopping never read them), else the early-stopping users' decision
    at the kept step, said to be optimistic (the best of several evaluations)."""
    from dataclasses import replace

    from peft import PeftModel

    from recranker_core.llm.backbone import load_backbone

    steps = [int(h["step"]) for h in result.history]
    if guard is None and len(validator.decisions) == len(steps) and result.best_step in steps:
        decision = validator.decisions[steps.index(result.best_step)]
        return _optimistic(decision), validator
    fresh = load_backbone(settings.backbone, settings.home)
    model = PeftModel.from_pretrained(fresh.model, result.adapter_dir)
    model.eval()
    target = (
        validator
        if guard is None
        else Validator(guard, validator.tokenizer, validator.batch_size, validator.seed)
    )
    target(model)
    decision = target.decisions[-1]
    if guard is None:
        decision = _optimistic(decision)
    else:
        decision = replace(decision, reason=decision.reason + " (the guard's own users)")
    return decision, target


def _optimistic(decision: Any) -> Any:
    from dataclasses import replace

    return replace(
        decision,
        reason=decision.reason + f" (too few validation users beside the early-stopping ones "
        f"for a guard of its own, under {MIN_GUARD_USERS}: measured on the users that chose "
        "the step, an optimistic reading)",
    )


def champion_on_users(
    champion: registry.AdapterRecord,
    validator: Validator,
    ctx: BaseContext,
    catalog: Catalog,
    settings: Settings,
    store: ArtifactStore,
    database_url: str,
) -> Any:
    """The champion adapter's guard decision on the candidate's validation users: the stored
    one when it was measured on the same users, else measured now with the champion's own
    prompt settings and rating model (the one it was tuned with). None when the champion cannot
    run on the configured backbone (it could not be served either; the candidate is then
    compared with the base order only)."""
    from peft import PeftModel

    from recranker_core.base.rating import RatingHints, adapter_rating_model
    from recranker_core.batch_rank.fusion import GuardDecision, users_hash
    from recranker_core.llm.backbone import load_backbone

    valid = validator.valid
    stored = champion.metrics.get("fusion")
    if stored:
        decision = GuardDecision.from_json(stored)
        if decision.users_hash == users_hash(valid.users.tolist()) and decision.k == 3:
            return decision
    fresh = load_backbone(settings.backbone, settings.home)
    if champion.backbone_hash != fresh.backbone_hash:
        log.warning(
            "champion adapter %s was tuned on another backbone: the candidate is compared with "
            "the base order only",
            champion.label,
        )
        return None
    cache = settings.home / "cache" / "artifacts"
    directory = fetch_adapter(champion, store, cache, fresh.backbone_hash)
    model = PeftModel.from_pretrained(fresh.model, directory)
    model.eval()
    rating = adapter_rating_model(champion, directory, database_url, store, cache)
    hints = BaseHints(ctx, RatingHints(rating, ctx.data))
    prompts = validation_prompts(
        ctx, catalog, hints, valid, adapter_prompt_settings(champion, settings.prompts)
    )
    decision = validator.decide(validator.scored(model, prompts))
    log.info("champion %s on the same validation users: %s", champion.label, decision.reason)
    return decision
