"""Cost of one training epoch of the embedding base models (MF-BPR, BiasedMF) as the data doubles:
the gradient steps of one epoch at the default settings, with the sparse updates the trainer
uses (SparseAdam on the rows a batch reads) and, for comparison, dense gradients with dense Adam
(what the trainer did before), in the same run.

    python benchmarks/epoch_cost.py [--users 125000 --items 25000 --interactions 2500000]
                                    [--sizes 1,2] [--models mf,biasedmf]
                                    [--optimizers sparse,dense] [--rounds 2] [--threads 1]

Generated data (the `recranker data synth` generator, seed 1; users, items and interactions all
scaled by each size), split in memory by the protocol (no database). Times exclude sampling and
evaluation: `benchmarks/scale.py` times the whole train stage. Each epoch is reported as wall and
process CPU seconds; with one torch thread the CPU time is the work done, which other programs
on a shared machine barely change (the wall time they do). Sizes alternate within each round so
that a change of load hits every size alike; the growth is that of the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from base_models import cpu_model  # benchmarks/ is on sys.path when run as a script

from recranker_core.base.models import MF, BiasedMF
from recranker_core.base.split import SplitData, build_split
from recranker_core.base.train import adam_optimizers, gradient_step, sample_bpr_triples
from recranker_core.config import BaseTrainSettings, load_settings
from recranker_core.datasets.synthetic import generate


def generated_split(root: Path, users: int, items: int, interactions: int) -> SplitData:
    files = generate(
        root / f"{users}-{items}-{interactions}",
        users=users,
        items=items,
        interactions=interactions,
        seed=1,
        fmt="parquet",
    )
    frame = pd.read_parquet(files.interactions)
    return build_split(
        frame["user_id"].astype(str),
        frame["item_id"].astype(str),
        frame["rating"].astype(np.float32),
        frame["timestamp"].astype(np.float64),
    )


def epoch_seconds(
    kind: str, optimizer: str, data: SplitData, settings: BaseTrainSettings
) -> tuple[float, float]:
    """Wall and CPU seconds of one epoch's gradient steps of a fresh model."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    model: MF | BiasedMF
    if kind == "mf":
        model = MF(data.n_users, data.n_items, settings.embedding_dim)
        cfg = settings.mf
        columns = [torch.as_tensor(a) for a in sample_bpr_triples(data, rng)]
    else:
        model = BiasedMF(data.n_users, data.n_items, settings.embedding_dim)
        cfg = settings.biasedmf
        order = rng.permutation(data.rating_values.size)
        columns = [
            torch.as_tensor(data.rating_users[order].astype(np.int64)),
            torch.as_tensor(data.rating_items[order].astype(np.int64)),
            torch.as_tensor(data.rating_values[order].astype(np.float32)),
        ]
    if optimizer == "dense":
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                module.sparse = False
        optimizers: list[torch.optim.Optimizer] = [torch.optim.Adam(model.parameters(), cfg.lr)]
    else:
        optimizers = adam_optimizers(model, cfg.lr)

    wall, cpu = time.perf_counter(), time.process_time()
    for at in range(0, columns[0].shape[0], cfg.batch_size):
        batch = [c[at : at + cfg.batch_size] for c in columns]
        if isinstance(model, MF):
            loss = model.bpr_loss(*batch, cfg.l2)
        else:
            loss = model.mse_loss(*batch, cfg.l2)
        gradient_step(loss, optimizers)
        loss.item()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=125_000)
    parser.add_argument("--items", type=int, default=25_000)
    parser.add_argument("--interactions", type=int, default=2_500_000)
    parser.add_argument("--sizes", default="1,2", help="Multiples of the base size.")
    parser.add_argument("--models", default="mf,biasedmf")
    parser.add_argument("--optimizers", default="sparse,dense", help="sparse and/or dense.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    settings = load_settings()
    root = settings.home / "bench" / "epoch-cost"
    sizes = [int(s) for s in args.sizes.split(",")]
    data = {
        s: generated_split(root, args.users * s, args.items * s, args.interactions * s)
        for s in sizes
    }
    runs: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    for round_ in range(args.rounds):
        for kind in args.models.split(","):
            for optimizer in args.optimizers.split(","):
                for s in sizes:
                    seconds = epoch_seconds(kind, optimizer, data[s], settings.base)
                    runs.setdefault((kind, optimizer, s), []).append(seconds)
                    print(
                        f"round {round_ + 1}: {kind} {optimizer} {s}x: wall {seconds[0]:.1f} s, "
                        f"cpu {seconds[1]:.1f} s",
                        flush=True,
                    )

    print(
        f"\n{datetime.now(UTC):%Y-%m-%d}, {cpu_model()}, {torch.get_num_threads()} torch "
        f"thread(s), torch {torch.__version__}; "
        + "; ".join(
            f"{s}x: {d.n_users:,} users, {d.n_items:,} items, {d.train_indices.size:,} train "
            f"likes, {d.rating_values.size:,} train ratings"
            for s, d in data.items()
        )
    )
    print("\n| model | updates | " + " | ".join(f"{s}x cpu s (wall s)" for s in sizes), end="")
    print("".join(f" | {b}x / {a}x cpu" for a, b in zip(sizes, sizes[1:], strict=False)) + " |")
    print("|---|---|" + "---:|" * (2 * len(sizes) - 1))
    for (kind, optimizer), per_size in _by_model(runs, sizes).items():
        cpu = [statistics.median(c for _, c in per_size[s]) for s in sizes]
        wall = [statistics.median(w for w, _ in per_size[s]) for s in sizes]
        cells = [f"{c:.1f} ({w:.1f})" for c, w in zip(cpu, wall, strict=True)]
        cells += [f"{b / a:.2f}" for a, b in zip(cpu, cpu[1:], strict=False)]
        print(f"| {kind} | {optimizer} | " + " | ".join(cells) + " |")


def _by_model(
    runs: dict[tuple[str, str, int], list[tuple[float, float]]], sizes: list[int]
) -> dict[tuple[str, str], dict[int, list[tuple[float, float]]]]:
    out: dict[tuple[str, str], dict[int, list[tuple[float, float]]]] = {}
    for (kind, optimizer, s), seconds in runs.items():
        out.setdefault((kind, optimizer), {})[s] = seconds
    return out


if __name__ == "__main__":
    main()
