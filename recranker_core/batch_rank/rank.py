"""Batch ranking of one shard of active users (docs/METHOD.md section 6, issue 5): candidates from
the champion's ONNX scorer, prompts from each user's ratings up to the watermark, LLM scores with
the champion adapter, fused (or hybrid, single-task) re-ranking, and the rows to publish. A user
the LLM cannot score keeps the base ranking (source 'base')."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from recranker_core.base.candidates import (
    ChampionScorer,
    UserHistory,
    champion_candidates,
    read_histories,
)
from recranker_core.base.rating import RatingHints
from recranker_core.base.split import SplitData
from recranker_core.batch_rank.fusion import FusedWeights, fused_utilities
from recranker_core.batch_rank.hybrid import TASK_MODES, Weights, rerank, utilities
from recranker_core.batch_rank.publish import RecommendationRow
from recranker_core.batch_rank.serving import SERVING_MODES, Ranker, served_weights
from recranker_core.db.connect import connect, set_memory
from recranker_core.db.pool import Connections
from recranker_core.errors import ConfigError
from recranker_core.interrupts import check_stop
from recranker_core.llm.builders import build_inference_prompts
from recranker_core.llm.prompts import Catalog

log = logging.getLogger(__name__)


def serving_split(
    histories: dict[str, UserHistory],
    user_ids: list[str],
    watermark: datetime,
    item_ids: list[str],
    like_threshold: float,
    item_index: dict[str, int] | None = None,
) -> SplitData:
    """The users' ratings up to the watermark (`histories`, from `read_histories`) as a
    SplitData with nothing held out, indexed by `user_ids` and the champion's `item_ids`
    (`item_index`: their positions, when the caller holds them already): at serving time the
    whole history is "train"."""
    if item_index is None:
        item_index = {item: n for n, item in enumerate(item_ids)}
    us: list[int] = []
    its: list[int] = []
    vals: list[float] = []
    for n, user in enumerate(user_ids):
        history = histories[user]
        for item, rating in zip(history.items, history.ratings, strict=True):
            index = item_index.get(item)
            if index is not None:
                us.append(n)
                its.append(index)
                vals.append(rating)
    u = np.array(us, dtype=np.int32)
    i = np.array(its, dtype=np.int32)
    v = np.array(vals, dtype=np.float32)
    n_users = len(user_ids)
    like = v >= like_threshold

    def csr(mask: npt.NDArray[np.bool_], unique: bool) -> tuple[Any, Any, list[Any]]:
        uu, ii = u[mask], i[mask]
        counts = np.bincount(uu, minlength=n_users)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        per_user = [ii[indptr[k] : indptr[k + 1]] for k in range(n_users)]
        if unique:
            per_user = [np.unique(x) for x in per_user]
            counts = np.array([x.size for x in per_user])
            indptr = np.zeros(n_users + 1, dtype=np.int64)
            np.cumsum(counts, out=indptr[1:])
        flat = np.concatenate(per_user).astype(np.int32) if per_user else np.empty(0, np.int32)
        return indptr, flat, per_user

    like_ptr, like_idx, _ = csr(like, unique=True)
    _, _, sequences = csr(like, unique=False)
    seen_ptr, seen_idx, _ = csr(np.ones_like(like), unique=True)
    none = np.full(n_users, -1, dtype=np.int32)
    return SplitData(
        user_ids=list(user_ids),
        item_ids=list(item_ids),
        train_indptr=like_ptr,
        train_indices=like_idx,
        train_sequences=[s.astype(np.int32) for s in sequences],
        rating_users=u,
        rating_items=i,
        rating_values=v,
        valid_item=none,
        test_item=none.copy(),
        seen_valid_indptr=seen_ptr,
        seen_valid_indices=seen_idx,
        seen_test_indptr=seen_ptr,
        seen_test_indices=seen_idx,
        watermark=watermark,
        like_threshold=like_threshold,
    )


class ServingHints:
    """Hints at serving time: the champion's candidate scores (its order of the candidates) and
    the ranker's rating model (global mean for a user or item it never saw)."""

    def __init__(
        self, data: SplitData, ranker: Ranker, candidate_scores: dict[int, dict[int, float]]
    ) -> None:
        self.data = data
        self.ranker = ranker
        self.candidate_scores = candidate_scores
        self.ratings = RatingHints(ranker.rating, data)

    def item_scores(self, user: int) -> npt.NDArray[np.floating]:
        scores = np.full(self.data.n_items, -np.inf)
        for item, s in self.candidate_scores.get(user, {}).items():
            scores[item] = s
        return scores

    def predict_ratings(self, user: int, items: npt.NDArray[np.int64]) -> npt.NDArray[np.floating]:
        return self.ratings.predict_ratings(user, items)


