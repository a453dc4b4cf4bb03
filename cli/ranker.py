"""`recranker tune`, `rank`, `eval`, `tune-weights` and `runs`: the LLM ranker's stages and its
runs."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import typer

from cli.common import ProfileOption, _echo_json, _preflight, _served, _settings


def tune_ranker(
    objective: Annotated[
        Literal["sft", "alro", "dmpo"] | None,  # TuneSettings.objective
        typer.Option(
            help="Tuning objective: sft, alro (SFT + ALRO's listwise ranking losses) or dmpo "
            "(from the champion SFT adapter); default RECRANKER_TUNE__OBJECTIVE."
        ),
    ] = None,
    profile: ProfileOption = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many optimizer steps.")
    ] = None,
) -> None:
    """Sample users, build the instruction data, tune a LoRA adapter, store, register and gate
    it (the `tune-ranker` flow)."""
    _preflight()
    from flows.tune_ranker import tune_ranker_flow

    summary = tune_ranker_flow(objective, profile, max_steps)
    typer.echo(summary["profile"])
    typer.echo(
        f"adapter {summary['adapter_id']}: "
        f"{'promoted' if summary['promoted'] else 'not promoted'} ({summary['reason']})"
    )
    typer.echo(f"guard: serves {summary['fusion']['served']}: {summary['fusion']['reason']}")
    if summary.get("note"):
        typer.echo(f"warning: {summary['note']}")
    _echo_json({k: summary[k] for k in ("adapter_id", "metrics", "steps", "best_step", "seconds")})


def rank(
    run_id: Annotated[
        str | None, typer.Option(help="Resume this unfinished run from its finished shards.")
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="fused | hybrid | pointwise | pairwise | listwise | base "
            "(RECRANKER_RANK__MODE, default fused: what the champion adapter's guard decided)."
        ),
    ] = None,
    no_publish: Annotated[
        bool, typer.Option("--no-publish", help="Write the run but leave the current one.")
    ] = False,
) -> None:
    """Rank every active user and publish the run (the `batch-rank` flow)."""
    _preflight()
    from flows.batch_rank import batch_rank_flow

    summary = batch_rank_flow(run_id, mode, not no_publish)
    typer.echo(summary["serving"])
    typer.echo(
        f"run {summary['run_id']} {summary['status']}: {summary['users']:,} users, "
        f"{summary['rows']:,} rows ({summary['llm_users']:,} re-ranked by the LLM, "
        f"{summary['base_users']:,} base, {summary['cold_users']:,} cold) in {summary['seconds']} s"
    )


def evaluate(
    max_users: Annotated[
        int | None,
        typer.Option(
            help="Evaluate a seeded random subset of this many users (a quick look); default "
            "RECRANKER_RANK__EVAL_MAX_USERS, unset: every evaluable user."
        ),
    ] = None,
    adapter: Annotated[
        int | None,
        typer.Option(help="Evaluate this adapter (e.g. a candidate) instead of the champion."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
) -> None:
    """HR/NDCG@3/5/10 of the base model, each task, the hybrid, the fused ranking and the
    published one on validation and test, each difference to the base with its paired-bootstrap
    interval, the guard's decision and slices; stored in the database and written as an HTML
    report (the `evaluate-ranker` flow)."""
    _preflight()
    from flows.evaluate_ranker import evaluate_ranker_flow

    result = evaluate_ranker_flow(None, max_users, adapter_id=adapter)
    if as_json:
        _echo_json(result["table"])
        return
    _print_evaluation(result)


def _print_evaluation(result: dict[str, Any]) -> None:
    from recranker_core.evaluate_ranker.report import METRICS

    if result.get("sample"):
        typer.echo(f"SAMPLE: {result['sample']}")
    guard = result.get("guard")
    if guard:
        typer.echo(f"guard: serves {guard['served'].upper()}: {guard['reason']}")
    typer.echo(f"{'method':<13} {'split':<6} " + " ".join(f"{m:>8}" for m in METRICS))
    for row in result["rows"]:
        typer.echo(
            f"{row['method']:<13} {row['split']:<6} " + " ".join(f"{row[m]:>8.4f}" for m in METRICS)
        )
    typer.echo("\ndifference to the base model, 95% paired-bootstrap interval over all users:")
    for row in result["rows"]:
        if row["method"] == "base":
            continue
        diffs = "; ".join(f"{k} {v}" for k, v in row.items() if k.endswith("vs base") and v)
        typer.echo(f"{row['method']:<13} {row['split']:<6} {diffs}")
    if result.get("slices"):
        typer.echo("\nslices (test NDCG@3):")
        for row in result["slices"]:
            typer.echo(
                f"{row['slice']:<22} {row['users']:>6} users  {row['method']:<13} "
                f"{row['ndcg@3']:.4f}  {row['vs base']}"
            )
    typer.echo(f"weights: {json.dumps(result['weights'])}")
    typer.echo(f"report: {result['report']}")


def tune_weights(
    max_users: Annotated[
        int | None, typer.Option(help="Use a seeded random subset of this many users.")
    ] = None,
    step: Annotated[float, typer.Option(help="Grid step on the weight simplex.")] = 0.1,
) -> None:
    """Choose the four fused weights (base, pointwise, pairwise, listwise) on VALIDATION users
    only (test is never read), run the cross-fitted guard, print the decision and store it on
    the champion adapter: what `recranker rank` serves in mode `fused`."""
    _preflight()
    from flows.evaluate_ranker import evaluate_ranker_flow
    from recranker_core.batch_rank.fusion import GuardDecision
    from recranker_core.registry import update_adapter_fusion
    from recranker_core.stack import database_url

    result = evaluate_ranker_flow(["valid"], max_users, step)
    decision = GuardDecision.from_json(result["guard"])
    if result.get("sample"):
        typer.echo(f"SAMPLE: {result['sample']}")
    typer.echo(f"guard: serves {decision.served.upper()}: {decision.reason}")
    typer.echo(
        f"fused weights (validation NDCG@{decision.k}): {decision.weights.label()}; "
        f"out of sample fused {decision.fused_ndcg:.4f} vs base {decision.base_ndcg:.4f}"
    )
    update_adapter_fusion(database_url(_settings()), result["adapter_id"], decision)
    typer.echo(
        f"stored on adapter {result['adapter_id']}: mode fused serves "
        + (
            "the fused order with these weights"
            if decision.served == "fused"
            else "the base order (no LLM time)"
        )
    )
    tuned = result["weights"]["tuned_on_valid"]
    values = [round(tuned[t], 4) for t in ("pointwise", "pairwise", "listwise")]
    best = result["table"]["hybrid_tuned"]["valid"]["ndcg@10"]
    typer.echo(
        f"for the hybrid ablation (mode hybrid; validation ndcg@10 {best:.4f}): "
        f"export RECRANKER_RANK__WEIGHTS='{json.dumps(values)}'"
    )


def runs_list(
    limit: Annotated[int, typer.Option(help="How many runs to show.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """Ranking runs, newest first, with their status and counts; `*` marks the published one."""
    from recranker_core.batch_rank.runs import list_runs
    from recranker_core.stack import database_url

    url = database_url(_settings())
    runs = list_runs(url, limit)
    if as_json:
        _echo_json(runs)
        return
    typer.echo(f"  {'run':<28} {'status':<10} {'served (gain±se)':<24} counts")
    for r in runs:
        mark = "*" if r["current"] else " "
        typer.echo(
            f"{mark} {r['run_id']:<28} {r['status']:<10} {_served(r.get('fusion')):<24} "
            f"{r.get('counts') or {}}"
        )


def register(app: typer.Typer) -> None:
    """The ranker commands, in the order `recranker --help` lists them."""
    app.command("tune")(tune_ranker)
    app.command("rank")(rank)
    app.command("eval")(evaluate)
    app.command("tune-weights")(tune_weights)
    app.command("runs")(runs_list)
