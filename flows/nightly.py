"""Flow `nightly`: ingest new files -> retrain base -> batch rank (and publish) -> evaluate, each
stage a subflow run of its own, stopped at the first failed stage, summarised as an artifact."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, cast

from prefect import Flow, flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.batch_rank import batch_rank_flow
from flows.evaluate_ranker import evaluate_ranker_flow
from flows.ingest import ingest_flow
from flows.params import NightlyParams
from flows.retrain_base import retrain_base_flow
from recranker_core.config import load_settings
from recranker_core.errors import StageFailed
from tasks.common import resolve_database

if TYPE_CHECKING:
    from prefect.states import State

SOURCE_ENV = "RECRANKER_NIGHTLY__SOURCE"


@dataclass
class StageOutcome:
    """One line of the nightly summary."""

    stage: str
    status: str  # completed | failed | skipped
    summary: str
    flow_run_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@flow(name="nightly")
def nightly_flow(params: NightlyParams = NightlyParams()) -> dict[str, Any]:
    """Ingest new interaction files, retrain the base models, rank and publish, evaluate.

    Args:
        params: Source of the files and options of each stage; empty fields take the settings.
    """
    logger = get_run_logger()
    stages: list[StageOutcome] = []
    try:
        source = params.source or load_settings().nightly.source
        if not source:
            stages.append(StageOutcome("ingest", "failed", "no source configured"))
            raise StageFailed(
                f"nightly stopped at stage 'ingest': no source of interaction files; set "
                f"{SOURCE_ENV} or the `source` parameter. The published ranking run is unchanged."
            )
        ingested = _run_stage(stages, "ingest", ingest_flow, source, params.format)
        stages[-1].summary = _ingest_summary(ingested, source)
        stages[-1].details = {"files": [_ingest_row(r) for r in ingested]}

        retrained = _run_stage(
            stages, "retrain-base", retrain_base_flow, list(params.kinds) if params.kinds else None
        )
        trained = ", ".join(f"{kind} (model {m})" for kind, m in retrained["models"].items())
        stages[-1].summary = (
            f"promoted model {retrained['promoted']}"
            if retrained["promoted"]
            else "nothing promoted; the champion keeps serving"
        ) + f"; trained {trained or 'nothing'}"
        stages[-1].details = retrained

        ranked = _run_stage(
            stages, "batch-rank", batch_rank_flow, None, params.mode, params.publish
        )
        stages[-1].summary = (
            f"run `{ranked['run_id']}` {ranked['status']}"
            + (f" (previous `{ranked['previous']}`)" if ranked.get("previous") else "")
            + f": {ranked['users']:,} users, {ranked['rows']:,} rows, {ranked['llm_users']:,} "
            f"re-ranked by the LLM; served {ranked.get('served', ranked['mode'])}"
        )
        stages[-1].details = ranked

        skip = _evaluation_skipped(params)
        if skip:
            stages.append(StageOutcome("evaluate-ranker", "skipped", skip))
            logger.info("evaluation skipped: %s", skip)
        else:
            evaluated = _run_stage(
                stages, "evaluate-ranker", evaluate_ranker_flow, None, params.eval_max_users
            )
            table = evaluated["table"]
            published = table.get("published", table.get("hybrid", {})).get("test", {})
            base = table.get("base", {}).get("test", {})
            guard = table.get("guard") or {}
            stages[-1].summary = (
                f"evaluation {evaluated['evaluation_id']}, published test ndcg@3 "
                f"{published.get('ndcg@3', float('nan')):.4f} (base "
                f"{base.get('ndcg@3', float('nan')):.4f}; the guard serves "
                f"{guard.get('served', 'n/a')}); report "
                f"[{evaluated['report']}](file://{evaluated['report']})"
            )
            stages[-1].details = {
                k: evaluated[k] for k in ("evaluation_id", "report", "counts", "weights")
            }
    finally:
        create_markdown_artifact(
            key="nightly-summary",
            markdown=summary_markdown(stages),
            description="What the nightly run did, stage by stage",
        )
    return {"status": "completed", "stages": [asdict(s) for s in stages]}


def _run_stage(
    stages: list[StageOutcome], name: str, stage_flow: Flow[..., Any], *args: Any
) -> Any:
    """Run one stage as a subflow; a failed run stops the chain with a message naming it."""
    logger = get_run_logger()
    logger.info("stage %s starting", name)
    state = cast("State[Any]", stage_flow(*args, return_state=True))
    run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else None
        reason = reason or state.message or f"ended in state {state.type.value}"
        stages.append(StageOutcome(name, "failed", reason, run_id))
        raise StageFailed(
            f"nightly stopped at stage {name!r} (flow run {run_id}): {reason}. The stages after "
            "it did not run; the published ranking run is unchanged."
        ) from (exc if isinstance(exc, BaseException) else None)
    stages.append(StageOutcome(name, "completed", "", run_id))
    logger.info("stage %s completed (flow run %s)", name, run_id)
    return state.result()


def _evaluation_skipped(params: NightlyParams) -> str | None:
    """Why the evaluation does not run, or None when it does. Without a tuned adapter there is
    nothing to evaluate yet: that is a fresh installation, not a failure."""
    from recranker_core.registry import champion_adapter

    if not params.evaluate:
        return "disabled by the `evaluate` parameter"
    if champion_adapter(resolve_database(load_settings())) is None:
        return "no champion adapter yet (run the tune-ranker deployment)"
    return None


def _ingest_row(result: Any) -> dict[str, Any]:
    # A skipped file's result carries the counts of the batch that merged it earlier; this
    # night's rows are zero.
    tonight = result.status != "already_ingested"
    return {
        "file": result.file_name,
        "status": result.status,
        "batch": result.batch_id,
        "merged": result.rows_merged if tonight else 0,
        "duplicate": result.rows_duplicate if tonight else 0,
        "quarantined": result.rows_quarantined if tonight else 0,
    }


def _ingest_summary(results: list[Any], source: str) -> str:
    by_status: dict[str, int] = {}
    for r in results:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    merged = sum(r.rows_merged for r in results if r.status == "merged")
    counts = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in sorted(by_status.items()))
    return f"{len(results)} file(s) under `{source}`: {counts}; {merged:,} rows merged"


def summary_markdown(stages: list[StageOutcome]) -> str:
    """The nightly artifact: one row per stage with its flow run, then each stage's files or ids."""
    from prefect.utilities.urls import url_for

    failed = [s for s in stages if s.status == "failed"]
    lines = [
        "### Nightly run: " + (f"**stopped at {failed[0].stage}**" if failed else "completed"),
        "",
        "| stage | status | flow run | summary |",
        "|---|---|---|---|",
    ]
    for s in stages:
        link = url_for("flow-run", obj_id=s.flow_run_id) if s.flow_run_id else None
        run = f"[{s.flow_run_id}]({link})" if link else (s.flow_run_id or "")
        lines.append(f"| {s.stage} | {s.status} | {run} | {s.summary.replace('|', '/')} |")
    files = next((s.details.get("files") for s in stages if s.stage == "ingest"), None)
    if files:
        lines += ["", "| file | status | batch | merged | duplicate | quarantined |"]
        lines += ["|---|---|---:|---:|---:|---:|"]
        lines += [
            f"| {f['file']} | {f['status']} | {f['batch']} | {f['merged']:,} | "
            f"{f['duplicate']:,} | {f['quarantined']:,} |"
            for f in files
        ]
    if failed:
        lines += [
            "",
            "The stages after the failed one did not run; consumers keep reading the previously "
            "published run in `recranker.recommendations_current`.",
        ]
    return "\n".join(lines)
