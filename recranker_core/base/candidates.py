"""Candidate generation: the champion's ONNX scorer ranks every item a user has not interacted
with and keeps the top N, for the active users, in chunks (the ranking stage consumes them)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from recranker_core.base.onnx_export import OnnxScorer, pad_exclusions
from recranker_core.db.connect import connect, set_memory
from recranker_core.db.pool import Connections, connections_for
from recranker_core.errors import ArtifactIntegrityError, DataError
from recranker_core.store import ArtifactStore, fetch_registered

if TYPE_CHECKING:
    from recranker_core.registry import ModelRecord

log = logging.getLogger(__name__)


def active_users(
    database_url: str, watermark: datetime, window_days: float | None, work_mem: str = "256MB"
) -> list[str]:
    """Users with at least one interaction in the window before the watermark (all users with
    an interaction up to the watermark when the window is unset), sorted. `work_mem` holds the
    distinct users' hash table: with PostgreSQL's 4MB default it spills into hundreds of
    thousands of batches (3.5 minutes instead of 1 s for 500,000 users)."""
    with connect(database_url) as conn, conn.transaction():
        set_memory(conn, "work_mem", work_mem)
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


def data_watermark(database_url: str) -> datetime:
    """The latest event in the interactions: what "now" means for activity windows."""
    with connect(database_url) as conn:
        row = conn.execute("SELECT max(event_ts) FROM recranker.interactions").fetchone()
    if row is None or row[0] is None:
        raise DataError("recranker.interactions is empty: ingest data first (`recranker ingest`)")
    watermark: datetime = row[0]
    return watermark


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


@dataclass
class ChampionScorer:
    """The champion base model's exported scorer with its id maps, fetched and verified."""

    model_id: int
    kind: str
    directory: Path
    scorer: OnnxScorer
    user_index: dict[str, int]
    item_ids: list[str]
    sequence_len: int | None

    @property
    def k(self) -> int:
        dim = self.scorer.session.get_outputs()[0].shape[-1]
        return int(dim) if isinstance(dim, int) else -1

    @functools.cached_property
    def item_index(self) -> dict[str, int]:
        """Item id -> the model's item index, built once per loaded champion: every shard of a
        run reuses it (built twice per shard before: about 8 ms each at 100,000 items)."""
        return {item: n for n, item in enumerate(self.item_ids)}


def fetch_model(record: ModelRecord, store: ArtifactStore, cache_root: Path) -> Path:
    """The model's local copy, every file checked against the digests of its registry row (the
    manifest stored beside the files is not trusted on its own)."""
    prefix = record.lineage.get("prefix")
    if not prefix:
        raise DataError(f"model {record.model_id} has no artifact prefix in its lineage")
    return fetch_registered(
        store,
        prefix,
        cache_root,
        record.files,
        f"model {record.label} in recranker.models",
        remedy="train it again (`recranker train-base`)",
    )


def load_champion(
    database_url: str, store: ArtifactStore, cache_root: Path, model_id: int | None = None
) -> ChampionScorer:
    """The champion's (or model `model_id`'s) ONNX scorer from the store (every file checked
    against the registry's digests on fetch and on every cached reuse). No champion ->
    DataError saying how to get one."""
    import json

    from recranker_core import registry

    record = registry.champion(database_url) if model_id is None else None
    if model_id is not None:
        record = registry.get_model(database_url, model_id)
    if record is None:
        raise DataError("no champion base model: run `recranker train-base` first")
    directory = fetch_model(record, store, cache_root)
    user_ids = json.loads((directory / "user_ids.json").read_text())
    item_ids = json.loads((directory / "item_ids.json").read_text())
    scorer = OnnxScorer(directory / "model.onnx")
    sequence_len = None
    if len(scorer.input_names) > 2:
        width = scorer.session.get_inputs()[2].shape[1]
        sequence_len = int(width) if isinstance(width, int) else None
        if sequence_len is None:
            raise ArtifactIntegrityError(
                f"{directory}/model.onnx: sequence input has no fixed width"
            )
    log.info(
        "champion model %d (%s): %d users, %d items, scorer on %s",
        record.model_id,
        record.kind,
        len(user_ids),
        len(item_ids),
        scorer.provider,
    )
    return ChampionScorer(
        record.model_id,
        record.kind,
        directory,
        scorer,
        {u: n for n, u in enumerate(user_ids)},
        item_ids,
        sequence_len,
    )


@dataclass(frozen=True)
class UserCandidates:
    user_id: str
    items: list[str]  # external item ids, best first
    scores: list[float]


