"""Candidate generation: active users by window, and chunked top-N from an exported scorer that
never returns an excluded item."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psycopg
import torch

from recranker_core.base.candidates import active_users, generate_candidates
from recranker_core.base.onnx_export import OnnxScorer, export_topk


def test_active_users_window(clean_db: str):
    day = 86_400
    with psycopg.connect(clean_db) as conn:
        for user, ts in (
            ("old", 1_000_000_000),
            ("recent", 1_000_000_000 + 9 * day),
            ("future", 1_000_000_000 + 20 * day),
        ):
            conn.execute(
                "INSERT INTO recranker.interactions VALUES (%s, 'i', 4, to_timestamp(%s), 1)",
                (user, ts),
            )
        conn.commit()
    watermark = datetime.fromtimestamp(1_000_000_000 + 10 * day, UTC)
    assert active_users(clean_db, watermark, 3) == ["recent"]
    assert active_users(clean_db, watermark, None) == ["old", "recent"]


def test_chunks_cover_every_user_without_excluded_items(tmp_path: Path):
    class Dot(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(1)
            self.u = torch.nn.Parameter(torch.randn(30, 4, generator=g))
            self.i = torch.nn.Parameter(torch.randn(25, 4, generator=g))

        def forward(self, users: torch.Tensor) -> torch.Tensor:
            return self.u[users] @ self.i.T

    export_topk(Dot().eval(), 25, tmp_path / "m.onnx", k=5)
    scorer = OnnxScorer(tmp_path / "m.onnx")
    users = np.arange(30, dtype=np.int64)
    exclusions = [np.arange(u % 7) for u in range(30)]
    chunks = list(generate_candidates(scorer, users, exclusions, chunk_size=8))
    assert [c.users.size for c in chunks] == [8, 8, 8, 6]
    for chunk in chunks:
        assert chunk.items.shape == (chunk.users.size, 5)
        for row, user in enumerate(chunk.users):
            assert not set(exclusions[user].tolist()) & set(chunk.items[row].tolist())
            assert np.all(np.diff(chunk.scores[row]) <= 0)
