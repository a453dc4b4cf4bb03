"""Candidate generation: the champion's ONNX scorer ranks every item a user has not interacted
with and keeps the top N, for the active users, in chunks (the ranking stage consumes them)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import numpy.typing as npt

from recranker_core.base.onnx_export import OnnxScorer, pad_exclusions
from recranker_core.db.connect import connect

log = logging.getLogger(__name__)


def active_users(database_url: str, watermark: datetime, window_days: float | None) -> list[str]:
    """Users with at least one interaction in the window before the watermark (all users with
    an interaction up to the watermark when the window is unset), sorted."""
    with connect(database_url) as conn:
        if window_days is None:
            rows = conn.execute(
                "SELECT DISTINCT user_id FROM recranker.interactions WHERE event_ts <= %s",
                (watermark,),
            ).fetchall()
        else:
            rows = conn.execute(
                "SELECT DISTINCT user_id FROM recranker.interactions "
                "WHERE event_ts > %s AND event_ts <= %s",
                (watermark - timedelta(days=window_days), watermark),
            ).fetchall()
    return sorted(r[0] for r in rows)


@dataclass(frozen=True)
class CandidateChunk:
    users: npt.NDArray[np.int64]  # model user indices
    items: npt.NDArray[np.int64]  # [len(users), n] model item indices, best first
    scores: npt.NDArray[np.float32]


def generate_candidates(
    scorer: OnnxScorer,
    users: npt.NDArray[np.int64],
    exclusions: list[npt.NDArray[np.integer]],
    *,
    chunk_size: int = 4096,
    sequences: npt.NDArray[np.int64] | None = None,
) -> Iterator[CandidateChunk]:
    """Top-N items per user from the scorer, `exclusions[k]` removed for `users[k]`.

    Memory stays bounded by the chunk: scores for all items exist only inside ONNX Runtime for
    `chunk_size` users at a time.
    """
    if len(exclusions) != users.size:
        raise ValueError("one exclusion list per user is needed")
    for start in range(0, users.size, chunk_size):
        stop = start + chunk_size
        batch = users[start:stop]
        extra = () if sequences is None else (sequences[start:stop],)
        scores, items = scorer.run(batch, pad_exclusions(exclusions[start:stop]), *extra)
        yield CandidateChunk(batch, items, scores)
