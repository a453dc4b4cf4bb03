"""Typed parameters of every deployment (pydantic models with descriptions and defaults, so the
Prefect UI renders a form) and the thin entry flows that take them and run the stage flows."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field

from flows.batch_rank import batch_rank_flow
from flows.evaluate_ranker import evaluate_ranker_flow
from flows.experiment import experiment_objectives_flow
from flows.ingest import ingest_flow
from flows.retrain_base import retrain_base_flow
from flows.tune_ranker import tune_ranker_flow
from recranker_core.ingest import IngestResult

# Literals rather than free text so the UI offers a choice and a typo fails before the run
# starts; they mirror recranker_core (base.train.KINDS, evaluate_ranker.evaluate.TARGETS,
# RankSettings).
FileFormat = Literal["movielens", "csv", "parquet"]
BaseKind = Literal["mostpop", "mf", "lightgcn", "sasrec", "biasedmf"]
RankMode = Literal["fused", "hybrid", "pointwise", "pairwise", "listwise", "base"]
EvalTarget = Literal["valid", "test"]
TuneProfile = Literal["full", "cpu", "cpu-demo"]
TuneObjective = Literal["sft", "alro", "dmpo"]  # TuneSettings.objective


class StageParams(BaseModel):
    """Common configuration: an unknown field (a typo in prefect.yaml or an API call) is an
    error, not a silently ignored value."""

    model_config = ConfigDict(extra="forbid")


class IngestParams(StageParams):
    """Parameters of the `ingest` deployment."""

    source: str = Field(
        description="Interaction file, directory or s3://bucket/prefix. A file whose content was "
        "ingested before is skipped (the ledger is keyed by its sha256)."
    )
    format: FileFormat | None = Field(
        None, description="File format; empty: from each file's extension."
    )


class RetrainBaseParams(StageParams):
    """Parameters of the `retrain-base` deployment."""

    kinds: list[BaseKind] | None = Field(
        None, description="Base models to train; empty: RECRANKER_RETRAIN__KINDS."
    )
    watermark: datetime | None = Field(
        None,
        description="Split the interactions as of this instant; empty: the latest interaction.",
    )


class TuneRankerParams(StageParams):
    """Parameters of the `tune-ranker` deployment."""

    objective: TuneObjective | None = Field(
        None,
        description="Tuning objective: `sft`, `alro` (SFT + ALRO's listwise ranking losses) or "
        "`dmpo` (from the champion SFT adapter); empty: RECRANKER_TUNE__OBJECTIVE.",
    )
    profile: TuneProfile | None = Field(
        None,
        description="`full` (the settings as given), `cpu` (about an hour on 2 CPU cores) or "
        "`cpu-demo` (minutes on 2 CPU cores); empty: RECRANKER_TUNE__PROFILE.",
    )
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps; empty: no cap."
    )


class BatchRankParams(StageParams):
    """Parameters of the `batch-rank` deployment."""

    run_id: str | None = Field(
        None,
        description="Resume this unfinished run from its finished shards; empty: a new run.",
    )
    mode: RankMode | None = Field(
        None, description="How candidates are re-ranked; empty: RECRANKER_RANK__MODE."
    )
    publish: bool = Field(
        True,
        description="Publish the run (consumers of recommendations_current switch to it); off: "
        "write it and leave the current run.",
    )


class EvaluateRankerParams(StageParams):
    """Parameters of the `evaluate-ranker` deployment."""

    targets: list[EvalTarget] | None = Field(
        None, description="Splits to evaluate on; empty: validation and test."
    )
    max_users: int | None = Field(
        None,
        ge=1,
        description="Evaluate a seeded random subset of this many users; empty: "
        "RECRANKER_RANK__EVAL_MAX_USERS.",
    )


class ExperimentObjectivesParams(StageParams):
    """Parameters of the `experiment-objectives` deployment: SFT vs ALRO vs DMPO."""

    objectives: list[TuneObjective] | None = Field(
        None, description="Objectives to compare; empty: sft, alro and dmpo."
    )
    profile: TuneProfile | None = Field(
        None, description="Tuning profile of every run; empty: RECRANKER_TUNE__PROFILE."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Stop each tuning run after this many optimizer steps."
    )
    max_users: int | None = Field(
        None,
        ge=1,
        description="Evaluate a seeded random subset of this many users; empty: "
        "RECRANKER_RANK__EVAL_MAX_USERS.",
    )
    shuffles: int = Field(
        3, ge=1, description="Candidate orders per listwise prompt in the position-bias test."
    )
    bias_users: int = Field(
        100, ge=1, description="Test users whose listwise prompts are shuffled."
    )


class NightlyParams(StageParams):
    """Parameters of the `nightly` deployment: ingest -> retrain base -> batch rank -> evaluate."""

    source: str | None = Field(
        None,
        description="Interaction files to ingest (file, directory or s3://bucket/prefix); files "
        "ingested before are skipped. Empty: RECRANKER_NIGHTLY__SOURCE.",
    )
    format: FileFormat | None = Field(
        None, description="File format; empty: from each file's extension."
    )
    kinds: list[BaseKind] | None = Field(
        None, description="Base models to retrain; empty: RECRANKER_RETRAIN__KINDS."
    )
    mode: RankMode | None = Field(
        None, description="How candidates are re-ranked; empty: RECRANKER_RANK__MODE."
    )
    publish: bool = Field(
        True, description="Publish the new ranking run; off: write it and keep the current one."
    )
    evaluate: bool = Field(
        True,
        description="Evaluate the champion base model and adapter after ranking (skipped while "
        "no adapter has been tuned).",
    )
    eval_max_users: int | None = Field(
        None,
        ge=1,
        description="Evaluate a seeded random subset of this many users; empty: "
        "RECRANKER_RANK__EVAL_MAX_USERS.",
    )


# The entry flows carry the stage flow's name, so runs from the CLI, from the nightly chain and
# from a deployment are listed under one flow in the UI. They call `.fn` rather than the flow:
# a subflow here would show every manual run twice, nested in itself.


@flow(name="ingest", log_prints=True)
def ingest_entry(params: IngestParams) -> list[IngestResult]:
    """Ingest interaction files as validated batches (the `ingest` deployment).

    Args:
        params: Which files to ingest.
    """
    return ingest_flow.fn(params.source, params.format)


@flow(name="retrain-base")
def retrain_base_entry(params: RetrainBaseParams = RetrainBaseParams()) -> dict[str, object]:
    """Train the base models and promote the best if it passes (the `retrain-base` deployment).

    Args:
        params: Which models to train, as of when; empty fields take the settings.
    """
    return retrain_base_flow.fn(list(params.kinds) if params.kinds else None, params.watermark)


@flow(name="tune-ranker")
def tune_ranker_entry(params: TuneRankerParams = TuneRankerParams()) -> dict[str, Any]:
    """Tune, store, register and gate a ranker adapter (the `tune-ranker` deployment).

    Args:
        params: Objective, profile and step budget; empty fields take the settings.
    """
    return tune_ranker_flow.fn(params.objective, params.profile, params.max_steps)


@flow(name="batch-rank")
def batch_rank_entry(params: BatchRankParams = BatchRankParams()) -> dict[str, Any]:
    """Rank every active user and publish the run (the `batch-rank` deployment).

    Args:
        params: Run to resume, ranking mode, whether to publish.
    """
    return batch_rank_flow.fn(params.run_id, params.mode, params.publish)


@flow(name="evaluate-ranker")
def evaluate_ranker_entry(
    params: EvaluateRankerParams = EvaluateRankerParams(),
) -> dict[str, Any]:
    """The docs/METHOD.md evaluation table and HTML report (the `evaluate-ranker` deployment).

    Args:
        params: Splits and number of users; empty fields take the settings.
    """
    return evaluate_ranker_flow.fn(
        list(params.targets) if params.targets else None, params.max_users
    )


@flow(name="experiment-objectives")
def experiment_objectives_entry(
    params: ExperimentObjectivesParams = ExperimentObjectivesParams(),
) -> dict[str, Any]:
    """Tune and compare the objectives (the `experiment-objectives` deployment).

    Args:
        params: Objectives, budget and evaluation size; empty fields take the settings.
    """
    return experiment_objectives_flow.fn(
        list(params.objectives) if params.objectives else None,
        params.profile,
        params.max_steps,
        params.max_users,
        params.shuffles,
        params.bias_users,
    )
