"""LoRA instruction tuning of the ranker (docs/METHOD.md section 5): a plain loop over the task
mixture, gradient accumulation, periodic validation on fixed users, early stopping, and a
checkpoint after every validation so a crashed run resumes.

The loss is a function argument (`LossFn`), made per objective by `OBJECTIVES` (SFT, ALRO, DMPO)
from examples that `encode_for` tokenizes for it; the loop is the same for all three."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from recranker_core.config import TuneSettings
from recranker_core.errors import ConfigError, DataError
from recranker_core.tune_ranker.batches import Example, collate
from recranker_core.tune_ranker.losses import LossFn, sft_loss
from recranker_core.tune_ranker.objectives import single_token_answer_logps
from recranker_core.tune_ranker.packing import PackedExample, collate_packed

log = logging.getLogger(__name__)


# Validation maps the model (LoRA applied) to metrics; "ndcg@10" decides early stopping.
ValidateFn = Callable[[Any], dict[str, float]]


@dataclass
class TuneResult:
    adapter_dir: Path  # the best adapter (peft save_pretrained)
    best_step: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    steps: int
    seconds: float
    train_tokens: int
    resumed_from: int | None = None
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.seconds if self.seconds else 0.0


def apply_lora(model: Any, settings: TuneSettings) -> Any:
    """Wrap the backbone with fresh LoRA weights (the backbone stays frozen)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in settings.target_modules if m not in present]
    if missing:
        raise ConfigError(
            f"RECRANKER_TUNE__TARGET_MODULES names {missing}, which this backbone does not have "
            f"(it has e.g. {sorted(present)[:12]})"
        )
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def tune(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    validate: ValidateFn,
    settings: TuneSettings,
    work_dir: Path,
    *,
    loss_fn: LossFn = sft_loss,
    max_steps: int | None = None,
    progress: bool = True,
    init_adapter: Path | None = None,
    select: str = "ndcg@10",
) -> TuneResult:
    """Tune LoRA weights on `examples` (`Example`s, or `PackedExample` rows); returns where the
    best adapter (by the validation metric `select`, e.g. the fused NDCG@3) was saved.
    `work_dir` holds `checkpoint/` (resumed from when its fingerprint matches: same data,
    settings, backbone, loss and starting adapter) and `best/`.

    `init_adapter` (a peft adapter directory, e.g. the SFT adapter DMPO starts from) is loaded
    trainable instead of fresh LoRA weights; its own LoRA configuration then applies. DMPO
    examples without reference log-probabilities get them from the starting model (that adapter,
    else the bare backbone) before the first step: the frozen reference is where tuning starts.
    """
    import torch
    from tqdm.auto import tqdm

    if not examples:
        raise DataError("no training examples: the sampled users gave no prompts")
    torch.manual_seed(settings.seed)
    fingerprint = _fingerprint(examples, settings, model, loss_fn, init_adapter)
    peft_model = start_adapter(model, settings, init_adapter)
    device = next(peft_model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if any(getattr(e, "answer_ids", None) and not e.ref_logps for e in examples):
        examples = reference_logps(peft_model, examples, pad_id, settings.batch_size)
    if device.type == "cuda":
        # Activations dominate memory on a GPU; recomputing them costs ~30% more time.
        peft_model.gradient_checkpointing_enable()
        peft_model.enable_input_require_grads()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr)
    micro = settings.batch_size
    per_epoch = math.ceil(len(examples) / micro)
    # The last step of an epoch may accumulate fewer micro-batches: epochs stay whole.
    total_steps = math.ceil(per_epoch / settings.grad_accumulation) * settings.epochs
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, settings.warmup_steps))
    )

    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = work_dir / "checkpoint" / "state.pt"
    best_dir = work_dir / "best"
    state: dict[str, Any] = {
        "step": 0,
        "micro": 0,  # micro-batches consumed in total
        "pending": 0,  # micro-batches accumulated since the last optimizer step
        "best": -math.inf,
        "best_step": 0,
        "best_metrics": {},
        "bad_evals": 0,
        "history": [],
        "tokens": 0,
    }
    resumed_from = None
    saved: dict[str, Any] = {}
    if checkpoint.exists():
        import pickle

        try:
            # Tensors and plain values only: a checkpoint never needs more, so nothing in it runs.
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            log.warning("checkpoint %s cannot be read safely (%s); starting over", checkpoint, exc)
    if saved:
        if saved.get("fingerprint") == fingerprint:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(peft_model, saved["lora"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state = saved["state"]
            resumed_from = state["step"]
            log.info("resuming from step %d (%s)", resumed_from, checkpoint)
        else:
            log.warning("checkpoint %s is for other data or settings; starting over", checkpoint)

    def evaluate() -> bool:
        """Validate, keep the best adapter, checkpoint; True when it is time to stop."""
        peft_model.eval()
        metrics = validate(peft_model)
        peft_model.train()
        score = metrics.get(select, -math.inf)
        state["history"].append({"step": state["step"], **metrics})
        if score > state["best"]:
            state.update(best=score, best_step=state["step"], best_metrics=metrics, bad_evals=0)
            _save_adapter(peft_model, best_dir)
        else:
            state["bad_evals"] += 1
        log.info(
            "step %d: validation %s (best %s %.4f at step %d)",
            state["step"],
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
            select,
            state["best"],
            state["best_step"],
        )
        _save_checkpoint(checkpoint, fingerprint, peft_model, optimizer, scheduler, state)
        return bool(state["bad_evals"] >= settings.patience)

    started = time.perf_counter()
    if resumed_from is None:
        evaluate()  # the untuned backbone is the baseline every adapter must beat
    peft_model.train()
    bar = tqdm(
        total=total_steps, initial=state["step"], desc="tuning", unit="step", disable=not progress
    )
    stopped = False
    losses: list[float] = []
    while state["step"] < total_steps and not stopped:
        epoch, offset = divmod(state["micro"], per_epoch)
        order = np.random.default_rng(settings.seed + epoch).permutation(len(examples))
        batch_rows = order[offset * micro : (offset + 1) * micro]
        chosen = [examples[r] for r in batch_rows]
        if isinstance(chosen[0], PackedExample):
            batch: Any = collate_packed(chosen, pad_id, device)
            state["tokens"] += batch.tokens
        else:
            batch = collate(chosen, pad_id, device)
            state["tokens"] += int(batch.attention_mask.sum())
        loss = loss_fn(peft_model, batch) / settings.grad_accumulation
        loss.backward()
        losses.append(float(loss.detach()) * settings.grad_accumulation)
        state["micro"] += 1
        state["pending"] += 1
        if state["pending"] < settings.grad_accumulation and offset + 1 < per_epoch:
            continue
        state["pending"] = 0
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", epoch=epoch)
        log.debug("step %d loss %.4f", state["step"], np.mean(losses))
        losses.clear()
        if state["step"] % settings.eval_every == 0 or state["step"] == total_steps:
            stopped = evaluate()
    bar.close()
    seconds = time.perf_counter() - started
    if not best_dir.exists():  # only possible when resumed after the best was lost
        _save_adapter(peft_model, best_dir)
    return TuneResult(
        adapter_dir=best_dir,
        best_step=state["best_step"],
        best_metrics=state["best_metrics"],
        history=state["history"],
        steps=state["step"],
        seconds=seconds,
        train_tokens=state["tokens"],
        resumed_from=resumed_from,
        stopped_early=stopped,
        extra={"init_adapter": str(init_adapter)} if init_adapter is not None else {},
    )


def start_adapter(model: Any, settings: TuneSettings, init_adapter: Path | None) -> Any:
    """The trainable peft model a run starts from: `init_adapter` loaded trainable, or fresh
    LoRA weights (`apply_lora`). Under DMPO every dropout is off (`_without_dropout`)."""
    if init_adapter is None:
        peft_model = apply_lora(model, settings)
    else:
        from peft import PeftModel

        if not (init_adapter / "adapter_config.json").is_file():
            raise ConfigError(
                f"{init_adapter} is not a peft adapter directory (no adapter_config.json); point "
                "it at a tuned adapter, e.g. the SFT adapter from `recranker tune --objective sft`"
            )
        peft_model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    if settings.objective == "dmpo":
        _without_dropout(peft_model)
    return peft_model


def _without_dropout(model: Any) -> None:
    """Turn off every dropout of `model` in place: the LoRA dropout (the SFT adapter brings its
    own, whatever RECRANKER_TUNE__LORA_DROPOUT says) and any of the backbone's. DMPO's margin is
    h = log pi - log pi_ref with the reference read in eval mode; a policy trained with dropout
    would start at h != 0 and learn against its own noise (TRL's DPO trainer disables dropout
    for the same reason)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # Attention dropout is a float that the attention function reads while training.
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def reference_logps(
    model: Any, examples: Sequence[Example], pad_id: int, batch_size: int
) -> list[Example]:
    """`examples` with the log-probabilities of their DMPO answers under `model` as it is now,
    read without gradients and in eval mode (no dropout): the frozen reference of DMPO."""
    import torch

    need = [r for r, e in enumerate(examples) if e.answer_ids and not e.ref_logps]
    out = list(examples)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(need), batch_size):
            rows = need[start : start + batch_size]
            batch = collate([examples[r] for r in rows], pad_id, device)
            logps = single_token_answer_logps(
                model, batch.input_ids, batch.attention_mask, batch.answer_ids
            )
            for r, values in zip(rows, logps.tolist(), strict=True):
                out[r] = replace(examples[r], ref_logps=tuple(float(v) for v in values))
    model.train(was_training)
    log.info("reference log-probabilities of %d DMPO examples read", len(need))
    return out


def _save_adapter(peft_model: Any, directory: Path) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    peft_model.save_pretrained(tmp)
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    tmp.rename(directory)


def _save_checkpoint(
    path: Path, fingerprint: str, peft_model: Any, optimizer: Any, scheduler: Any, state: Any
) -> None:
    import torch
    from peft import get_peft_model_state_dict

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "fingerprint": fingerprint,
            "lora": get_peft_model_state_dict(peft_model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": state,
        },
        tmp,
    )
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint


_NOT_TRAJECTORY = ("profile", "guard_users")


def _fingerprint(
    examples: Sequence[Any],
    settings: TuneSettings,
    model: Any,
    loss_fn: LossFn,
    init_adapter: Path | None = None,
) -> str:
    digest = hashlib.sha256()
    for e in examples:
        if isinstance(e, PackedExample):
            digest.update(json.dumps([e.prefix, e.suffixes, e.answers]).encode())
            continue
        _digest_example(digest, e)
        if e.twin is not None:
            _digest_example(digest, e.twin)
    # Settings read only after training (the guard's users) or only as a label (the profile,
    # already laid over the others) do not change what a step computes: changing them must not
    # throw away an hour of checkpointed CPU training.
    trajectory = settings.model_dump(mode="json", exclude=set(_NOT_TRAJECTORY))
    digest.update(json.dumps(trajectory, sort_keys=True).encode())
    digest.update(str(getattr(model.config, "_name_or_path", "")).encode())
    digest.update(getattr(loss_fn, "__name__", repr(loss_fn)).encode())
    if init_adapter is not None:
        digest.update(_adapter_hash(init_adapter).encode())
    return digest.hexdigest()


def _digest_example(digest: Any, e: Example) -> None:
    digest.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
    digest.update(np.asarray(e.labels, dtype=np.int64).tobytes())
    optional = (e.slot_positions, e.slot_token_ids, e.gains, e.permutation, e.answer_ids)
    if any(optional) or e.ref_logps:
        digest.update(json.dumps([*optional, e.ref_logps]).encode())


def _adapter_hash(directory: Path) -> str:
    """sha256 over the files that make an adapter (its config and weights)."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("adapter_*")):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
