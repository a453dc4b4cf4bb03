"""Prefect tasks of the ingest stage: thin wrappers over recranker_core.ingest with retries on
transient database errors, logs and artifacts."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from recranker_core.config import Settings
from recranker_core.datasets.sources import SourceFile, discover
from recranker_core.ingest import IngestResult, ingest_outcome
from tasks.common import TRANSIENT_RETRIES


@task(name="discover-files")
def discover_files(target: str, fmt: str | None, settings: Settings) -> list[SourceFile]:
    from recranker_core.stack import s3_config

    s3 = s3_config(settings) if target.startswith("s3://") else None
    files = discover(target, fmt, settings.home / "cache" / "s3", s3)
    get_run_logger().info("%d interaction file(s) under %s", len(files), target)
    return files


@task(
    name="ingest-file",
    **TRANSIENT_RETRIES,
    task_run_name="ingest {src.path.name}",
)
def ingest_file_task(src: SourceFile, settings: Settings, database_url: str) -> IngestResult:
    logger = get_run_logger()
    result = ingest_outcome(src, settings, database_url)
    if result.status == "rejected":
        logger.error(result.summary())
    else:
        logger.info(result.summary())
    publish_batch_artifacts(result)
    return result


def publish_batch_artifacts(result: IngestResult) -> None:
    """A table of the GX results and a markdown card of the ledger row for one batch."""
    key = f"ingest-batch-{result.batch_id}" if result.batch_id else None
    if result.validation:
        create_table_artifact(
            key=f"validation-batch-{result.batch_id}" if result.batch_id else None,
            table=[
                {
                    "expectation": v["expectation"],
                    "column": v["column"],
                    "success": v["success"],
                    "unexpected": v["unexpected_count"],
                    "rows": v["element_count"],
                }
                for v in result.validation
            ],
            description=f"Great Expectations results for {result.file_name} "
            f"(batch {result.batch_id})",
        )
    create_markdown_artifact(
        key=key, markdown=batch_markdown(result), description=f"Ingest of {result.file_name}"
    )


def batch_markdown(result: IngestResult) -> str:
    lines = [
        f"### {result.file_name}: {result.status.replace('_', ' ')}",
        "",
        "| read | merged | duplicate | quarantined | items | users |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {result.rows_read:,} | {result.rows_merged:,} | {result.rows_duplicate:,} | "
        f"{result.rows_quarantined:,} | {result.items_upserted:,} | {result.users_upserted:,} |",
        "",
        f"Batch `{result.batch_id}`, source `{result.source}`, sha256 `{result.content_hash[:16]}`",
    ]
    if result.error:
        lines += ["", f"**Error:** {result.error}"]
    if result.reasons:
        lines += ["", "| quarantine reason | rows |", "|---|---:|"]
        lines += [f"| {reason} | {n:,} |" for reason, n in result.reasons.items()]
    if result.seconds:
        lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in result.seconds.items())]
    return "\n".join(lines)


def results_table(results: list[IngestResult]) -> list[dict[str, Any]]:
    return [
        {
            "file": r.file_name,
            "status": r.status,
            "batch": r.batch_id,
            "read": r.rows_read,
            "merged": r.rows_merged,
            "duplicate": r.rows_duplicate,
            "quarantined": r.rows_quarantined,
        }
        for r in results
    ]
