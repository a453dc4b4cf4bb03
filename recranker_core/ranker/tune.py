"""LoRA instruction tuning of the ranker (METHOD.md section 5): a plain loop over the task
mixture with the loss on answer tokens only, gradient accumulation, periodic validation on fixed
users, early stopping, and a checkpoint after every validation so a crashed run resumes.

The loss is a function argument (`LossFn`): SFT now; ALRO and DMPO plug in without touching the
loop."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recranker_core.config import TuneSettings
from recranker_core.errors import ConfigError, DataError
from recranker_core.ranker.prompts import Prompt, render

log = logging.getLogger(__name__)

IGNORE = -100  # label of prompt and padding tokens: no loss


@dataclass(frozen=True)
class Example:
    """One tokenized prompt + answer; `labels` is IGNORE outside the answer."""

    input_ids: list[int]
    labels: list[int]
    task: str


@dataclass(frozen=True)
class Batch:
    input_ids: Any  # torch.LongTensor [B, T], right-padded
    attention_mask: Any
    labels: Any
    tasks: list[str]


# A loss maps (model, batch) to a scalar tensor. SFT is the default; others share the loop.
LossFn = Callable[[Any, Batch], Any]
# Validation maps the model (LoRA applied) to metrics; "ndcg@10" decides early stopping.
ValidateFn = Callable[[Any], dict[str, float]]


def sft_loss(model: Any, batch: Batch) -> Any:
    """Next-token cross-entropy on the answer tokens (the model shifts the labels)."""
    return model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
    ).loss


OBJECTIVES: dict[str, LossFn] = {"sft": sft_loss}


def encode_examples(
    prompts: Sequence[Prompt], tokenizer: Any, max_length: int
) -> tuple[list[Example], int]:
    """Tokenize prompts with their answers (prompt and answer tokenized apart, so the answer's
    first token is exactly what the verbalizer reads at inference). Returns the examples and the
    number dropped for being longer than `max_length`."""
    examples, dropped = [], 0
    for p in prompts:
        prefix, suffix, answer = render(p, tokenizer)
        prompt_ids = tokenizer(prefix + suffix, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + len(answer_ids) > max_length:
            dropped += 1
            continue
        examples.append(
            Example(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids, p.task)
        )
    if dropped:
        log.warning(
            "%d of %d prompts are longer than %d tokens and were left out "
            "(raise RECRANKER_TUNE__MAX_LENGTH or lower RECRANKER_PROMPTS__HISTORY_MAX)",
            dropped,
            len(prompts),
            max_length,
        )
    return examples, dropped


def collate(examples: Sequence[Example], pad_id: int, device: Any) -> Batch:
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    return Batch(ids.to(device), mask.to(device), labels.to(device), [e.task for e in examples])


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
    examples: Sequence[Example],
    validate: ValidateFn,
    settings: TuneSettings,
    work_dir: Path,
    *,
    loss_fn: LossFn = sft_loss,
    max_steps: int | None = None,
    progress: bool = True,
) -> TuneResult:
    """Tune LoRA weights on `examples`; returns where the best adapter (by validation NDCG@10)
    was saved. `work_dir` holds `checkpoint/` (resumed from when its fingerprint matches: same
    data, settings and backbone) and `best/`."""
    import torch
    from tqdm.auto import tqdm

    if not examples:
        raise DataError("no training examples: the sampled users gave no prompts")
    torch.manual_seed(settings.seed)
    peft_model = apply_lora(model, settings)
    device = next(peft_model.parameters()).device
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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = work_dir / "checkpoint" / "state.pt"
    best_dir = work_dir / "best"
    fingerprint = _fingerprint(examples, settings, model, loss_fn)
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
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
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
        score = metrics.get("ndcg@10", -math.inf)
        state["history"].append({"step": state["step"], **metrics})
        if score > state["best"]:
            state.update(best=score, best_step=state["step"], best_metrics=metrics, bad_evals=0)
            _save_adapter(peft_model, best_dir)
        else:
            state["bad_evals"] += 1
        log.info(
            "step %d: validation %s (best ndcg@10 %.4f at step %d)",
            state["step"],
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
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
        batch = collate([examples[r] for r in batch_rows], pad_id, device)
        loss = loss_fn(peft_model, batch) / settings.grad_accumulation
        loss.backward()
        losses.append(float(loss.detach()) * settings.grad_accumulation)
        state["tokens"] += int(batch.attention_mask.sum())
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
    )


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


def _fingerprint(
    examples: Sequence[Example], settings: TuneSettings, model: Any, loss_fn: LossFn
) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(e.labels, dtype=np.int64).tobytes())
    digest.update(json.dumps(settings.model_dump(mode="json"), sort_keys=True).encode())
    digest.update(str(getattr(model.config, "_name_or_path", "")).encode())
    digest.update(getattr(loss_fn, "__name__", repr(loss_fn)).encode())
    return digest.hexdigest()
