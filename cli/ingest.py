"""`recranker ingest`, `batches` and `quarantine`: the ingest stage and its ledger."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cli.common import EXIT_REJECTED, Format, _echo_json, _preflight, _settings


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


def register(app: typer.Typer) -> None:
    """The ingest commands, in the order `recranker --help` lists them."""
    app.command("ingest")(ingest)
    app.command("batches")(batches)
    app.command("quarantine")(quarantine)
