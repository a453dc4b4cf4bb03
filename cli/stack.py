"""`recranker stack`, `db` and `settings`: the local services, the schema and the effective
settings."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from cli.common import _echo_json, _settings

stack_app = typer.Typer(no_args_is_help=True, help="Start, stop and inspect the local stack.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")


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


def register(app: typer.Typer) -> None:
    """`recranker settings` (a top-level command)."""
    app.command("settings")(show_settings)
