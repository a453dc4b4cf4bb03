"""The merge: one transaction reads, classifies and inserts the file (repeats resolved in
staging), quarantines, upserts items and users, validates and finishes the ledger row; a batch
over its failure budget is undone and recorded as rejected by a second one."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from recranker_core.config import Settings
from recranker_core.errors import DataError
from recranker_core.ingest.batches import (
    _finish_ledger,
    _insert_ledger,
    _insert_validation,
    _lock_and_check,
)
from recranker_core.ingest.catalogue import _CatalogueStaging, _upsert_items, _upsert_users
from recranker_core.ingest.classify import (
    _classified_batches,
    _classify_into,
    _new_staged,
    _Plan,
    _Staged,
)
from recranker_core.ingest.insert import (
    _add_primary_key,
    _drop_primary_key,
    _insert_params,
    _insert_statement,
    _Inserter,
    _register_binary_dumpers,
    _resolve_and_insert,
    _stored_at_most,
)
from recranker_core.ingest.quarantine import (
    _count_outcome,
    _describe_quarantine,
    _fill_raw,
    _quarantine,
    _write_quarantine,
)
from recranker_core.ingest.staging import _StagingNames
from recranker_core.ingest.timing import _exec
from recranker_core.validation.rules import resolve_repeats_sql
from recranker_core.validation.suite import ExpectationOutcome

if TYPE_CHECKING:
    from recranker_core.ingest.run import IngestResult

log = logging.getLogger(__name__)

_gx_lock = threading.Lock()
_gx_import: threading.Thread | None = None


def _import_gx_ahead() -> threading.Thread:
    """Great Expectations' imports take seconds of one core, once per process: they run in a
    thread from the start of the first ingest, while the file is read and merged."""
    from recranker_core.validation.suite import import_gx

    global _gx_import
    with _gx_lock:
        if _gx_import is None:
            _gx_import = threading.Thread(target=import_gx, name="recranker-gx-import", daemon=True)
            _gx_import.start()
        return _gx_import


class _OverBudget(Exception):
    """Raised inside the merge transaction to undo it when a batch is over its failure budget."""


def _merge(
    conn: psycopg.Connection,
    result: IngestResult,
    names: _StagingNames,
    plan: _Plan,
    catalogue: _CatalogueStaging,
    settings: Settings,
    started: datetime,
) -> None:
    """Read, classify and merge the file in one transaction, then quarantine, validate and write
    the ledger in it; a rejected batch is recorded by another one.

    The rows go straight from classification into the table: the server inserts each batch
    while the next one is classified. Repeats of stored rows or of earlier lines make the insert
    fail; it is undone, the file is classified again into a staging table, and the repeats are
    resolved in SQL. An empty file, or a user or item file that cannot be read, raises
    DataError (the transaction undone): the file is rejected as one that cannot be read.
    """
    rules = settings.ingest
    budget = rules.failure_budget
    try:
        with conn.transaction():
            if not _lock_and_check(conn, result):
                return
            batch_id = result.batch_id = _insert_ledger(conn, result, started)
            bulk = plan.estimate >= rules.bulk_load_min_rows and _stored_at_most(
                conn, plan.estimate
            )
            try:
                staged = plan.read(
                    conn, lambda: _stream(conn, plan, batch_id, settings, bulk, catalogue, result)
                )
                repeats = False
            except psycopg.errors.UniqueViolation:
                log.info("the batch repeats stored rows or its own lines; resolving the repeats")
                staged = plan.read(conn, lambda: _classify_into(conn, names, plan, settings))
                repeats = True
            _count_rows(result, staged, plan)
            if staged.quarantined / result.rows_read > budget:
                raise _OverBudget
            if repeats:
                _resolve_and_insert(conn, names, batch_id, bulk, rules.maintenance_work_mem)
                classified = _StagingNames.ident(names.classified)
                counts = dict(
                    _exec(
                        conn,
                        sql.SQL("SELECT outcome, count(*) FROM {} GROUP BY outcome").format(
                            classified
                        ),
                    ).fetchall()
                )
                result.rows_quarantined = int(counts.get("quarantine", 0))
                if result.rows_quarantined / result.rows_read > budget:
                    raise _OverBudget
                result.rows_merged = int(counts.get("merge", 0))
                result.rows_duplicate = int(counts.get("duplicate", 0))
                _fill_raw(conn, names, staged, everything=False)
                _describe_quarantine(conn, result, names)
                if result.rows_quarantined:
                    _quarantine(conn, names, batch_id, everything=False)
            else:
                # Nothing moved since classification: its counts and descriptions stand.
                result.rows_merged, result.rows_duplicate = staged.valid, 0
                result.rows_quarantined = staged.quarantined
                result.reasons, result.examples = staged.described()
                _write_quarantine(conn, batch_id, staged)
            files = catalogue.result()
            classified = _StagingNames.ident(names.classified)
            result.items_upserted = _upsert_items(
                conn,
                names,
                files.items > 0,
                classified,
                batch_id,
                rules.auto_create_items,
                None
                if repeats or not rules.auto_create_items
                else files.new("items", staged.distinct("items")),
            )
            result.users_upserted = _upsert_users(
                conn,
                names,
                files.users > 0,
                classified,
                batch_id,
                None if repeats else files.new("users", staged.distinct("users")),
            )
            outcomes = _validate(conn, result, staged, settings, table=True)
            _finish_ledger(conn, result, outcomes)
        return
    except _OverBudget:
        pass
    # Rejected: a fresh transaction records the batch with every row in quarantine (unless its
    # user or item file cannot be read: then that is what is wrong with it).
    catalogue.result()
    with conn.transaction():
        if not _lock_and_check(conn, result):
            return
        staged = plan.read(conn, lambda: _classify_into(conn, names, plan, settings))
        _count_rows(result, staged, plan)
        classified = _StagingNames.ident(names.classified)
        _exec(conn, sql.SQL("ANALYZE {}").format(classified))
        for statement in resolve_repeats_sql(classified):
            _exec(conn, statement)  # so that conflicts carry their reason too
        result.status = "rejected"
        batch_id = result.batch_id = _insert_ledger(conn, result, started)
        result.rows_merged = result.rows_duplicate = 0
        share = _count_outcome(conn, classified, "quarantine") / result.rows_read
        _fill_raw(conn, names, staged, everything=True)
        _quarantine(conn, names, batch_id, everything=True)
        result.rows_quarantined = result.rows_read
        _describe_quarantine(conn, result, names)
        result.error = _budget_message(result, share, budget)
        outcomes = _validate(conn, result, staged, settings, table=False)
        _finish_ledger(conn, result, outcomes)


def _count_rows(result: IngestResult, staged: _Staged, plan: _Plan) -> None:
    result.rows_read = staged.rows
    result.seconds["classify"] = round(staged.classify_s, 3)
    if result.rows_read == 0:
        raise DataError(f"{plan.src.path}: the file has a header but no data rows")


def _start_helpers(catalogue: _CatalogueStaging) -> None:
    """Start what the end of the merge needs and takes seconds of Python: staging the batch's
    user and item files, importing Great Expectations. Both run in threads once the rows are
    read, while the server builds the primary key (earlier, they would take the interpreter
    from the classification that feeds the server)."""
    catalogue.start()
    _import_gx_ahead()


def _stream(
    conn: psycopg.Connection,
    plan: _Plan,
    batch_id: int,
    settings: Settings,
    bulk: bool,
    catalogue: _CatalogueStaging,
    result: IngestResult,
) -> _Staged:
    """Classify the file batch by batch and INSERT each batch's valid rows into
    recranker.interactions on a worker thread while the next batch is classified; quarantined
    rows are kept for later. In bulk, the primary key is dropped first and built again at the
    end (a repeat fails that build). A batch found over its failure budget midway stops here."""
    budget = settings.ingest.failure_budget
    staged = _new_staged(plan)
    key = _drop_primary_key(conn) if bulk else None
    statement = _insert_statement(ordered=key is None)
    _register_binary_dumpers(conn)
    with _Inserter(conn) as inserter:
        for classified in _classified_batches(plan, settings, staged):
            # Rows read never outnumber the estimate: past this, the batch is over budget.
            if staged.quarantined > budget * plan.estimate:
                raise _OverBudget
            if classified.valid.any():
                inserter.submit(statement, _insert_params(classified, batch_id))
        inserter.wait()
    _start_helpers(catalogue)
    if key is not None:
        t0 = time.perf_counter()
        _add_primary_key(conn, key, settings.ingest.maintenance_work_mem)
        result.seconds["key"] = round(time.perf_counter() - t0, 3)
    return staged


def _validate(
    conn: psycopg.Connection,
    result: IngestResult,
    staged: _Staged,
    settings: Settings,
    table: bool,
) -> list[ExpectationOutcome]:
    """The staged-batch suite (from the facts gathered while reading) and, for a merged batch,
    the suite over the rows it merged; the latter's results are stored here, in the merge
    transaction. Returns the staged suite's outcomes (_finish_ledger stores them)."""
    from recranker_core.validation.suite import staged_outcomes, table_outcomes

    t0 = time.perf_counter()
    _import_gx_ahead().join()
    outcomes = staged_outcomes(staged.facts, settings.ingest, staged.bounds)
    result.validation = [{"suite": "staged_batch", **o.as_row()} for o in outcomes]
    result.seconds["validate"] = round(time.perf_counter() - t0, 3)
    if table:
        assert result.batch_id is not None
        t0 = time.perf_counter()
        merged = table_outcomes(conn, result.batch_id, result.rows_merged, settings.ingest)
        _insert_validation(conn, result.batch_id, "table", "interactions_table", merged)
        result.validation += [{"suite": "interactions_table", **o.as_row()} for o in merged]
        result.seconds["validate_table"] = round(time.perf_counter() - t0, 3)
    return outcomes


def _budget_message(result: IngestResult, share: float, budget: float) -> str:
    top = ", ".join(f"{reason} {n:,}" for reason, n in list(result.reasons.items())[:5])
    first = result.examples[0] if result.examples else None
    where = (
        f"; first bad row at {result.file_name}, line {first['line']}: "
        f"{', '.join(first['reasons'])}"
        if first
        else ""
    )
    return (
        f"{result.file_name}: {share:.1%} of {result.rows_read:,} rows are bad, over the failure "
        f"budget of {budget:.1%} (RECRANKER_INGEST__FAILURE_BUDGET); nothing was merged. "
        f"Reasons: {top}{where}. All rows are in recranker.quarantine under batch "
        f"{result.batch_id}."
    )
