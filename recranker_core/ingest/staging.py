"""Staging tables (schema recranker_staging, one set per ingest, each marked with the session that
owns it): names, create, drop, sweep; and what a stop leaves to do: end the session's statement
and record the batch as cancelled."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from recranker_core.db.connect import connect
from recranker_core.ingest.batches import _LEDGER_LOCK, _insert_ledger, _merged_batch
from recranker_core.ingest.timing import _STAGES

if TYPE_CHECKING:
    from recranker_core.ingest.run import IngestResult

log = logging.getLogger(__name__)

STAGING_SCHEMA = "recranker_staging"


@dataclass(frozen=True)
class _StagingNames:
    staging: str
    classified: str
    items: str
    users: str

    @classmethod
    def new(cls) -> _StagingNames:
        tag = uuid.uuid4().hex[:16]
        return cls(f"s_{tag}", f"c_{tag}", f"i_{tag}", f"u_{tag}")

    def all(self) -> tuple[str, ...]:
        return (self.staging, self.classified, self.items, self.users)

    @staticmethod
    def ident(name: str) -> sql.Identifier:
        return sql.Identifier(STAGING_SCHEMA, name)


def sweep_staging(conn: psycopg.Connection) -> list[str]:
    """Drop staging tables left by ingests whose database session is gone (a killed process).

    Each staging table's comment names the backend pid that created it (set in the transaction
    that creates it); a table whose pid no longer has a session cannot be in use.
    """
    rows = conn.execute(
        """SELECT c.relname, obj_description(c.oid, 'pg_class')
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = %s AND c.relkind = 'r'""",
        (STAGING_SCHEMA,),
    ).fetchall()
    live = {r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity")}
    dropped = []
    for name, comment in rows:
        pid = int(comment.split("=", 1)[1]) if comment and comment.startswith("pid=") else None
        if pid is not None and pid not in live:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_StagingNames.ident(name)))
            dropped.append(name)
    if dropped:
        log.warning("dropped %d staging tables left by interrupted ingests", len(dropped))
    return dropped


def _create_table(
    conn: psycopg.Connection, name: str, columns: sql.Composable, owner: int | None = None
) -> None:
    """Create a staging table and mark it as this session's, or as the session `owner` (a
    backend pid) when another connection works for it (call inside a transaction, so that no
    committed staging table is ever without its owner)."""
    conn.execute(
        sql.SQL("CREATE UNLOGGED TABLE {} ({})").format(_StagingNames.ident(name), columns)
    )
    _mark_owner(conn, name, owner)


def _mark_owner(conn: psycopg.Connection, name: str, owner: int | None = None) -> None:
    pid = conn.info.backend_pid if owner is None else owner
    conn.execute(
        sql.SQL("COMMENT ON TABLE {} IS {}").format(
            _StagingNames.ident(name), sql.Literal(f"pid={pid}")
        )
    )


def _drop_staging(conn: psycopg.Connection, names: _StagingNames) -> None:
    if conn.closed:
        return  # the session is gone, so are its tables' owner: the next sweep drops them
    try:
        for name in names.all():
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_StagingNames.ident(name)))
    except psycopg.Error as exc:
        log.warning("staging tables %s left for the next ingest to sweep: %s", names.all(), exc)


def _settle(conn: psycopg.Connection) -> None:
    """After a stop: leave nothing of this session running on the server. psycopg cancels the
    statement it was waiting for and the transaction blocks roll back; a stop that landed
    between psycopg's steps can leave a statement running, which is cancelled here and the
    connection closed (the server then rolls back whatever it had)."""
    from psycopg.pq import TransactionStatus

    if conn.closed or conn.info.transaction_status == TransactionStatus.IDLE:
        return
    try:
        if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
            conn.rollback()
            return
        conn.cancel_safe(timeout=5.0)
    except psycopg.Error as exc:
        log.warning("could not end the interrupted statement cleanly (%s); closing", exc)
    conn.close()


def _record_cancellation(
    database_url: str, result: IngestResult, started: datetime, reason: str
) -> None:
    """Record a stopped ingest as a cancelled batch (nothing merged, counts zero), unless its
    merge committed before the stop: then the ledger already says what happened."""
    stage = next((s for s in _STAGES if s not in result.seconds), "merge")
    try:
        with (
            connect(database_url, application_name="recranker-ingest") as conn,
            conn.transaction(),
        ):
            conn.execute("SET LOCAL lock_timeout = '30s'")
            # Serialises with any merge still finishing (its transaction holds this lock).
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LEDGER_LOCK,))
            merged = _merged_batch(conn, result.content_hash)
            recorded = (
                result.batch_id is not None
                and conn.execute(
                    "SELECT 1 FROM recranker.ingest_batches WHERE batch_id = %s", (result.batch_id,)
                ).fetchone()
            )
            if merged is not None or recorded:
                log.warning(
                    "%s: %s after batch %s was recorded as %s; the ledger has it",
                    result.source,
                    reason,
                    merged[0] if merged else result.batch_id,
                    "merged" if merged else result.status,
                )
                return
            result.status = "cancelled"
            result.rows_read = result.rows_merged = result.rows_duplicate = 0
            result.rows_quarantined = result.items_upserted = result.users_upserted = 0
            result.error = (
                f"{result.file_name}: {reason} during {stage}; nothing of the file was merged. "
                "Run the ingest again to load it."
            )
            result.batch_id = _insert_ledger(conn, result, started)
            conn.execute(
                "UPDATE recranker.ingest_batches SET error = %s WHERE batch_id = %s",
                (result.error, result.batch_id),
            )
    except psycopg.Error as exc:
        log.error("%s: %s; could not record the cancelled batch: %s", result.source, reason, exc)
        return
    log.warning(result.summary())


def _count(conn: psycopg.Connection, table: str) -> int:
    row = conn.execute(
        sql.SQL("SELECT count(*) FROM {}").format(_StagingNames.ident(table))
    ).fetchone()
    return int(row[0]) if row else 0
