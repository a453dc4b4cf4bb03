"""How valid rows get into recranker.interactions: INSERTs of binary arrays on a worker thread,
one batch behind classification; the INSERT from staging once repeats are resolved; in bulk, the
primary key dropped and built again."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from recranker_core.db.connect import set_memory
from recranker_core.ingest.staging import _StagingNames
from recranker_core.ingest.timing import _exec
from recranker_core.validation.rules import event_ts_sql, resolve_repeats_sql

if TYPE_CHECKING:
    from recranker_core.validation.classify import Classified

log = logging.getLogger(__name__)


class _Inserter:
    """Runs the merge's INSERTs on a worker thread, one batch behind classification: the server
    inserts a batch while this process types the next (two cores busy, not one then the other).
    Nothing else uses the connection meanwhile. Leaving on an exception (a stop, above all)
    cancels the statement in flight."""

    def __init__(self, conn: psycopg.Connection):
        from concurrent.futures import ThreadPoolExecutor

        self._conn = conn
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="recranker-insert")
        self._pending: Any = None

    def submit(self, statement: sql.Composable, params: tuple[Any, ...]) -> None:
        self.wait()
        self._pending = self._pool.submit(_exec, self._conn, statement, params)

    def wait(self) -> None:
        """Wait for the INSERT in flight; its error, if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> _Inserter:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc is not None and self._pending is not None:
                if not self._pending.done():
                    try:
                        self._conn.cancel_safe(timeout=5.0)
                    except psycopg.Error as error:
                        log.warning("could not cancel the INSERT in flight: %s", error)
                # The exception leaving is the one to see, not the cancelled statement's.
                with contextlib.suppress(BaseException):
                    self._pending.result()
        finally:
            self._pool.shutdown(wait=True)


def _insert_statement(ordered: bool) -> sql.Composable:
    """The INSERT of one batch's valid rows, passed as four arrays in binary form (nothing for
    the server to parse; unnest in the select list streams them without a tuple store). Row by
    row into the primary key, the rows go in key order, for the B-tree's locality."""
    statement: sql.Composable = sql.SQL(
        """INSERT INTO recranker.interactions (user_id, item_id, rating, event_ts, batch_id)
           SELECT u, i, r, t, %b
           FROM (SELECT unnest(%b) u, unnest(%b) i, unnest(%b) r, unnest(%b) t) x"""
    )
    if ordered:
        statement += sql.SQL(' ORDER BY u COLLATE "C", i COLLATE "C", t')
    return statement


class _Binary(bytes):
    """A parameter already in PostgreSQL's binary form (its class's dumper names the type)."""


class _BinaryTextArray(_Binary):
    oid = 1009  # text[]


class _BinaryFloat4Array(_Binary):
    oid = 1021  # real[]


class _BinaryTimestamptzArray(_Binary):
    oid = 1185  # timestamptz[]


def _register_binary_dumpers(conn: psycopg.Connection) -> None:
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    for cls in (_BinaryTextArray, _BinaryFloat4Array, _BinaryTimestamptzArray):
        dumper = type(
            f"{cls.__name__}Dumper",
            (Dumper,),
            {"format": Format.BINARY, "oid": cls.oid, "dump": lambda self, obj: obj},
        )
        conn.adapters.register_dumper(cls, dumper)


def _insert_params(batch: Classified, batch_id: int) -> tuple[Any, ...]:
    """The valid rows of a batch as _insert_statement's parameters."""
    import numpy as np
    import pyarrow as pa

    valid = pa.array(batch.valid)

    def texts(ids: pa.Array) -> _BinaryTextArray:
        return _BinaryTextArray(_text_array(ids.filter(valid)))

    def array(values: Any, element_oid: int, dtype: str) -> bytes:
        n = len(values)
        body = np.empty(n, dtype=[("size", ">i4"), ("value", dtype)])
        body["size"] = np.dtype(dtype).itemsize
        body["value"] = values
        # ndim 1, no nulls, element type, length, lower bound 1; then (size, value) per element.
        return np.array([1, 0, element_oid, n, 1], dtype=">i4").tobytes() + body.tobytes()

    ratings = batch.rating.filter(valid).to_numpy(zero_copy_only=False).astype(np.float32)
    # timestamptz counts microseconds from 2000-01-01.
    micros = batch.event_us.filter(valid).to_numpy(zero_copy_only=False) - 946_684_800_000_000
    return (
        batch_id,
        texts(batch.user_id),
        texts(batch.item_id),
        _BinaryFloat4Array(array(ratings, 700, ">f4")),
        _BinaryTimestamptzArray(array(micros, 1184, ">i8")),
    )


