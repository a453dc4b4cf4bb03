"""Verbalizer scoring throughput: users/s of the prefix-cached scorer (each user's history prefix
run once, the questions against its key/value cache) against running every full prompt, both
measured in this run on the same prompts, with the prompt tokens each reads per user.

    python benchmarks/score.py [--users 20 --candidates 10 --history 50] [--backbone default]

The data is the synthetic MovieLens-shaped generator's (its titles, years and genres); the users
are those with the most ratings, candidates the most popular items they have not rated, prompts
all three tasks from `build_inference_prompts`. `--backbone tiny` (default) is the test backbone
(a random two-layer Llama: it shows the scorer's own overhead), `--backbone default` the real
default backbone as `load_backbone` loads it (bf16 on CUDA, float32 on CPU), or a model path.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from base_models import cpu_model  # benchmarks/ is on sys.path when run as a script

from recranker_core.base.split import SplitData, build_split
from recranker_core.config import PromptSettings, load_settings
from recranker_core.datasets.synthetic import generate
from recranker_core.llm.builders import build_inference_prompts
from recranker_core.llm.prompts import TASKS, Catalog, Prompt
from recranker_core.llm.score import UserScores, score_users


class Popularity:
    """Train-period popularity and mean ratings: a hint model that needs no training."""

    def __init__(self, data: SplitData) -> None:
        n = data.n_items
        self.counts = np.bincount(data.rating_items, minlength=n).astype(np.float64)
        sums = np.bincount(data.rating_items, weights=data.rating_values, minlength=n)
        self.means = np.where(self.counts > 0, sums / np.maximum(self.counts, 1), 3.0)

    def item_scores(self, user: int) -> npt.NDArray[np.floating]:
        return self.counts

    def predict_ratings(self, user: int, items: npt.NDArray[np.int64]) -> npt.NDArray[np.floating]:
        return self.means[items]


def build_entries(
    directory: Path, users: int, candidates: int, settings: PromptSettings
) -> list[tuple[int, list[int], list[Prompt]]]:
    files = generate(directory, users=200, items=1000, interactions=30_000, seed=0)
    rows = pd.read_csv(files.interactions, dtype={"user_id": str, "item_id": str})
    data = build_split(
        rows["user_id"].to_numpy(),
        rows["item_id"].to_numpy(),
        rows["rating"].to_numpy(dtype=float),
        rows["timestamp"].to_numpy(),
    )
    items = pd.read_csv(files.items, dtype={"item_id": str}).set_index("item_id")
    items = items.reindex(data.item_ids)
    catalog = Catalog(
        titles=items["title"].fillna("").tolist(),
        years=[None if pd.isna(y) else int(y) for y in items["year"]],
        genres=[g.split("|") if isinstance(g, str) else [] for g in items["genres"]],
        item_ids=list(data.item_ids),
    )
    hints = Popularity(data)
    per_user = np.bincount(data.rating_users, minlength=data.n_users)
    chosen = [int(u) for u in np.argsort(-per_user, kind="stable")[:users]]
    out = []
    for user in chosen:
        scores = hints.counts.copy()
        scores[data.seen(user, "test")] = -np.inf
        cands = [int(i) for i in np.argsort(-scores, kind="stable")[:candidates]]
        prompts = build_inference_prompts(data, catalog, hints, user, cands, "test", settings)
        out.append((user, cands, prompts))
    return out


def load(backbone: str, directory: Path) -> tuple[Any, Any, str]:
    if backbone == "tiny":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from recranker_core.llm.tiny import build_tiny_model

        path = build_tiny_model(directory / "tiny")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(path), "tiny random Llama, cpu/float32"
    from recranker_core.llm.backbone import load_backbone

    settings = load_settings()
    if backbone != "default":
        settings.backbone.path = backbone
    loaded = load_backbone(settings.backbone, settings.home)
    return (
        loaded.model,
        loaded.tokenizer,
        f"{loaded.backbone_id}, {loaded.device}/{loaded.dtype}",
    )


def timed(run: Any, device: Any) -> tuple[list[UserScores], float]:
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=5, help="Pairs per user (0: all).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--backbone", default="tiny", help="tiny, default, or a model path.")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: its own).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = PromptSettings(history_max=args.history, pairwise_pairs=args.pairs)
    with tempfile.TemporaryDirectory(prefix="recranker-bench-score-") as tmp:
        entries = build_entries(Path(tmp), args.users, args.candidates, settings)
        model, tokenizer, name = load(args.backbone, Path(tmp))
    device = next(model.parameters()).device

    def run(prefix_cache: bool, which: list[Any], tasks: Any = TASKS) -> list[UserScores]:
        return score_users(
            model,
            tokenizer,
            which,
            tasks=tasks,
            batch_size=args.batch_size,
            prefix_cache=prefix_cache,
        )

    # Warm-up (lazy imports, allocator, kernels) on one prompt: a full user costs minutes
    # uncached on a CPU.
    run(True, entries[:1], ("listwise",))
    run(False, entries[:1], ("listwise",))
    cached, cached_s = timed(lambda: run(True, entries), device)
    full, full_s = timed(lambda: run(False, entries), device)
    worst = max(
        float(np.nanmax(np.abs(getattr(c, t) - getattr(f, t))))
        for c, f in zip(cached, full, strict=True)
        for t in ("pointwise", "pairwise", "listwise")
    )
    n = len(entries)
    prompts = sum(s.prompts for s in cached) / n
    where = torch.cuda.get_device_name() if device.type == "cuda" else cpu_model()
    print(
        f"verbalizer scoring, {datetime.now(UTC):%Y-%m-%d}, {where}, "
        f"{torch.get_num_threads()} threads; {name}; {n} users x {args.candidates} candidates, "
        f"history {args.history}, {prompts:.0f} prompts/user, batch {args.batch_size}"
    )
    print("| scorer | users/s | s/user | prompt tokens/user |")
    print("|---|---:|---:|---:|")
    for label, result, seconds in (
        ("prefix-cached", cached, cached_s),
        ("full prompts (uncached)", full, full_s),
    ):
        tokens = sum(s.prompt_tokens for s in result) / n
        print(f"| {label} | {n / seconds:.2f} | {seconds / n:.3f} | {tokens:,.0f} |")
    print(f"cached / uncached throughput ratio: {full_s / cached_s:.2f}")
    print(f"largest score difference between the two: {worst:.2e}")


if __name__ == "__main__":
    main()
