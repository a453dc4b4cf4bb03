"""Ranking speed: users/s of our scorer (one forward pass per prompt, the user's history prefix
run once and its key/value cache reused) against the published RecRanker way (generate an answer
per prompt with `model.generate` and parse the text) on the same backbone and users, and our
prompt tokens/s against a plain batched forward pass of the same token count (the ceiling of
this hardware), all measured in this run.

    python benchmarks/rank.py [--users 5 --history 50] [--backbone default|tiny|PATH]
                              [--template rr-3]

Per user: 10 candidates -> 10 pointwise + 10 pairwise (5 pairs, both orders) + 1 listwise
prompt, built by `build_inference_prompts` from the synthetic MovieLens-shaped catalogue (see
benchmarks/score.py). Our scorer reads them in `--template` (default rr-3: the candidates in the
shared prefix, questions of a few tokens); it is also timed on rr-1 prompts for reference. The
baseline is the published layout (rr-1: every prompt carries its own items and hint, the same
draws of history, pairs and order), greedily generating up to 3 tokens for pointwise and
pairwise answers and 30 for the listwise ranking, then parsing them; unparseable answers are
counted.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from base_models import cpu_model  # benchmarks/ is on sys.path when run as a script
from score import build_entries, load

from recranker_core.config import PromptSettings
from recranker_core.llm.prompts import IDENTIFIERS, Prompt
from recranker_core.llm.render import render
from recranker_core.llm.score import score_users

MAX_NEW = {"pointwise": 3, "pairwise": 3, "listwise": 30}


def generate_and_parse(model: Any, tokenizer: Any, prompts: list[Prompt]) -> tuple[int, int]:
    """The baseline: one `generate` call per prompt, answers parsed from text. Returns (prompt
    tokens read, unparseable answers)."""
    tokens, failures = 0, 0
    device = next(model.parameters()).device
    for p in prompts:
        text = "".join(render(p, tokenizer)[:2])
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        tokens += ids.shape[1]
        with torch.inference_mode():
            out = model.generate(
                ids.to(device),
                attention_mask=torch.ones_like(ids).to(device),
                max_new_tokens=MAX_NEW[p.task],
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        if p.task == "pointwise":
            ok = re.match(r"[1-5]", answer) is not None
        elif p.task == "pairwise":
            ok = answer.lower().startswith(("yes", "no"))
        else:
            letters = set(IDENTIFIERS[: len(p.items)])
            ok = any(tok in letters for tok in re.findall(r"[A-Z]", answer))
        failures += not ok
    return tokens, failures


def plain_forward(model: Any, tokens: int, batch: int, device: Any) -> float:
    """Seconds for a plain batched forward pass over `tokens` tokens (rows of 512)."""
    length = 512
    rows = max(1, tokens // length)
    ids = torch.randint(0, model.config.vocab_size, (rows, length))
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, rows, batch):
            model(input_ids=ids[lo : lo + batch].to(device), logits_to_keep=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--backbone", default="default", help="default, tiny or a path")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--adapter", default=None, help="A LoRA adapter directory applied to both scorers."
    )
    parser.add_argument("--template", default="rr-3", choices=["rr-1", "rr-2", "rr-3"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, name = load(args.backbone, Path(tmp))
        if args.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, args.adapter).eval()
            name += f" + adapter {args.adapter}"
        device = next(model.parameters()).device
        built = {
            template: build_entries(
                Path(tmp) / "data",
                args.users,
                args.candidates,
                PromptSettings(history_max=args.history, pairwise_pairs=5, template=template),
            )
            for template in {args.template, "rr-1", "rr-2"}
        }
        entries, published = built[args.template], built["rr-1"]
        score_users(model, tokenizer, entries[:1], batch_size=args.batch_size)  # warm-up

        def timed(work: list[Any]) -> tuple[float, int]:
            start = time.perf_counter()
            scored = score_users(model, tokenizer, work, batch_size=args.batch_size)
            return time.perf_counter() - start, sum(s.prompt_tokens for s in scored)

        ours, our_tokens = timed(entries)
        reference = timed(published) if args.template != "rr-1" else None
        # rr-2 (a random history sample grouped by rating) is what rr-3's recency costs against.
        grouped = timed(built["rr-2"]) if args.template not in ("rr-1", "rr-2") else None

        start = time.perf_counter()
        base_tokens, failures = 0, 0
        for _, _, prompts in published:
            t, f = generate_and_parse(model, tokenizer, prompts)
            base_tokens += t
            failures += f
        baseline = time.perf_counter() - start
        ceiling = plain_forward(model, our_tokens, 8, device)

    n = len(entries)
    where = torch.cuda.get_device_name() if device.type == "cuda" else cpu_model()
    print(
        f"ranking speed, {datetime.now(UTC):%Y-%m-%d}, {where}, {device.type}, "
        f"{torch.get_num_threads()} threads; backbone {name}; {n} users x {args.candidates} "
        f"candidates, history {args.history}, {len(entries[0][2])} prompts per user"
    )
    print("| scorer | users/s | s/user | prompt tokens/user |")
    print("|---|---|---|---|")
    print(
        f"| ours (verbalizer, prefix cache, {args.template}) | {n / ours:.3f} | {ours / n:.2f} | "
        f"{our_tokens / n:,.0f} |"
    )
    if grouped is not None:
        print(
            f"| ours on rr-2 prompts (reference) | {n / grouped[0]:.3f} | "
            f"{grouped[0] / n:.2f} | {grouped[1] / n:,.0f} |"
        )
    if reference is not None:
        print(
            f"| ours on rr-1 prompts (reference) | {n / reference[0]:.3f} | "
            f"{reference[0] / n:.2f} | {reference[1] / n:,.0f} |"
        )
    print(
        f"| generate + parse (published way, rr-1) | {n / baseline:.3f} | {baseline / n:.2f} | "
        f"{base_tokens / n:,.0f} |"
    )
    print(
        f"speed-up: {baseline / ours:.1f}x; baseline unparseable answers: {failures} of "
        f"{sum(len(p) for _, _, p in entries)}"
    )
    print(
        f"our tokens/s {our_tokens / ours:,.0f} vs plain batched forward "
        f"{our_tokens / ceiling:,.0f} tokens/s: {ceiling / ours:.0%} of the ceiling"
    )


if __name__ == "__main__":
    main()
