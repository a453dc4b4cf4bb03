"""ONNX export of a scoring module: masking and TopK in the graph, dynamic batch and exclusion
width, parity with torch, and a refused export when parity fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recranker_core.base.onnx_export import OnnxScorer, export_topk, pad_exclusions


class DotScorer(torch.nn.Module):
    def __init__(self, n_users: int, n_items: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.users = torch.nn.Parameter(torch.randn(n_users, 8, generator=g))
        self.items = torch.nn.Parameter(torch.randn(n_items, 8, generator=g))

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return self.users[users] @ self.items.T


def test_topk_with_exclusions_matches_numpy(tmp_path: Path):
    model = DotScorer(20, 50).eval()
    users = np.arange(20, dtype=np.int64)
    exclude = pad_exclusions([np.arange(u % 5) for u in range(20)])
    report = export_topk(
        model, 50, tmp_path / "m.onnx", k=7, parity_users=users, parity_exclude=exclude
    )
    assert report.parity_max_abs_diff < 1e-4
    scorer = OnnxScorer(tmp_path / "m.onnx")
    assert scorer.provider == "CPUExecutionProvider"
    # Another batch size and exclusion width than at export time.
    batch = np.array([3, 7, 11], dtype=np.int64)
    excl = pad_exclusions([np.array([0, 1, 2, 40, 41, 42, 43, 44]), np.array([]), np.array([5])])
    scores, items = scorer.run(batch, excl)
    full = (model.users[torch.from_numpy(batch)] @ model.items.T).detach().numpy()
    for row, banned in enumerate([{0, 1, 2, 40, 41, 42, 43, 44}, set(), {5}]):
        expected = [i for i in np.argsort(-full[row], kind="stable") if i not in banned][:7]
        assert set(items[row].tolist()) == set(expected)
        assert not banned & set(items[row].tolist())
        np.testing.assert_allclose(scores[row], full[row][items[row]], rtol=0, atol=1e-5)


def test_parity_failure_refuses_export(tmp_path: Path):
    from recranker_core.errors import ArtifactIntegrityError

    class Drifting(DotScorer):
        def forward(self, users: torch.Tensor) -> torch.Tensor:
            out = super().forward(users)
            # Behaves differently in eager mode than in the traced graph.
            return out + (
                1.0 if not torch.compiler.is_compiling() and not torch.jit.is_tracing() else 0.0
            )

    with pytest.raises(ArtifactIntegrityError, match="differ from torch"):
        export_topk(
            Drifting(5, 10).eval(),
            10,
            tmp_path / "d.onnx",
            k=3,
            parity_users=np.arange(5, dtype=np.int64),
            tolerance=1e-6,
        )
