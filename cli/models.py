"""`recranker models`: the base-model registry."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import _echo_json, _settings

models_app = typer.Typer(no_args_is_help=True, help="The base-model registry.")


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