@dataclass
class ShardResult:
    rows: list[RecommendationRow]
    users: int = 0
    llm_users: int = 0
    base_users: int = 0
    cold_users: int = 0
    llm_failures: int = 0  # users the LLM could not score (they keep the base ranking)
    llm_retries: int = 0  # groups that failed together and were scored user by user
    prompt_tokens: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def rank_shard(
    db: str | Connections,
    champion: ChampionScorer,
    ranker: Ranker | None,
    catalog: Catalog | None,
    user_ids: list[str],
    watermark: datetime,
    settings: Any,
    *,
    llm_users: set[str] | None = None,
    popular: list[str] | None = None,
    fused: FusedWeights | None = None,
) -> ShardResult:
    """Rows of one shard: every user with candidates gets `settings.rank.k` rows; users in
    `llm_users` (all when None) are re-ranked by the LLM when a ranker is given. In mode
    `fused` the utilities are `fused_utilities` with `fused` (default: the weights the ranker's
    adapter's stored decision serves; none: the base order, without the LLM). Users the
    champion has never seen (cold: no embedding, no candidates) get the most `popular` items
    they have not interacted with, as base rows.

    The shard's users' interactions are read once (one query, on a connection from `db`: a
    URL opens a fresh one, a worker passes its pool) and serve the candidates, the prompts and
    the cold users' lists."""
    from recranker_core.llm.score import score_users

    rank = settings.rank
    if rank.mode not in SERVING_MODES:
        raise ConfigError(
            f"RECRANKER_RANK__MODE={rank.mode!r}: use one of {', '.join(SERVING_MODES)}"
        )
    weights = Weights(*rank.weights)
    if rank.mode == "fused" and fused is None and ranker is not None:
        fused = served_weights(ranker.adapter)
    use_llm = ranker is not None and rank.mode != "base"
    if rank.mode == "fused":
        use_llm = use_llm and fused is not None and bool(fused.tasks)
    t0 = time.perf_counter()
    histories = read_histories(db, user_ids, watermark)
    candidates = [
        c
        for chunk in champion_candidates(
            db,
            champion,
            user_ids,
            watermark,
            chunk_size=max(1, min(len(user_ids), settings.rank.chunk_size)),
            like_threshold=settings.retrain.like_threshold,
            histories=histories,
        )
        for c in chunk
    ]
    result = ShardResult([], users=len(user_ids), cold_users=len(user_ids) - len(candidates))
    result.seconds["candidates"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    to_score = [c for c in candidates if use_llm and (llm_users is None or c.user_id in llm_users)]
    reranked: dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]] = {}
    if to_score and ranker is not None and catalog is not None:
        data = serving_split(
            histories,
            [c.user_id for c in to_score],
            watermark,
            champion.item_ids,
            settings.retrain.like_threshold,
            champion.item_index,
        )
        cand_idx = [[champion.item_index[i] for i in c.items] for c in to_score]
        hints = ServingHints(
            data,
            ranker,
            {
                u: dict(zip(idx, c.scores, strict=True))
                for u, (idx, c) in enumerate(zip(cand_idx, to_score, strict=True))
            },
        )
        if fused is not None and rank.mode == "fused":
            tasks: tuple[str, ...] = fused.tasks  # a task weighted 0 is not worth its prompts
        else:
            tasks = TASK_MODES if rank.mode == "hybrid" else (rank.mode,)
        prompt_settings = ranker.settings_for(settings).prompts

        def score(group: list[int]) -> list[Any]:
            work = [
                (
                    u,
                    cand_idx[u],
                    build_inference_prompts(
                        data, catalog, hints, u, cand_idx[u], "valid", prompt_settings
                    ),
                )
                for u in group
            ]
            # A single-task mode reads only that task's prompts.
            return score_users(
                ranker.model, ranker.tokenizer, work, batch_size=rank.score_batch_size, tasks=tasks
            )

        step = max(1, rank.users_per_batch)
        pending = [
            list(range(lo, min(lo + step, len(to_score)))) for lo in range(0, len(to_score), step)
        ]
        while pending:
            check_stop()  # shards run outside the main thread, which alone gets the signal
            group = pending.pop(0)
            try:
                scored = score(group)
            except Exception as exc:  # one bad group must not sink the shard
                if len(group) > 1:
                    # Out of memory on a batch of long prompts, or one user's prompts: each
                    # user alone, so only a user who cannot be scored falls back.
                    log.warning(
                        "LLM scoring failed for a group of %d users (%s: %s); scoring them one "
                        "at a time",
                        len(group),
                        type(exc).__name__,
                        exc,
                    )
                    result.llm_retries += 1
                    pending[:0] = [[u] for u in group]
                    continue
                log.warning(
                    "LLM scoring failed for user %s (%s: %s); the user keeps the base ranking",
                    to_score[group[0]].user_id,
                    type(exc).__name__,
                    exc,
                )
                result.llm_failures += 1
                continue
            for s in scored:
                if fused is not None and rank.mode == "fused":
                    base_scores = np.asarray(to_score[s.user].scores, dtype=np.float64)
                    util = fused_utilities(base_scores, s.pointwise, s.pairwise, s.listwise, fused)
                else:
                    util = utilities(
                        s.pointwise, s.pairwise, s.listwise, Weights.for_mode(rank.mode, weights)
                    )
                order = rerank(util)  # stable: ties keep the base rank
                reranked[to_score[s.user].user_id] = (order, util)
                result.prompt_tokens += s.prompt_tokens
    result.seconds["llm"] = time.perf_counter() - t1
    for c in candidates:
        k = min(rank.k, len(c.items))
        if c.user_id in reranked:
            order, util = reranked[c.user_id]
            result.llm_users += 1
            for r, pos in enumerate(order[:k].tolist()):
                result.rows.append(
                    RecommendationRow(
                        c.user_id, r + 1, c.items[pos], float(util[pos]), pos + 1, "llm"
                    )
                )
        else:
            result.base_users += 1
            for r in range(k):
                result.rows.append(
                    RecommendationRow(
                        c.user_id, r + 1, c.items[r], float(c.scores[r]), r + 1, "base"
                    )
                )
    if popular:
        served = {c.user_id for c in candidates}
        cold = [u for u in user_ids if u not in served]
        if cold:
            for user in cold:
                interacted = set(histories[user].items)
                picks = [i for i in popular if i not in interacted][: rank.k]
                for r, item in enumerate(picks):
                    result.rows.append(
                        RecommendationRow(user, r + 1, item, float(-r), r + 1, "base")
                    )
    return result


