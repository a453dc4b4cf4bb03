"""Flow `ingest`: interaction files (local path or s3:// prefix) -> validated batches in
PostgreSQL, one batch per file, with the ledger and GX results as artifacts."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_table_artifact

from recranker_core.config import load_settings
from recranker_core.errors import ValidationFailed
from recranker_core.ingest import IngestResult
from recranker_core.interrupts import stop_on_signals
from tasks.common import resolve_database
from tasks.ingest import discover_files, ingest_file_task, results_table


@flow(name="ingest", log_prints=True)
def ingest_flow(source: str, format: str | None = None) -> list[IngestResult]:
    """Ingest every interaction file under `source`; fails when any batch is rejected.

    SIGINT/SIGTERM stop it: the file in progress is rolled back and recorded as cancelled, the
    files after it are not read, and the process ends with 130/143 (no retry)."""
    with stop_on_signals():
        settings = load_settings()
        database_url = resolve_database(settings)
        files = discover_files(source, format, settings)
        results = [ingest_file_task(src, settings, database_url) for src in files]
        create_table_artifact(
            key="ingest-ledger", table=results_table(results), description=f"Ingest of {source}"
        )
        rejected = [r for r in results if r.status == "rejected"]
        if rejected:
            raise ValidationFailed(
                f"{len(rejected)} of {len(results)} file(s) rejected: "
                + " | ".join(r.error or r.file_name for r in rejected),
                results,
            )
        return results
