"""bfloat16 against float32 on the CPU: the LoRA tuning step (forward, backward, AdamW; tokens/s)
and the verbalizer scoring of rr-3 prompts through the LoRA-wrapped model (s/user; as serving
scores), each measured for both dtypes in this run on the same batch and prompts (alternating,
best of `--repeats`), with how far bfloat16 moves the scores and the order they give.

    python benchmarks/cpu_dtype.py [--users 6 --history 20 --batch 2 --length 1024 --repeats 2]

Where the CPU has bfloat16 instructions (AVX512-BF16 or AMX: `cpu_has_native_bf16`), bfloat16 is
what `RECRANKER_BACKBONE__DTYPE=bfloat16` buys; elsewhere torch emulates it and the ratio falls
below 1. The prompts are those of benchmarks/score.py (synthetic MovieLens-shaped users, 10
candidates); the training batch is random token ids (a step's cost does not depend on the text).
The backbone is RECRANKER_BACKBONE__PATH or the default SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from base_models import cpu_model  # benchmarks/ is on sys.path when run as a script
from score import build_entries, timed
from tune import make_batch

from recranker_core.config import PromptSettings, load_settings
from recranker_core.llm.backbone import cpu_has_native_bf16, load_backbone
from recranker_core.llm.score import UserScores, score_users
from recranker_core.tune_ranker.loop import apply_lora
from recranker_core.tune_ranker.losses import sft_loss

DTYPES = ("float32", "bfloat16")
CPU = torch.device("cpu")


def top3_overlap(a: list[UserScores], b: list[UserScores], task: str) -> float:
    """Mean share of the top 3 candidates by `task`'s score that both dtypes agree on."""
    shares = []
    for x, y in zip(a, b, strict=True):
        top_x = set(np.argsort(-np.nan_to_num(getattr(x, task), nan=-np.inf))[:3].tolist())
        top_y = set(np.argsort(-np.nan_to_num(getattr(y, task), nan=-np.inf))[:3].tolist())
        shares.append(len(top_x & top_y) / 3)
    return float(np.mean(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--history", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2, help="Rows per training micro-batch.")
    parser.add_argument("--length", type=int, default=1024, help="Tokens per training row.")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    settings = load_settings()
    backbones = {}
    models = {}  # the backbone with a LoRA adapter, as tuning trains it and serving scores it
    for dtype in DTYPES:
        chosen = settings.backbone.model_copy(update={"device": "cpu", "dtype": dtype})
        backbones[dtype] = load_backbone(chosen, settings.home)
        models[dtype] = apply_lora(backbones[dtype].model, settings.tune).eval()
    tokenizer = backbones["float32"].tokenizer
    prompts = PromptSettings(template="rr-3", history_max=args.history)
    with tempfile.TemporaryDirectory(prefix="recranker-bench-dtype-") as tmp:
        entries = build_entries(Path(tmp), args.users, 10, prompts)

    # Scoring: alternate the dtypes so that a machine getting busier hurts both alike.
    scored: dict[str, list[UserScores]] = {}
    seconds: dict[str, float] = {d: float("inf") for d in DTYPES}
    for dtype in DTYPES:  # warm-up: lazy imports, allocator, kernels
        score_users(models[dtype], tokenizer, entries[:1], tasks=("listwise",))
    for _ in range(args.repeats):
        for dtype in DTYPES:
            result, s = timed(lambda d=dtype: score_users(models[d], tokenizer, entries), CPU)
            scored[dtype] = result
            seconds[dtype] = min(seconds[dtype], s)
    n = len(entries)
    diff = {
        task: max(
            float(np.nanmax(np.abs(getattr(a, task) - getattr(b, task))))
            for a, b in zip(scored["float32"], scored["bfloat16"], strict=True)
        )
        for task in ("pointwise", "pairwise", "listwise")
    }

    # Training: the tuner's LoRA step on CPU (no gradient checkpointing there).
    train: dict[str, float] = {}
    steps = {}
    for dtype in DTYPES:
        peft_model = models[dtype]
        vocab = backbones[dtype].model.config.vocab_size
        batch = make_batch(vocab, args.batch, args.length, CPU)
        peft_model.train()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.tune.lr)

        def step(m: Any = peft_model, o: Any = optimizer, b: Any = batch) -> None:
            sft_loss(m, b).backward()
            o.step()
            o.zero_grad(set_to_none=True)

        step()  # warm-up
        steps[dtype] = step
        train[dtype] = float("inf")
    for _ in range(args.repeats):
        for dtype in DTYPES:
            _, s = timed(steps[dtype], CPU)
            train[dtype] = min(train[dtype], s)
    tokens = args.batch * args.length

    print(
        f"CPU bfloat16 vs float32, {datetime.now(UTC):%Y-%m-%d}, {cpu_model()}, "
        f"{torch.get_num_threads()} threads, native bfloat16: {cpu_has_native_bf16()}; "
        f"backbone {backbones['float32'].backbone_id}; {n} users x 10 candidates (rr-3, history "
        f"{args.history}); training micro-batch {args.batch} x {args.length} tokens"
    )
    print("| work | float32 | bfloat16 | bfloat16 speed-up |")
    print("|---|---:|---:|---:|")
    print(
        f"| scoring (s/user) | {seconds['float32'] / n:.3f} | {seconds['bfloat16'] / n:.3f} "
        f"| {seconds['float32'] / seconds['bfloat16']:.2f}x |"
    )
    print(
        f"| LoRA step (tokens/s) | {tokens / train['float32']:,.0f} | "
        f"{tokens / train['bfloat16']:,.0f} | {train['float32'] / train['bfloat16']:.2f}x |"
    )
    print(
        "largest score difference bfloat16 - float32: "
        + ", ".join(f"{task} {value:.3f}" for task, value in diff.items())
    )
    print(
        "top-3 candidates both dtypes agree on: "
        + ", ".join(
            f"{task} {top3_overlap(scored['float32'], scored['bfloat16'], task):.0%}"
            for task in ("pointwise", "pairwise", "listwise")
        )
    )


if __name__ == "__main__":
    main()