def _text_array(strings: Any) -> bytes:
    """A text[] in binary form from an Arrow string array: per element its length then its
    bytes, laid out with numpy."""
    import numpy as np

    n = len(strings)
    _, offsets_buf, data_buf = strings.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[strings.offset : strings.offset + n + 1]
    offsets = offsets.astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8)[offsets[0] : offsets[-1]]
    offsets -= offsets[0]
    lengths = np.diff(offsets)
    out = np.empty(4 * n + len(data), dtype=np.uint8)
    starts = offsets[:-1] + 4 * np.arange(n)
    out[(starts[:, None] + np.arange(4)).ravel()] = lengths.astype(">i4").view(np.uint8)
    out[np.arange(len(data)) + np.repeat(4 * np.arange(1, n + 1), lengths)] = data
    return np.array([1, 0, 25, n, 1], dtype=">i4").tobytes() + out.tobytes()


def _resolve_and_insert(
    conn: psycopg.Connection,
    names: _StagingNames,
    batch_id: int,
    bulk: bool,
    maintenance_work_mem: str,
) -> None:
    """Mark the staged rows that repeat a stored row or an earlier line as duplicates or
    conflicts, then INSERT the rest. The merge lock keeps the table still meanwhile."""
    classified = _StagingNames.ident(names.classified)
    # Row estimates for the joins of the resolution (hash, not sort-merge).
    _exec(conn, sql.SQL("ANALYZE {}").format(classified))
    for statement in resolve_repeats_sql(classified):
        _exec(conn, statement)
    insert = sql.SQL(
        """INSERT INTO recranker.interactions (user_id, item_id, rating, event_ts, batch_id)
           SELECT user_id, item_id, rating, {event_ts}, %s FROM {c} c
           WHERE outcome = 'merge'"""
    ).format(c=classified, event_ts=event_ts_sql("c"))
    key = _drop_primary_key(conn) if bulk else None
    if key is None:
        order = sql.SQL(' ORDER BY user_id COLLATE "C", item_id COLLATE "C", event_us')
        _exec(conn, insert + order, (batch_id,))
        return
    _exec(conn, insert, (batch_id,))
    _add_primary_key(conn, key, maintenance_work_mem)


def _add_primary_key(
    conn: psycopg.Connection, key: tuple[str, str], maintenance_work_mem: str
) -> None:
    """Build the primary key dropped by _drop_primary_key again (one sort of the table; a
    repeat fails it with a unique violation)."""
    set_memory(conn, "maintenance_work_mem", maintenance_work_mem)
    name, definition = key
    _exec(
        conn,
        sql.SQL("ALTER TABLE recranker.interactions ADD CONSTRAINT {} {}").format(
            sql.Identifier(name), sql.SQL(definition)
        ),
    )


def _stored_at_most(conn: psycopg.Connection, rows: int) -> bool:
    """Whether recranker.interactions holds at most `rows` rows: the statistics' estimate, or a
    count bounded by `rows` where there is none yet."""
    row = conn.execute(
        """SELECT greatest(c.reltuples, pg_stat_get_live_tuples(c.oid))::bigint
           FROM pg_class c WHERE c.oid = 'recranker.interactions'::regclass"""
    ).fetchone()
    estimate = int(row[0]) if row else 0
    if estimate > 0:
        return estimate <= rows
    counted = conn.execute(
        "SELECT count(*) FROM (SELECT 1 FROM recranker.interactions LIMIT %s) s", (rows + 1,)
    ).fetchone()
    return counted is not None and int(counted[0]) <= rows


def _drop_primary_key(conn: psycopg.Connection) -> tuple[str, str] | None:
    """Lock recranker.interactions and drop its primary key (restored by the caller in the same
    transaction); None, with nothing changed, when the table is in use by others for more than a
    moment: readers are never kept waiting behind a bulk load."""
    try:
        with conn.transaction():
            conn.execute("SET LOCAL lock_timeout = '2s'")
            conn.execute("LOCK TABLE recranker.interactions IN ACCESS EXCLUSIVE MODE")
    except psycopg.errors.LockNotAvailable:
        log.info("recranker.interactions is in use; inserting into its primary key as it stands")
        return None
    conn.execute("SET LOCAL lock_timeout TO DEFAULT")
    row = conn.execute(
        """SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
           WHERE conrelid = 'recranker.interactions'::regclass AND contype = 'p'"""
    ).fetchone()
    if row is None:
        return None
    conn.execute(
        sql.SQL("ALTER TABLE recranker.interactions DROP CONSTRAINT {}").format(
            sql.Identifier(row[0])
        )
    )
    return str(row[0]), str(row[1])
