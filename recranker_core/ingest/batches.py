"""The batch ledger (recranker.ingest_batches, with the validation results of each batch): the
merge lock, a file's row inserted, finished or rejected, and the read-only queries of the command
line (ledger, table_counts, quarantined). Not named ledger.py: the package exports the function
ledger(), which would hide a submodule of that name."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any, NoReturn

import psycopg

from recranker_core.db.connect import connect
from recranker_core.errors import ValidationFailed
from recranker_core.ingest.timing import _exec
from recranker_core.validation.suite import ExpectationOutcome

if TYPE_CHECKING:
    from recranker_core.ingest.run import IngestResult

log = logging.getLogger(__name__)

_LEDGER_LOCK = 7_310_002


def _merged_batch(conn: psycopg.Connection, content_hash: str) -> tuple[Any, ...] | None:
    return conn.execute(
        """SELECT batch_id, rows_read, rows_merged, rows_duplicate, rows_quarantined
           FROM recranker.ingest_batches WHERE content_hash = %s AND status = 'merged'""",
        (content_hash,),
    ).fetchone()


def _already(result: IngestResult, previous: tuple[Any, ...]) -> IngestResult:
    result.status = "already_ingested"
    (
        result.batch_id,
        result.rows_read,
        result.rows_merged,
        result.rows_duplicate,
        result.rows_quarantined,
    ) = previous
    log.info(result.summary())
    return result


def _insert_ledger(conn: psycopg.Connection, result: IngestResult, started: datetime) -> int:
    """The file's ledger row. A batch id taken by an attempt that was rolled back (a batch over
    its budget is undone, then recorded as rejected by a second transaction) is free and is
    reused, so that one file is one batch id and the ledger has no gap for it."""
    values = (
        result.source,
        result.file_name,
        result.content_hash,
        result.format,
        result.status,
        started,
    )
    row = None
    if result.batch_id is not None:
        row = conn.execute(
            """INSERT INTO recranker.ingest_batches
                   (batch_id, source, file_name, content_hash, format, status, started_at)
               OVERRIDING SYSTEM VALUE
               SELECT %s, %s, %s, %s, %s, %s, %s
               WHERE NOT EXISTS (SELECT 1 FROM recranker.ingest_batches WHERE batch_id = %s)
               RETURNING batch_id""",
            (result.batch_id, *values, result.batch_id),
        ).fetchone()
    if row is None:
        row = conn.execute(
            """INSERT INTO recranker.ingest_batches
                   (source, file_name, content_hash, format, status, started_at)
               VALUES (%s, %s, %s, %s, %s, %s) RETURNING batch_id""",
            values,
        ).fetchone()
    assert row is not None
    return int(row[0])


def _record_rejection(
    conn: psycopg.Connection,
    result: IngestResult,
    started: datetime,
    error: str,
) -> NoReturn:
    """A file that cannot be read at all: a rejected ledger row with the reason, then raise."""
    result.status = "rejected"
    result.error = error
    result.rows_read = result.rows_merged = result.rows_duplicate = result.rows_quarantined = 0
    result.items_upserted = result.users_upserted = 0
    result.reasons, result.examples, result.validation = {}, [], []
    with conn.transaction():
        result.batch_id = _insert_ledger(conn, result, started)
        conn.execute(
            "UPDATE recranker.ingest_batches SET error = %s WHERE batch_id = %s",
            (error, result.batch_id),
        )
    log.error(result.summary())
    raise ValidationFailed(error, result)


def _lock_and_check(conn: psycopg.Connection, result: IngestResult) -> bool:
    """Take the merge lock; False (and the result marked) when the content is merged already.

    One merge at a time: what is stored cannot change between the repeat check and the insert,
    and a second process ingesting the same content waits here, then sees it merged.
    """
    _exec(conn, "SELECT pg_advisory_xact_lock(%s)", (_LEDGER_LOCK,))
    previous = _merged_batch(conn, result.content_hash)
    if previous is not None:
        _already(result, previous)
        return False
    return True


def _finish_ledger(
    conn: psycopg.Connection, result: IngestResult, outcomes: list[ExpectationOutcome]
) -> None:
    _exec(
        conn,
        """UPDATE recranker.ingest_batches
           SET status = %s, rows_read = %s, rows_merged = %s, rows_duplicate = %s,
               rows_quarantined = %s, items_upserted = %s, users_upserted = %s, error = %s,
               finished_at = now()
           WHERE batch_id = %s""",
        (
            result.status,
            result.rows_read,
            result.rows_merged,
            result.rows_duplicate,
            result.rows_quarantined,
            result.items_upserted,
            result.users_upserted,
            result.error,
            result.batch_id,
        ),
    )
    assert result.batch_id is not None
    _insert_validation(conn, result.batch_id, "staged", "staged_batch", outcomes)


def _insert_validation(
    conn: psycopg.Connection,
    batch_id: int,
    stage: str,
    suite: str,
    outcomes: list[ExpectationOutcome],
) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO recranker.validation_results
                   (batch_id, stage, suite, expectation, column_name, success, element_count,
                    unexpected_count, details)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            [
                (
                    batch_id,
                    stage,
                    suite,
                    o.expectation,
                    o.column,
                    o.success,
                    o.element_count if isinstance(o.element_count, int) else None,
                    o.unexpected_count,
                    json.dumps(o.details),
                )
                for o in outcomes
            ],
        )


def ledger(database_url: str, limit: int = 20) -> list[dict[str, Any]]:
    """The most recent ingest batches, newest first."""
    with connect(database_url) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            """SELECT batch_id, file_name, status, rows_read, rows_merged, rows_duplicate,
                      rows_quarantined, items_upserted, users_upserted, finished_at, error
               FROM recranker.ingest_batches ORDER BY batch_id DESC LIMIT %s""",
            (limit,),
        ).fetchall()


def table_counts(database_url: str) -> dict[str, int]:
    """Rows in interactions and distinct users and items in it."""
    with connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT user_id), count(DISTINCT item_id) "
            "FROM recranker.interactions"
        ).fetchone()
    assert row is not None
    return {"interactions": int(row[0]), "users": int(row[1]), "items": int(row[2])}


def quarantined(database_url: str, batch_id: int, limit: int = 20) -> dict[str, Any]:
    """Reason counts and the first quarantined lines of one batch."""
    with connect(database_url) as conn:
        reasons: dict[str, int] = dict(
            conn.execute(
                """SELECT r, count(*) FROM recranker.quarantine, unnest(reasons) r
                   WHERE batch_id = %s GROUP BY r ORDER BY 2 DESC, 1""",
                (batch_id,),
            ).fetchall()
        )
        rows = [
            {"line": line, "reasons": rs, "raw": raw}
            for line, rs, raw in conn.execute(
                """SELECT line, reasons, raw FROM recranker.quarantine
                   WHERE batch_id = %s ORDER BY line LIMIT %s""",
                (batch_id, limit),
            )
        ]
    return {"batch_id": batch_id, "reasons": reasons, "rows": rows}