def popular_items(database_url: str, watermark: datetime, limit: int = 1000) -> list[str]:
    """The most interacted-with items up to the watermark (ties by id): cold users' list."""
    with connect(database_url) as conn:
        rows = conn.execute(
            "SELECT item_id FROM recranker.interactions WHERE event_ts <= %s "
            "GROUP BY item_id ORDER BY count(*) DESC, item_id LIMIT %s",
            (watermark, limit),
        ).fetchall()
    return [r[0] for r in rows]


def most_active_users(
    database_url: str,
    user_ids: list[str],
    watermark: datetime,
    limit: int,
    work_mem: str = "256MB",
) -> set[str]:
    """The `limit` users with the most interactions up to the watermark (ties by id); `work_mem`
    as in `active_users`."""
    if limit <= 0:
        return set()
    with connect(database_url) as conn, conn.transaction():
        set_memory(conn, "work_mem", work_mem)
        rows = conn.execute(
            "SELECT user_id FROM recranker.interactions WHERE user_id = ANY(%s) "
            "AND event_ts <= %s GROUP BY user_id ORDER BY count(*) DESC, user_id LIMIT %s",
            (user_ids, watermark, limit),
        ).fetchall()
    return {r[0] for r in rows}


def shards_of(user_ids: list[str], shard_size: int) -> list[list[str]]:
    return [user_ids[lo : lo + shard_size] for lo in range(0, len(user_ids), shard_size)]
