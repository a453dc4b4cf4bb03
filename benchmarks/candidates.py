"""Candidate scoring throughput: users/s of the exported ONNX top-N scorer against the same
model in torch eager, in the same run, and the achieved GFLOP/s of the score matmul against this
machine's measured matmul peak.

    python benchmarks/candidates.py [--large-users 200000 --large-items 50000] [--chunk 1024]

Two catalogues: MovieLens-100K's shape (943 users x 1,682 items) and a generated one (default
200,000 users x 50,000 items). The model is MF with 64-dimensional random embeddings: scoring
cost does not depend on the weights' values, so nothing is trained. Each user excludes 50
random items (MovieLens users rated 106 on average; the mask's cost is small next to the
matmul and the top-k). The matmul peak is a float32 GEMM of 2048^3 in torch on the same
threads; the scorer's FLOPs are 2 * users * items * dim (the top-k and the mask are not counted).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from base_models import cpu_model  # benchmarks/ is on sys.path when run as a script

from recranker_core.base.models import MF
from recranker_core.base.onnx_export import OnnxScorer, _topk_module, export_topk, pad_exclusions

DIM = 64
K = 10
EXCLUDED = 50


def matmul_peak(seconds: float = 3.0) -> float:
    """GFLOP/s of a float32 2048^3 GEMM, best of repeated runs for about `seconds`."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def timed(run: Callable[[int, int], None], n_users: int, chunk: int) -> float:
    """Seconds to score every user in chunks (after one warm-up chunk): the best of repeated
    passes over at least 2 s, so that a pass of a few milliseconds is not noise."""
    run(0, min(chunk, n_users))
    best, spent = float("inf"), 0.0
    while spent < 2.0 or best == float("inf"):
        start = time.perf_counter()
        for lo in range(0, n_users, chunk):
            run(lo, min(lo + chunk, n_users))
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return best


def bench(n_users: int, n_items: int, chunk: int, peak: float) -> dict[str, float]:
    torch.manual_seed(0)
    model = MF(n_users, n_items, DIM).eval()
    rng = np.random.default_rng(0)
    exclusions: list[npt.NDArray[np.int64]] = [
        rng.choice(n_items, size=min(EXCLUDED, n_items - K), replace=False) for _ in range(chunk)
    ]
    exclude = pad_exclusions(exclusions)  # the same exclusion rows reused for every chunk
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mf.onnx"
        export_topk(model.scoring_module(), n_items, path, k=K)
        scorer = OnnxScorer(path)
        eager = _topk_module(model.scoring_module(), n_items, K, False)

        def run_onnx(lo: int, hi: int) -> None:
            scorer.run(np.arange(lo, hi, dtype=np.int64), exclude[: hi - lo])

        def run_torch(lo: int, hi: int) -> None:
            with torch.inference_mode():
                eager(torch.arange(lo, hi), torch.from_numpy(exclude[: hi - lo]))

        onnx_s = timed(run_onnx, n_users, chunk)
        torch_s = timed(run_torch, n_users, chunk)
    flops = 2 * n_users * n_items * DIM
    return {
        "onnx_users_s": n_users / onnx_s,
        "torch_users_s": n_users / torch_s,
        "ratio": torch_s / onnx_s,
        "onnx_gflops": flops / onnx_s / 1e9,
        "share_of_peak": flops / onnx_s / 1e9 / peak,
        "onnx_s": onnx_s,
        "torch_s": torch_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large-users", type=int, default=200_000)
    parser.add_argument("--large-items", type=int, default=50_000)
    parser.add_argument("--chunk", type=int, default=1024, help="Users per scorer call.")
    args = parser.parse_args()

    peak = matmul_peak()
    print(
        f"candidate scoring, {datetime.now(UTC):%Y-%m-%d}, {cpu_model()}, "
        f"{torch.get_num_threads()} threads; float32 matmul peak {peak:.1f} GFLOP/s"
    )
    print(
        "| catalogue | ONNX users/s | torch eager users/s | ONNX / torch | ONNX GFLOP/s | "
        "share of peak |"
    )
    print("|---|---|---|---|---|---|")
    for n_users, n_items in ((943, 1682), (args.large_users, args.large_items)):
        r = bench(n_users, n_items, args.chunk, peak)
        print(
            f"| {n_users:,} x {n_items:,} | {r['onnx_users_s']:,.0f} | {r['torch_users_s']:,.0f} "
            f"| {r['ratio']:.2f} | {r['onnx_gflops']:.1f} | {r['share_of_peak']:.0%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