@dataclass
class CandidateStats:
    users: int = 0
    scored: int = 0
    cold: int = 0  # users the champion has never seen: no embedding, nothing to score
    chunks: int = 0
    cold_users: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class UserHistory:
    """A user's interactions up to the watermark, in time order (ties by item id)."""

    items: list[str]
    ratings: list[float]


def read_histories(
    db: str | Connections, users: list[str], watermark: datetime
) -> dict[str, UserHistory]:
    """Every interaction of `users` up to the watermark, in one query: a ranking shard's
    candidates (exclusions, like sequences), prompts and cold users' lists all read these
    (three reads of the same rows before). A user with none maps to an empty history."""
    items: dict[str, list[str]] = {u: [] for u in users}
    ratings: dict[str, list[float]] = {u: [] for u in users}
    with connections_for(db).connection() as conn:
        rows = conn.execute(
            "SELECT user_id, item_id, rating FROM recranker.interactions "
            "WHERE user_id = ANY(%s) AND event_ts <= %s ORDER BY user_id, event_ts, item_id",
            (users, watermark),
        )
        for user, item, rating in rows:
            items[user].append(item)
            # An implicit interaction (no rating) is never a like: NaN compares false.
            ratings[user].append(float("nan") if rating is None else float(rating))
    return {u: UserHistory(items[u], ratings[u]) for u in users}


def champion_candidates(
    db: str | Connections,
    champion: ChampionScorer,
    user_ids: list[str],
    watermark: datetime,
    *,
    chunk_size: int = 4096,
    stats: CandidateStats | None = None,
    like_threshold: float = 4.0,
    histories: dict[str, UserHistory] | None = None,
) -> Iterator[list[UserCandidates]]:
    """Top-N candidates of `user_ids` from the champion, one list per chunk of users.

    Each chunk reads its users' interactions up to the watermark itself (exclusions, and the
    like sequence for sequence models), so memory is bounded by the chunk, unless the caller
    read them already (`histories`: a ranking shard reads its users' once). Every item a user
    interacted with is excluded. Users unknown to the champion are counted as cold and skipped.
    """
    stats = stats if stats is not None else CandidateStats()
    item_index = champion.item_index
    for start in range(0, len(user_ids), chunk_size):
        chunk = user_ids[start : start + chunk_size]
        stats.users += len(chunk)
        known = [u for u in chunk if u in champion.user_index]
        cold = [u for u in chunk if u not in champion.user_index]
        stats.cold += len(cold)
        stats.cold_users.extend(cold[: max(0, 100 - len(stats.cold_users))])
        if not known:
            continue
        read = histories if histories is not None else read_histories(db, known, watermark)
        seen, likes = _user_items({u: read[u] for u in known}, item_index, like_threshold)
        users = np.array([champion.user_index[u] for u in known], dtype=np.int64)
        extra: tuple[npt.NDArray[np.int64], ...] = ()
        if champion.sequence_len is not None:
            from recranker_core.base.models import pad_sequences

            extra = (pad_sequences([likes[u] for u in known], champion.sequence_len),)
        scores, items = champion.scorer.run(users, pad_exclusions([seen[u] for u in known]), *extra)
        stats.scored += len(known)
        stats.chunks += 1
        yield [
            UserCandidates(
                user,
                [
                    champion.item_ids[i]
                    for i, s in zip(items[row], scores[row], strict=True)
                    if np.isfinite(s)
                ],
                [float(s) for s in scores[row] if np.isfinite(s)],
            )
            for row, user in enumerate(known)
        ]


def _user_items(
    histories: dict[str, UserHistory], item_index: dict[str, int], like_threshold: float
) -> tuple[dict[str, npt.NDArray[np.int32]], dict[str, npt.NDArray[np.int32]]]:
    """Per user: every item interacted with up to the watermark (model indices), and the liked
    ones in time order (ties by item id) for sequence models. Items the model does not know are
    dropped: it can neither recommend nor read them."""
    seen: dict[str, npt.NDArray[np.int32]] = {}
    likes: dict[str, npt.NDArray[np.int32]] = {}
    for user, history in histories.items():
        known = [
            (index, rating)
            for item, rating in zip(history.items, history.ratings, strict=True)
            if (index := item_index.get(item)) is not None
        ]
        seen[user] = np.unique(np.array([i for i, _ in known], dtype=np.int32))
        likes[user] = np.array([i for i, r in known if r >= like_threshold], dtype=np.int32)
    return seen, likes
