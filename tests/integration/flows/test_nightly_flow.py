"""The nightly chain under Prefect's test harness: of a directory holding one new and one already
ingested file, the new one is merged and the old one skipped; the base model is retrained, every
active user ranked and the run published, the ranker evaluated; each stage is a subflow run of
its own and a summary artifact is written. A failed stage stops the chain with a state message
naming it, and the previously published run stays current."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, get_args
from uuid import UUID

import psycopg
import pytest

STAGES = ["ingest", "retrain-base", "batch-rank", "evaluate-ranker"]


def _published(url: str) -> tuple[str | None, set[str]]:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT run_id FROM recranker.published").fetchone()
        runs = {r[0] for r in conn.execute("SELECT run_id FROM recranker.recommendations_current")}
    return (row[0] if row else None), runs


def _count(url: str, table: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(f"SELECT count(*) FROM recranker.{table}").fetchone()
    assert row is not None
    return int(row[0])


def _summary_artifact(flow_run_id: UUID) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["nightly-summary"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
    assert len(found) == 1, found
    return str(found[0].data)


def _stage_runs(nightly_run: UUID, stages: list[dict[str, Any]]) -> dict[str, str]:
    """Flow name of each stage's run, checked to be a child of the nightly run."""
    from prefect.client.orchestration import get_client

    names = {}
    with get_client(sync_client=True) as client:
        for stage in stages:
            if stage["flow_run_id"] is None:
                continue
            run = client.read_flow_run(UUID(stage["flow_run_id"]))
            assert run.parent_task_run_id is not None, stage
            assert client.read_task_run(run.parent_task_run_id).flow_run_id == nightly_run
            names[stage["stage"]] = client.read_flow(run.flow_id).name
    return names


def test_nightly_ingests_new_files_ranks_publishes_and_evaluates(
    tiny_pipeline: dict[str, Any], tmp_path: Path, prefect_api: str, monkeypatch
):
    from flows.nightly import nightly_flow
    from flows.params import NightlyParams, TuneRankerParams, tune_ranker_entry
    from recranker_core.datasets.synthetic import generate

    url = str(tiny_pipeline["database_url"])
    old = tiny_pipeline["files"]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(old.interactions, inbox / "a-old.csv")  # ingested by the fixture already
    shutil.copy(old.items, inbox / "items.csv")
    shutil.copy(old.users, inbox / "users.csv")
    new = generate(tmp_path / "new", users=120, items=100, interactions=600, seed=6)
    shutil.copy(new.interactions, inbox / "b-new.csv")
    monkeypatch.setenv("RECRANKER_NIGHTLY__SOURCE", str(inbox))
    monkeypatch.setenv("RECRANKER_RANK__LLM_MAX_USERS", "10")
    # An adapter, so that the evaluation stage has one to read (through the deployment's entry).
    assert tune_ranker_entry(TuneRankerParams(max_steps=2))["promoted"]
    interactions_before = _count(url, "interactions")

    state = nightly_flow(NightlyParams(kinds=["mf"], eval_max_users=20), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    nightly_run = state.state_details.flow_run_id
    assert nightly_run is not None
    stages = result["stages"]
    assert [s["stage"] for s in stages] == STAGES
    assert {s["status"] for s in stages} == {"completed"}
    assert _stage_runs(nightly_run, stages) == {s: s for s in STAGES}

    files = {f["file"]: f for f in stages[0]["details"]["files"]}
    assert set(files) == {"a-old.csv", "b-new.csv"}
    assert files["a-old.csv"]["status"] == "already_ingested" and files["a-old.csv"]["merged"] == 0
    assert files["b-new.csv"]["status"] == "merged" and files["b-new.csv"]["merged"] > 0
    assert _count(url, "interactions") == interactions_before + files["b-new.csv"]["merged"]

    ranked = stages[2]["details"]
    assert ranked["status"] == "published" and ranked["rows"] > 0
    assert _published(url) == (ranked["run_id"], {ranked["run_id"]})
    report = Path(stages[3]["details"]["report"])
    assert report.is_file()

    markdown = _summary_artifact(nightly_run)
    assert "completed" in markdown.splitlines()[0]
    merged = f"{files['b-new.csv']['merged']:,} rows merged"
    for needle in (ranked["run_id"], "b-new.csv", "already_ingested", merged, str(report)):
        assert needle in markdown, needle
    for stage in stages:
        assert stage["flow_run_id"] in markdown


def test_failed_stage_stops_the_chain_and_keeps_the_published_run(
    tiny_pipeline: dict[str, Any], tmp_path: Path, prefect_api: str
):
    from flows.nightly import nightly_flow
    from flows.params import BatchRankParams, NightlyParams, batch_rank_entry
    from recranker_core.batch_rank.runs import batch_rank_lock
    from recranker_core.errors import StageFailed

    url = str(tiny_pipeline["database_url"])
    first = batch_rank_entry(BatchRankParams(mode="base"))  # as the batch-rank deployment runs
    assert first["status"] == "published" and first["mode"] == "base"
    models = _count(url, "models")

    # Stage 1 fails: nothing after it runs (no model trained, nothing ranked).
    missing = tmp_path / "no-such-inbox"
    state = nightly_flow(NightlyParams(source=str(missing), kinds=["mf"]), return_state=True)
    assert state.is_failed()
    assert "stage 'ingest'" in (state.message or "") and str(missing) in (state.message or "")
    with pytest.raises(StageFailed, match="stage 'ingest'"):
        state.result()
    assert _count(url, "models") == models
    assert _published(url) == (first["run_id"], {first["run_id"]})
    assert state.state_details.flow_run_id is not None
    markdown = _summary_artifact(state.state_details.flow_run_id)
    assert "stopped at ingest" in markdown and "retrain-base" not in markdown

    # Stage 3 fails (another batch rank holds the lock) after ingest and retrain completed.
    with batch_rank_lock(url):
        state = nightly_flow(
            NightlyParams(source=str(tiny_pipeline["files"].interactions), kinds=["mf"]),
            return_state=True,
        )
    assert state.is_failed()
    message = state.message or ""
    assert "stage 'batch-rank'" in message and "BatchRankBusyError" in message, message
    assert _count(url, "models") == models + 1  # the retrain stage did run
    assert _published(url) == (first["run_id"], {first["run_id"]})
    assert state.state_details.flow_run_id is not None
    markdown = _summary_artifact(state.state_details.flow_run_id)
    assert "stopped at batch-rank" in markdown and "evaluate-ranker" not in markdown


def test_parameter_models_mirror_the_core() -> None:
    """The pydantic Literals offered in the UI name exactly what the core accepts."""
    from flows.params import BaseKind, EvalTarget, NightlyParams, RankMode
    from recranker_core.base.train import KINDS
    from recranker_core.batch_rank.serving import SERVING_MODES
    from recranker_core.evaluate_ranker.evaluate import TARGETS

    assert set(get_args(BaseKind)) == set(KINDS)
    assert set(get_args(EvalTarget)) == set(TARGETS)
    assert set(get_args(RankMode)) == set(SERVING_MODES)
    with pytest.raises(ValueError, match="kinds"):
        NightlyParams(kinds=["nope"])
    with pytest.raises(ValueError, match="sourse"):
        NightlyParams.model_validate({"sourse": "/x"})
