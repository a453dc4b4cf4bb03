"""Base models on MovieLens-100K with the protocol's split (temporal leave-one-out on likes, full
ranking, pessimistic ties): validation and test HR/NDCG@3/5/10, best epoch and training time of
each model, with the default settings (RECRANKER_BASE__* overrides them).

    python benchmarks/base_models.py [--models mostpop,mf,lightgcn,sasrec,biasedmf]

Anchor (RecBole 1.2.1, same file and protocol, docs/METHOD.md section 7): BPR test NDCG@10
0.051 / HR@10 0.106, LightGCN 0.041 / 0.085. BiasedMF is a rating regressor: its line adds the
RMSE on the held-out train-period ratings (its ranking figures are only for completeness).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from recranker_core.base.split import SplitData, build_split
from recranker_core.base.train import KINDS, TrainResult, train_model
from recranker_core.config import load_settings
from recranker_core.datasets.movielens import fetch_movielens_100k

METRICS = ("hr@3", "hr@5", "hr@10", "ndcg@3", "ndcg@5", "ndcg@10")


def movielens_split(home: os.PathLike[str] | str) -> SplitData:
    """The protocol's split of ml-100k.inter (RecBole atomic file: tab-separated, `name:type`
    header)."""
    from pathlib import Path

    files = fetch_movielens_100k(Path(home))
    frame = pd.read_csv(files.inter, sep="\t", dtype=str, keep_default_na=False)
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return build_split(
        frame["user_id"],
        frame["item_id"],
        frame["rating"].astype(np.float32),
        frame["timestamp"].astype(np.float64),
    )


def cpu_model() -> str:
    """The CPU's model name (platform.processor() is empty on most Linux systems)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(results: list[TrainResult]) -> str:
    head = ["model", *(f"valid {m}" for m in METRICS), *(f"test {m}" for m in METRICS)]
    head += ["best epoch", "train s", "valid RMSE"]
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in results:
        cells = [r.kind]
        cells += [f"{r.metrics['valid'][m]:.4f}" for m in METRICS]
        cells += [f"{r.metrics['test'][m]:.4f}" for m in METRICS]
        rmse = r.metrics["valid"].get("rmse")
        cells += [str(r.best_epoch), f"{r.seconds:.1f}", f"{rmse:.4f}" if rmse else ""]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default=",".join(KINDS),
        help=f"comma-separated models to train (default: all of {','.join(KINDS)})",
    )
    parser.add_argument("--verbose", action="store_true", help="log every evaluation")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose among {', '.join(KINDS)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )

    import torch

    settings = load_settings()
    data = movielens_split(settings.home)
    started = datetime.now(UTC)
    results = []
    for kind in kinds:
        result = train_model(kind, data, settings.base)
        print(f"{kind}: done in {result.seconds:.1f} s", flush=True)
        results.append(result)

    print()
    print(
        f"MovieLens-100K ({data.stats['users']} users, {data.stats['items']} items, "
        f"{data.stats['evaluable_users']} evaluable, {data.stats['train_likes']} train likes); "
        f"{started:%Y-%m-%d %H:%M} UTC; {platform.platform()}, {cpu_model()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print()
    print(table(results))
    print()
    print(f"settings: {settings.base.model_dump_json()}")


if __name__ == "__main__":
    main()
