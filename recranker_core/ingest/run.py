"""The entry points (ingest, ingest_outcome, ingest_file) and IngestResult: one file, one batch,
from its hash to the merge, with what a stop or an unreadable file leaves in the ledger."""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from recranker_core.config import Settings
from recranker_core.datasets.sources import SourceFile, discover, sha256_file
from recranker_core.db.connect import connect, set_memory
from recranker_core.errors import DataError, ValidationFailed
from recranker_core.ingest.batches import _already, _merged_batch, _record_rejection
from recranker_core.ingest.catalogue import _CatalogueStaging
from recranker_core.ingest.classify import _prepare
from recranker_core.ingest.merge import _merge
from recranker_core.ingest.staging import (
    _drop_staging,
    _record_cancellation,
    _settle,
    _StagingNames,
    sweep_staging,
)
from recranker_core.ingest.timing import _Timer
from recranker_core.interrupts import stop_reason

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    """What happened to one file: the ledger row plus what a person needs to act on it."""

    source: str
    file_name: str
    content_hash: str
    format: str
    status: str  # merged | rejected | cancelled | already_ingested
    batch_id: int | None = None
    rows_read: int = 0
    rows_merged: int = 0
    rows_duplicate: int = 0
    rows_quarantined: int = 0
    items_upserted: int = 0
    users_upserted: int = 0
    trailing_blank_lines: int = 0  # blank lines at the end of the file: not records, not counted
    error: str | None = None
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, sort_keys=True)

    def summary(self) -> str:
        if self.status == "already_ingested":
            return (
                f"{self.source}: already ingested as batch {self.batch_id} "
                f"(same content, sha256 {self.content_hash[:12]}); nothing to do"
            )
        head = (
            f"{self.source}: batch {self.batch_id} {self.status}: read {self.rows_read:,}, "
            f"merged {self.rows_merged:,}, duplicate {self.rows_duplicate:,}, "
            f"quarantined {self.rows_quarantined:,}"
        )
        return head + (f"\n  {self.error}" if self.error else "")


def ingest(
    target: str,
    settings: Settings,
    database_url: str,
    *,
    fmt: str | None = None,
    s3: Any = None,
) -> list[IngestResult]:
    """Ingest every interaction file behind a file, directory or s3:// prefix, in name order.

    A rejected file does not stop the others; its result has status 'rejected'.
    """
    files = discover(target, fmt, settings.home / "cache" / "s3", s3)
    return [ingest_outcome(src, settings, database_url) for src in files]


def ingest_outcome(src: SourceFile, settings: Settings, database_url: str) -> IngestResult:
    """`ingest_file`, returning a rejected file's result (status 'rejected') instead of raising:
    for callers that report every outcome alike. Stops and unexpected errors still raise."""
    try:
        return ingest_file(src, settings, database_url)
    except ValidationFailed as exc:
        (result,) = exc.results  # ingest_file always attaches its one result
        return result


def ingest_file(src: SourceFile, settings: Settings, database_url: str) -> IngestResult:
    """Ingest one file as one batch; see the package docstring for the steps.

    Returns the ledger outcome (merged or already_ingested). A batch over the failure budget or a
    file that cannot be read is recorded as rejected and raised as ValidationFailed, whose second
    argument is the IngestResult. A stop (SIGINT, SIGTERM: see recranker_core.interrupts) rolls
    back what is in progress, records the batch as cancelled (unless its merge had committed
    already) and is raised again.
    """
    started = datetime.now(UTC)
    result = IngestResult(
        source=src.source,
        file_name=src.path.name,
        content_hash="",
        format=src.fmt,
        status="merged",
    )
    try:
        return _ingest_file(src, settings, database_url, result, started)
    except BaseException as exc:
        reason = stop_reason(exc)
        if reason is not None and result.content_hash:
            _record_cancellation(database_url, result, started, reason)
        raise


def _ingest_file(
    src: SourceFile,
    settings: Settings,
    database_url: str,
    result: IngestResult,
    started: datetime,
) -> IngestResult:
    timer = _Timer()
    result.content_hash = content_hash = sha256_file(src.path)
    timer.lap(result, "hash")
    with (
        ExitStack() as scratch,
        connect(database_url, autocommit=True, application_name="recranker-ingest") as conn,
    ):
        conn.execute("SET TIME ZONE 'UTC'")
        # Sorts and hashes over a whole batch stay in memory instead of spilling to disk.
        set_memory(conn, "work_mem", settings.ingest.work_mem, local=False)
        # JIT compiles the repeat resolution for seconds and saves less than it costs here.
        conn.execute("SET jit = off")
        sweep_staging(conn)
        previous = _merged_batch(conn, content_hash)
        if previous is not None:
            return _already(result, previous)
        names = _StagingNames.new()
        catalogue: _CatalogueStaging | None = None
        try:
            try:
                catalogue = _CatalogueStaging(database_url, src, names, conn.info.backend_pid)
                plan = _prepare(
                    conn, src, names, result, settings, database_url, catalogue.item_ids, scratch
                )
                timer.lap(result, "stage")
                _merge(conn, result, names, plan, catalogue, settings, started)
            except DataError as exc:
                _record_rejection(conn, result, started, str(exc))
            timer.lap(result, "merge")
        except BaseException as exc:
            if stop_reason(exc) is not None:
                _settle(conn)
            raise
        finally:
            if catalogue is not None:
                catalogue.wait()
            # Never let the clean-up hide what is propagating (a stop, above all): a table that
            # cannot be dropped now is swept by the next ingest.
            _drop_staging(conn, names)
    if result.status == "already_ingested":
        return result
    if result.status == "rejected":
        raise ValidationFailed(result.error, result)
    log.info(result.summary())
    return result
