"""`recranker adapters`: the ranker-adapter registry."""

from __future__ import annotations

from typing import Annotated

import typer

from cli.common import _echo_json, _served, _settings

adapters_app = typer.Typer(no_args_is_help=True, help="The ranker-adapter registry.")


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
