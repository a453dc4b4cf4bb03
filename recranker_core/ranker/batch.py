"""Batch ranking of active users (docs/METHOD.md section 6, issue 5): what a run serves
(`plan_serving`: in mode `fused`, the champion adapter's stored guard decision), per shard of
users, candidates from the champion's ONNX scorer, prompts from each user's ratings up to the
watermark, LLM scores with the champion adapter, fused (or hybrid, single-task) re-ranking, and
the rows to publish. A user the LLM cannot score keeps the base ranking (source 'base')."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recranker_core import registry
from recranker_core.base.candidates import (
    ChampionScorer,
    UserHistory,
    champion_candidates,
    load_champion,
    read_histories,
)
from recranker_core.base.rating import RatingHints, RatingModel
from recranker_core.base.split import SplitData
from recranker_core.db.connect import connect, set_memory
from recranker_core.db.pool import Connections
from recranker_core.errors import ArtifactIntegrityError, ConfigError
from recranker_core.interrupts import check_stop
from recranker_core.ranker.fusion import FusedWeights, fused_utilities
from recranker_core.ranker.hybrid import MODES, TASK_MODES, Weights, rerank, utilities
from recranker_core.ranker.prompts import Catalog, build_inference_prompts
from recranker_core.ranker.publish import RecommendationRow

log = logging.getLogger(__name__)

# RECRANKER_RANK__MODE: `fused` (the default) serves what the adapter's guard decided.
SERVING_MODES = ("fused", *MODES)


@dataclass(frozen=True)
class ServingPlan:
    """What a batch-ranking run serves, decided once per run: whether shards load the LLM and,
    in mode `fused`, with which weights; `note` says it in one sentence (log, params,
    artifact)."""

    mode: str
    adapter: registry.AdapterRecord | None  # the champion adapter consulted (None: none)
    llm: bool  # shards load the backbone and re-rank with it
    fused: FusedWeights | None  # mode fused with the LLM: the weights served
    note: str
    fusion: dict[str, Any] | None = None  # mode fused: what the run records in its params

    @property
    def served(self) -> str:
        """'fused', 'base' or the ablation mode served."""
        if self.mode == "fused":
            return "fused" if self.llm else "base"
        return self.mode if self.llm else "base"


def served_weights(record: registry.AdapterRecord) -> FusedWeights | None:
    """The weights an adapter's stored guard decision serves; None when it serves the base
    order or no decision is stored."""
    decision = record.fusion
    return decision.weights if decision is not None and decision.served == "fused" else None


def plan_serving(
    mode: str, adapter: registry.AdapterRecord | None, override: list[float] | None = None
) -> ServingPlan:
    """What a run in `mode` serves with the champion `adapter`.

    Mode `fused` reads the adapter's stored guard decision (`metrics["fusion"]`): "base" (or
    none stored) serves the base order and spends no LLM time; "fused" re-ranks with its
    weights. `override` (RECRANKER_RANK__FUSED_WEIGHTS) replaces the stored weights and the
    guard. Weights with nothing on the LLM tasks serve the base order without the LLM too."""
    if mode not in SERVING_MODES:
        raise ConfigError(f"RECRANKER_RANK__MODE={mode!r}: use one of {', '.join(SERVING_MODES)}")
    if mode == "base":
        return ServingPlan(mode, None, False, None, "mode base: no LLM re-ranking in this run")
    if adapter is None:
        return ServingPlan(
            mode,
            None,
            False,
            None,
            f"mode {mode}: no champion adapter (none tuned yet, or every tuned one was "
            "rejected by its gate: `recranker adapters list` says why), every user gets the "
            "base ranking (source 'base')",
            {"served": "base", "source": "no adapter"} if mode == "fused" else None,
        )
    if mode != "fused":
        return ServingPlan(mode, adapter, True, None, f"mode {mode}: {adapter.label}")
    decision = adapter.fusion
    record: dict[str, Any] = {
        "adapter_id": adapter.adapter_id,
        "guard": decision.served if decision is not None else None,
    }
    if decision is not None:
        record.update({k: decision.as_json()[k] for k in ("gain", "se", "k", "n_users", "reason")})
    if override is not None:
        weights: FusedWeights | None = FusedWeights.from_list(override)
        record["source"] = "RECRANKER_RANK__FUSED_WEIGHTS"
        why = (
            "RECRANKER_RANK__FUSED_WEIGHTS overrides the stored decision ("
            + (f"whose guard served {decision.served}" if decision else "none stored")
            + ")"
        )
    elif decision is None:
        weights = None
        record["source"] = "none stored"
        why = (
            f"{adapter.label} has no stored guard decision (run `recranker tune-weights` to "
            "measure one)"
        )
    else:
        weights = decision.weights if decision.served == "fused" else None
        record["source"] = "stored"
        why = f"{adapter.label}'s guard: {decision.reason}"
    if weights is None or not weights.tasks:
        record.update({"served": "base", "weights": weights.as_list() if weights else None})
        note = f"mode fused: {why}; every user gets the base list (source 'base'), no LLM time"
        return ServingPlan(mode, adapter, False, None, note, record)
    record.update({"served": "fused", "weights": weights.as_list()})
    note = f"mode fused: {why}; re-ranking with weights {weights.label()}"
    return ServingPlan(mode, adapter, True, weights, note, record)


@dataclass
class Ranker:
    """The LLM with the champion adapter applied, and the rating model its pointwise hint reads
    (the one it was tuned with: `base.rating.adapter_rating_model`)."""

    model: Any
    tokenizer: Any
    adapter: registry.AdapterRecord
    rating: RatingModel
    backbone_id: str
    device: str

    def settings_for(self, settings: Any) -> Any:
        """`settings` with the prompt settings this adapter was tuned with (template, history
        length, pair scheme): its wording is the one it scores (`RECRANKER_PROMPTS__*` only
        choose those of new tuning)."""
        from recranker_core.ranker.tuning import adapter_prompt_settings

        prompts = adapter_prompt_settings(self.adapter, settings.prompts)
        if prompts is settings.prompts:
            return settings
        return settings.model_copy(update={"prompts": prompts})


def load_ranker(
    database_url: str, store: Any, settings: Any, record: registry.AdapterRecord | None = None
) -> Ranker | None:
    """`record` (default: the champion adapter) on the configured backbone (checksums, backbone
    and template verified), with the rating model it was tuned with (the champion base model's
    in the usual case; see `adapter_rating_model`); None when no adapter has been tuned yet (the
    run is then base-only)."""
    from peft import PeftModel

    from recranker_core.base.rating import adapter_rating_model
    from recranker_core.ranker.backbone import load_backbone
    from recranker_core.ranker.tuning import fetch_adapter

    record = record or registry.champion_adapter(database_url)
    if record is None:
        log.warning("no champion adapter: every user gets the base ranking (source 'base')")
        return None
    backbone = load_backbone(settings.backbone, settings.home)
    cache = settings.home / "cache" / "artifacts"
    directory = fetch_adapter(record, store, cache, backbone.backbone_hash)
    if not (directory / "adapter_model.safetensors").is_file():
        raise ArtifactIntegrityError(
            f"{record.label}: no adapter_model.safetensors in {directory}; only safetensors "
            "weights are loaded: tune a new adapter (`recranker tune`)"
        )
    rating = adapter_rating_model(record, directory, database_url, store, cache)
    model = PeftModel.from_pretrained(backbone.model, directory)
    model.eval()
    log.info(
        "ranker: %s on %s (%s, %s)",
        record.label,
        backbone.backbone_id,
        backbone.device,
        backbone.dtype,
    )
    tuned_dtype = record.lineage.get("dtype")
    if tuned_dtype and tuned_dtype != backbone.dtype:
        # bfloat16 moves a verbalizer log-probability by up to about 0.1 against float32: the
        # guard's decision and the fused weights were measured with the other one.
        log.warning(
            "%s was tuned and guarded in %s and is scored here in %s "
            "(RECRANKER_BACKBONE__DTYPE): its scores differ slightly from those its guard read",
            record.label,
            tuned_dtype,
            backbone.dtype,
        )
    if record.template_version != settings.prompts.template:
        log.info(
            "%s was tuned with prompt template %s: its prompts use it (RECRANKER_PROMPTS__"
            "TEMPLATE=%s applies to new tuning)",
            record.label,
            record.template_version,
            settings.prompts.template,
        )
    return Ranker(model, backbone.tokenizer, record, rating, backbone.backbone_id, backbone.device)


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
    from recranker_core.ranker.score import score_users

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


@dataclass
class ServingModels:
    """What a shard needs besides its users' data: the base model's scorer, the ranker (None for
    a base-only run) and the catalogue of item titles the prompts show."""

    champion: ChampionScorer
    ranker: Ranker | None
    catalog: Catalog | None


_SERVING_LOCK = threading.Lock()
_SERVING: dict[tuple[Any, ...], ServingModels] = {}


def serving_models(
    database_url: str, store: Any, settings: Any, model_id: int, adapter_id: int | None
) -> ServingModels:
    """Model `model_id`'s scorer and adapter `adapter_id` on the configured backbone, loaded once
    per process (threads share them; each Dask worker process loads its own copy, from S3, with
    every checksum verified). One set is kept: a run with other models replaces it."""
    key = (
        database_url,
        model_id,
        adapter_id,
        str(settings.home),
        settings.backbone.model_dump_json(),
    )
    with _SERVING_LOCK:
        found = _SERVING.get(key)
        if found is not None:
            return found
        _SERVING.clear()
        champion = load_champion(database_url, store, cache_root(settings), model_id)
        ranker = None
        catalog = None
        if adapter_id is not None:
            record = registry.get_adapter(database_url, adapter_id)
            ranker = load_ranker(database_url, store, settings, record)
            catalog = Catalog.from_database(database_url, champion.item_ids)
        _SERVING[key] = ServingModels(champion, ranker, catalog)
        return _SERVING[key]


def cache_root(settings: Any) -> Path:
    return Path(settings.home) / "cache" / "artifacts"
