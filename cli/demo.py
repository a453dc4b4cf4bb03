"""`recranker demo`: the whole pipeline on MovieLens-100K with the local stack."""

from __future__ import annotations

import os

import typer

from cli.adapters import adapters_list
from cli.common import _settings
from cli.ingest import _print_ledger
from cli.models import models_list
from cli.ranker import _print_evaluation
from cli.stack import _print_status

DEMO_RANK_DEFAULTS = {
    "RECRANKER_RANK__LLM_MAX_USERS": "60",
    "RECRANKER_RANK__EVAL_MAX_USERS": "150",
}


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


def register(app: typer.Typer) -> None:
    """`recranker demo`."""
    app.command("demo")(demo)
