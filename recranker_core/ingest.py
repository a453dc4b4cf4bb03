"""Ingest: one interaction file becomes one batch. Stage it by COPY, type and classify every row
(merge, duplicate, quarantine), validate with Great Expectations, then merge, quarantine and write
the ledger in one transaction. A re-run of the same content is a no-op."""

from __future__ import annotations

import csv
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import psycopg
from psycopg import sql

from recranker_core.config import Settings
from recranker_core.datasets.sources import (
    Header,
    SourceFile,
    discover,
    map_header,
    read_items,
    read_users,
    sha256_file,
)
from recranker_core.db.connect import connect
from recranker_core.errors import DataError, ValidationFailed
from recranker_core.interrupts import stop_reason
from recranker_core.validation.rules import StagedColumns, classify_sql, resolve_repeats_sql
from recranker_core.validation.suite import ExpectationOutcome, validate_staged, validate_table

log = logging.getLogger(__name__)

STAGING_SCHEMA = "recranker_staging"
_COPY_CHUNK = 1 << 20
_LEDGER_LOCK = 7_310_002
# The steps of an ingest, as IngestResult.seconds names them when each is done.
_STAGES = ("hash", "stage", "classify", "validate", "merge", "validate_table")


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
    results = []
    for src in files:
        try:
            results.append(ingest_file(src, settings, database_url))
        except ValidationFailed as exc:
            results.append(exc.args[1])  # ingest_file always attaches its result
    return results


def ingest_file(src: SourceFile, settings: Settings, database_url: str) -> IngestResult:
    """Ingest one file as one batch; see the module docstring for the steps.

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
    with connect(database_url, autocommit=True, application_name="recranker-ingest") as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        # Sorts and hashes over a whole batch stay in memory instead of spilling to disk.
        conn.execute(sql.SQL("SET work_mem = {}").format(sql.Literal(settings.ingest.work_mem)))
        # JIT compiles the classification for seconds and saves less than it costs here.
        conn.execute("SET jit = off")
        sweep_staging(conn)
        previous = _merged_batch(conn, content_hash)
        if previous is not None:
            return _already(result, previous)
        names = _StagingNames.new()
        try:
            try:
                cols = _stage(conn, src, names, result)
                timer.lap(result, "stage")
                items, users = _stage_catalogue(conn, src, names)
                # Row estimates for the classification's joins (hash, not sort-merge).
                conn.execute(sql.SQL("ANALYZE {}").format(names.ident(names.staging)))
                result.rows_read = _count(conn, names.staging)
                if result.rows_read == 0:
                    raise DataError(f"{src.path}: the file has a header but no data rows")
                with conn.transaction():
                    conn.execute(
                        classify_sql(
                            names.ident(names.staging),
                            names.ident(names.items) if items else None,
                            names.ident(names.classified),
                            cols,
                            settings.ingest,
                        )
                    )
                    _mark_owner(conn, names.classified)
                    conn.execute(sql.SQL("ANALYZE {}").format(names.ident(names.classified)))
                timer.lap(result, "classify")
            except DataError as exc:
                _record_rejection(conn, result, started, str(exc))
            outcomes = validate_staged(
                database_url, STAGING_SCHEMA, names.classified, settings.ingest
            )
            result.validation = [{"suite": "staged_batch", **o.as_row()} for o in outcomes]
            timer.lap(result, "validate")
            _merge(conn, result, names, cols, bool(items), bool(users), settings, started, outcomes)
            timer.lap(result, "merge")
        except BaseException as exc:
            if stop_reason(exc) is not None:
                _settle(conn)
            raise
        finally:
            # Never let the clean-up hide what is propagating (a stop, above all): a table that
            # cannot be dropped now is swept by the next ingest.
            _drop_staging(conn, names)
    if result.status == "already_ingested":
        return result
    if result.status == "rejected":
        raise ValidationFailed(result.error, result)
    table = validate_table(database_url, settings.ingest)
    _store_validation(database_url, result.batch_id, "table", "interactions_table", table)
    result.validation += [{"suite": "interactions_table", **o.as_row()} for o in table]
    timer.lap(result, "validate_table")
    log.info(result.summary())
    return result


def _exec(conn: psycopg.Connection, statement: Any, params: Any = None) -> psycopg.Cursor[Any]:
    """Execute, and log statements slow enough for an operator to wonder where the time went."""
    t0 = time.perf_counter()
    cur = conn.execute(statement, params)
    took = time.perf_counter() - t0
    if took > 1.0:
        text = statement.as_string(conn) if isinstance(statement, sql.Composable) else statement
        log.info("%.1fs, %s rows: %s", took, cur.rowcount, " ".join(text.split())[:90])
    return cur


class _Timer:
    def __init__(self) -> None:
        self._t = time.perf_counter()

    def lap(self, result: IngestResult, name: str) -> None:
        now = time.perf_counter()
        result.seconds[name] = round(now - self._t, 3)
        self._t = now


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


def _create_table(conn: psycopg.Connection, name: str, columns: sql.Composable) -> None:
    """Create a staging table and mark it as this session's (call inside a transaction, so that
    no committed staging table is ever without its owner)."""
    conn.execute(
        sql.SQL("CREATE UNLOGGED TABLE {} ({})").format(_StagingNames.ident(name), columns)
    )
    _mark_owner(conn, name)


def _mark_owner(conn: psycopg.Connection, name: str) -> None:
    conn.execute(
        sql.SQL("COMMENT ON TABLE {} IS {}").format(
            _StagingNames.ident(name), sql.Literal(f"pid={conn.info.backend_pid}")
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
    stage = next((s for s in _STAGES if s not in result.seconds), "validate_table")
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


# ---------------------------------------------------------------------------------------------
# Staging


def _one_line_per_record(src: SourceFile) -> bool:
    """MovieLens atomic files and TSV have no quoting: a physical line is a record, and a `"` is
    an ordinary character. CSV follows RFC 4180 (quoted fields may hold delimiters and line
    breaks)."""
    return src.fmt == "movielens" or src.delimiter == "\t"


def _split_line(text: str, delimiter: str, by_line: bool) -> list[str]:
    if by_line:
        return text.split(delimiter)
    return next(csv.reader([text], delimiter=delimiter, strict=True))


def _strip_eol(raw: bytes) -> bytes:
    """The line without its terminator (LF or CRLF); any other CR is part of the line."""
    return raw.removesuffix(b"\n").removesuffix(b"\r")


def _read_header(src: SourceFile) -> Header:
    with src.path.open("rb") as fh:
        first = fh.readline()
    if not first:
        raise DataError(f"{src.path}: the file is empty")
    try:
        text = _strip_eol(first).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{src.path}, line 1: the header is not UTF-8 ({exc.reason})") from exc
    try:
        columns = _split_line(text, src.delimiter, _one_line_per_record(src))
    except (csv.Error, StopIteration) as exc:
        raise DataError(f"{src.path}, line 1: the header is not valid CSV ({exc})") from exc
    return map_header(columns, str(src.path))


# COPY's CSV mode with a quote character no accepted file holds: every line is one record and
# `"` is data. (Text mode would not do: it reads backslashes as escapes, so `\N` would become
# NULL and `a\tb` a tab.) A file holding this byte is read line by line instead.
_NO_QUOTE = "\x01"
_BLANK = b" \t\r\n\x0b\x0c"
# A line that is only `\.` ends COPY's data in CSV mode (PostgreSQL before 18) and the rest of
# the file would be dropped without a word: such a file is read line by line.
_END_OF_DATA = re.compile(rb"\n\\\.\r?\n")


@dataclass(frozen=True)
class _Layout:
    """What a pass over the bytes tells before staging: where the data ends (trailing blank lines
    are not records), how many physical lines it has after the header, and whether COPY can be
    trusted with it."""

    data_end: int
    data_lines: int
    trailing_blank_lines: int
    has_no_quote_byte: bool
    has_end_of_data_line: bool


def _scan(path: Path, chunk: int = 8 << 20) -> _Layout:
    header_end: int | None = None
    last_content = 0  # offset just after the last byte that is not blank
    newlines = 0
    no_quote = end_of_data = False
    carry = b"\n"
    offset = 0
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            if header_end is None and (nl := block.find(b"\n")) >= 0:
                header_end = offset + nl + 1
            content = block.rstrip(_BLANK)
            if content:
                last_content = offset + len(content)
            newlines += block.count(b"\n")
            no_quote = no_quote or _NO_QUOTE.encode() in block
            end_of_data = end_of_data or bool(_END_OF_DATA.search(carry + block))
            carry = (carry + block)[-4:]
            offset += len(block)
        end_of_data = end_of_data or bool(_END_OF_DATA.search(carry + b"\n"))
        if header_end is None or last_content <= header_end:
            return _Layout(header_end or offset, 0, 0, no_quote, end_of_data)
        # The data ends with the line break that follows its last non-blank byte; what comes
        # after it is blank lines.
        fh.seek(last_content)
        tail = fh.read()
    nl = tail.find(b"\n")
    if nl < 0:  # the last line has no line break
        return _Layout(offset, newlines, 0, no_quote, end_of_data)
    blank = tail[nl + 1 :]
    blank_lines = blank.count(b"\n") + (1 if blank and not blank.endswith(b"\n") else 0)
    data_lines = newlines - 1 - blank.count(b"\n")
    return _Layout(last_content + nl + 1, data_lines, blank_lines, no_quote, end_of_data)


def _staged_columns(header: Header, delimiter: str) -> StagedColumns:
    pos = header.positions
    return StagedColumns(
        user_id=pos["user_id"],
        item_id=pos["item_id"],
        rating=pos["rating"],
        timestamp=pos["timestamp"],
        count=len(header.columns),
        delimiter=delimiter,
    )


def _staging_columns(ncols: int, first_line: int) -> sql.Composable:
    return sql.SQL(", ").join(
        [
            sql.SQL("line bigint GENERATED BY DEFAULT AS IDENTITY (START {})").format(
                sql.Literal(first_line)
            )
        ]
        + [sql.SQL("{} text").format(sql.Identifier(f"c{i}")) for i in range(ncols)]
        + [sql.SQL("parse_error text"), sql.SQL("raw text")]
    )


class _ReadByLine(Exception):
    """COPY's reading of the file cannot be trusted; the line-by-line reader takes over."""


def _stage(
    conn: psycopg.Connection, src: SourceFile, names: _StagingNames, result: IngestResult
) -> StagedColumns:
    """COPY the file into a text staging table; lines COPY cannot take go through a slower
    line-by-line reader that keeps each bad line with its reason."""
    if src.fmt == "parquet":
        return _stage_parquet(conn, src, names)
    header = _read_header(src)
    cols = _staged_columns(header, src.delimiter)
    by_line = _one_line_per_record(src)
    layout = _scan(src.path)
    result.trailing_blank_lines = layout.trailing_blank_lines
    if layout.trailing_blank_lines:
        log.info(
            "%s: %d blank line(s) at the end of the file are not records",
            src.path,
            layout.trailing_blank_lines,
        )
    options = [sql.SQL("FORMAT csv, HEADER true, DELIMITER {}").format(sql.Literal(src.delimiter))]
    if by_line:
        options.append(sql.SQL("QUOTE {}").format(sql.Literal(_NO_QUOTE)))
    target = sql.SQL("{} ({})").format(
        _StagingNames.ident(names.staging),
        sql.SQL(", ").join(sql.Identifier(f"c{i}") for i in range(cols.count)),
    )
    try:
        if layout.has_end_of_data_line:
            raise _ReadByLine("a line holds only \\., which COPY would take as the end")
        if by_line and layout.has_no_quote_byte:
            raise _ReadByLine("the file holds the byte 0x01")
        with conn.transaction():
            _create_table(conn, names.staging, _staging_columns(cols.count, 2))
            with (
                conn.cursor() as cur,
                cur.copy(
                    sql.SQL("COPY {} FROM STDIN ({})").format(target, sql.SQL(", ").join(options))
                ) as copy,
                src.path.open("rb") as fh,
            ):
                left = layout.data_end
                while left > 0 and (block := fh.read(min(_COPY_CHUNK, left))):
                    copy.write(block)
                    left -= len(block)
            if by_line and (staged := _count(conn, names.staging)) != layout.data_lines:
                # One record per line is the contract of these formats; never trust less.
                raise _ReadByLine(f"COPY read {staged:,} records from {layout.data_lines:,} lines")
        return cols
    except psycopg.errors.DataError as exc:
        log.info(
            "%s: COPY refused the file (%s); reading it line by line",
            src.path,
            str(exc).splitlines()[0],
        )
    except _ReadByLine as exc:
        log.info("%s: %s; reading it line by line", src.path, exc)
    with conn.transaction():
        _create_table(conn, names.staging, _staging_columns(cols.count, 2))
        _stage_line_by_line(conn, src, names, cols.count, by_line, layout.data_end)
    return cols


def _stage_line_by_line(
    conn: psycopg.Connection,
    src: SourceFile,
    names: _StagingNames,
    ncols: int,
    by_line: bool,
    data_end: int,
) -> None:
    columns = sql.SQL(", ").join(
        [sql.Identifier("line")]
        + [sql.Identifier(f"c{i}") for i in range(ncols)]
        + [sql.Identifier("parse_error"), sql.Identifier("raw")]
    )
    empty = (None,) * ncols
    with (
        conn.cursor() as cur,
        cur.copy(
            sql.SQL("COPY {} ({}) FROM STDIN").format(_StagingNames.ident(names.staging), columns)
        ) as copy,
    ):
        for line_no, fields, error, raw in _read_lines(
            src.path, src.delimiter, ncols, by_line, data_end
        ):
            if error is None:
                copy.write_row((line_no, *fields, None, None))
            else:
                copy.write_row((line_no, *empty, error, raw))


def _read_lines(
    path: Path, delimiter: str, ncols: int, by_line: bool, data_end: int
) -> Iterator[tuple[int, list[str], str | None, str | None]]:
    """(line, fields, error, raw) for every physical line after the header, up to `data_end`
    (the trailing blank lines are not records). With `by_line` a line is split at every
    delimiter (no quoting); otherwise as one CSV record."""
    with path.open("rb") as fh:
        offset = len(fh.readline())
        for line_no, raw_line in enumerate(fh, start=2):
            if offset >= data_end:
                break
            offset += len(raw_line)
            stripped = _strip_eol(raw_line)
            try:
                text = stripped.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, [], "invalid_utf8", stripped.decode("utf-8", "backslashreplace")
                continue
            if "\x00" in text:
                yield line_no, [], "nul_byte", text.replace("\x00", "\\x00")
                continue
            if not text.strip():
                yield line_no, [], "empty_line", text
                continue
            try:
                fields = _split_line(text, delimiter, by_line)
            except csv.Error:
                yield line_no, [], "malformed_csv", text
                continue
            if len(fields) != ncols:
                yield line_no, [], "wrong_field_count", text
                continue
            yield line_no, fields, None, None


def _stage_parquet(
    conn: psycopg.Connection, src: SourceFile, names: _StagingNames
) -> StagedColumns:
    import io

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(src.path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{src.path}: not a readable Parquet file ({exc})") from exc
    header = map_header(list(pfile.schema_arrow.names), str(src.path))
    wanted = [
        header.columns[header.positions[f]] for f in ("user_id", "item_id", "rating", "timestamp")
    ]
    cols = StagedColumns(user_id=0, item_id=1, rating=2, timestamp=3, count=4, delimiter=",")
    with conn.transaction():
        _create_table(conn, names.staging, _staging_columns(4, 1))
        target = sql.SQL("{} (c0, c1, c2, c3)").format(_StagingNames.ident(names.staging))
        with (
            conn.cursor() as cur,
            cur.copy(sql.SQL("COPY {} FROM STDIN (FORMAT csv)").format(target)) as copy,
        ):
            for batch in pfile.iter_batches(columns=wanted, batch_size=200_000):
                arrays = list(batch.columns)
                ts = arrays[3]
                if pa.types.is_timestamp(ts.type):
                    # Unix seconds, the form the classifier reads fastest.
                    arrays[3] = pc.divide(
                        pc.cast(pc.cast(ts, pa.timestamp("us", "UTC")), pa.int64()), 1_000_000.0
                    )
                table = pa.table(
                    [pc.cast(a, pa.string()) for a in arrays], names=["c0", "c1", "c2", "c3"]
                )
                buf = io.BytesIO()
                pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=False))
                copy.write(buf.getvalue())
    return cols


def _stage_catalogue(
    conn: psycopg.Connection, src: SourceFile, names: _StagingNames
) -> tuple[int, int]:
    """Stage the batch's item and user files (small), so rows can refer to items they add."""
    n_items = n_users = 0
    with conn.transaction():
        if src.items_path is not None:
            items = read_items(src.items_path)
            _create_table(
                conn,
                names.items,
                sql.SQL(
                    "item_id text PRIMARY KEY, title text, year integer, genres text[], "
                    "attributes jsonb"
                ),
            )
            with (
                conn.cursor() as cur,
                cur.copy(
                    sql.SQL("COPY {} FROM STDIN").format(_StagingNames.ident(names.items))
                ) as copy,
            ):
                for it in {i.item_id: i for i in items}.values():
                    copy.write_row(
                        (it.item_id, it.title, it.year, it.genres, json.dumps(it.attributes))
                    )
            n_items = len(items)
        if src.users_path is not None:
            users = read_users(src.users_path)
            _create_table(conn, names.users, sql.SQL("user_id text PRIMARY KEY, attributes jsonb"))
            with (
                conn.cursor() as cur,
                cur.copy(
                    sql.SQL("COPY {} FROM STDIN").format(_StagingNames.ident(names.users))
                ) as copy,
            ):
                for us in {u.user_id: u for u in users}.values():
                    copy.write_row((us.user_id, json.dumps(us.attributes)))
            n_users = len(users)
    return n_items, n_users


# ---------------------------------------------------------------------------------------------
# Ledger and merge


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
    row = conn.execute(
        """INSERT INTO recranker.ingest_batches
               (source, file_name, content_hash, format, status, started_at)
           VALUES (%s, %s, %s, %s, %s, %s) RETURNING batch_id""",
        (
            result.source,
            result.file_name,
            result.content_hash,
            result.format,
            result.status,
            started,
        ),
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
    result.rows_read = 0
    with conn.transaction():
        result.batch_id = _insert_ledger(conn, result, started)
        conn.execute(
            "UPDATE recranker.ingest_batches SET error = %s WHERE batch_id = %s",
            (error, result.batch_id),
        )
    log.error(result.summary())
    raise ValidationFailed(error, result)


class _OverBudget(Exception):
    """Raised inside the merge transaction to undo it when repeats push a batch over budget."""


def _merge(
    conn: psycopg.Connection,
    result: IngestResult,
    names: _StagingNames,
    cols: StagedColumns,
    has_items: bool,
    has_users: bool,
    settings: Settings,
    started: datetime,
    outcomes: list[ExpectationOutcome],
) -> None:
    classified = _StagingNames.ident(names.classified)
    budget = settings.ingest.failure_budget
    try:
        with conn.transaction():
            if not _lock_and_check(conn, result):
                return
            bad = _count_outcome(conn, classified, "quarantine")
            if bad / result.rows_read > budget:
                raise _OverBudget
            batch_id = result.batch_id = _insert_ledger(conn, result, started)
            _insert_interactions(conn, classified, batch_id)
            counts = dict(
                _exec(
                    conn,
                    sql.SQL("SELECT outcome, count(*) FROM {} GROUP BY outcome").format(classified),
                ).fetchall()
            )
            result.rows_quarantined = int(counts.get("quarantine", 0))
            if result.rows_quarantined / result.rows_read > budget:
                raise _OverBudget
            result.rows_merged = int(counts.get("merge", 0))
            result.rows_duplicate = int(counts.get("duplicate", 0))
            _quarantine(conn, names, cols, batch_id, everything=False)
            result.items_upserted = _upsert_items(
                conn, names, has_items, classified, batch_id, settings.ingest.auto_create_items
            )
            result.users_upserted = _upsert_users(conn, names, has_users, classified, batch_id)
            _describe_quarantine(conn, result, names, cols)
            _finish_ledger(conn, result, outcomes)
        return
    except _OverBudget:
        pass
    # Rejected: a fresh transaction records the batch with every row in quarantine.
    with conn.transaction():
        if not _lock_and_check(conn, result):
            return
        for statement in resolve_repeats_sql(classified):
            _exec(conn, statement)  # so that conflicts carry their reason too
        result.status = "rejected"
        batch_id = result.batch_id = _insert_ledger(conn, result, started)
        result.rows_merged = result.rows_duplicate = 0
        share = _count_outcome(conn, classified, "quarantine") / result.rows_read
        _quarantine(conn, names, cols, batch_id, everything=True)
        result.rows_quarantined = result.rows_read
        _describe_quarantine(conn, result, names, cols)
        result.error = _budget_message(result, share, budget)
        _finish_ledger(conn, result, outcomes)


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


def _count_outcome(conn: psycopg.Connection, classified: sql.Identifier, outcome: str) -> int:
    row = _exec(
        conn, sql.SQL("SELECT count(*) FROM {} WHERE outcome = %s").format(classified), (outcome,)
    ).fetchone()
    return int(row[0]) if row else 0


def _describe_quarantine(
    conn: psycopg.Connection, result: IngestResult, names: _StagingNames, cols: StagedColumns
) -> None:
    """Counts per reason and the first line of each reason combination, for messages."""
    classified = _StagingNames.ident(names.classified)
    result.reasons = dict(
        _exec(
            conn,
            sql.SQL(
                """SELECT r, count(*) FROM {}, unnest(reasons) r WHERE outcome = 'quarantine'
           GROUP BY r ORDER BY 2 DESC, 1"""
            ).format(classified),
        ).fetchall()
    )
    result.examples = [
        {"line": line, "reasons": reasons, "raw": raw[:200]}
        for line, reasons, raw in _exec(
            conn,
            sql.SQL(
                """SELECT q.line, q.reasons, {raw}
               FROM (SELECT DISTINCT ON (reasons) line, reasons FROM {c}
                     WHERE outcome = 'quarantine' ORDER BY reasons, line) q
               JOIN {s} s USING (line)
               ORDER BY q.line LIMIT 10"""
            ).format(c=classified, s=_StagingNames.ident(names.staging), raw=_raw_sql(cols)),
        )
    ]


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


def _insert_interactions(
    conn: psycopg.Connection, classified: sql.Identifier, batch_id: int
) -> None:
    """Insert the valid rows, resolving repeats only when there are any.

    Most batches repeat nothing, so the insert is tried as is first: a plain insert into the
    primary key is about twice as fast as ON CONFLICT. A unique violation means some rows repeat
    a stored row or an earlier line; the insert is undone to its savepoint, those rows are marked
    duplicate or conflict, and the rest is inserted. The merge lock keeps the table still.
    """
    insert = sql.SQL("""INSERT INTO recranker.interactions
                            (user_id, item_id, rating, event_ts, batch_id)
                        SELECT user_id, item_id, rating, event_ts, %s FROM {}
                        WHERE outcome = 'merge'
                        ORDER BY user_id COLLATE "C", item_id COLLATE "C", event_ts""").format(
        classified
    )
    try:
        with conn.transaction():
            _exec(conn, insert, (batch_id,))
        return
    except psycopg.errors.UniqueViolation:
        log.info("the batch repeats stored rows or its own lines; resolving the repeats")
    for statement in resolve_repeats_sql(classified):
        _exec(conn, statement)
    _exec(conn, insert, (batch_id,))


def _raw_sql(cols: StagedColumns) -> sql.Composable:
    """The staged line as text: kept verbatim for lines the reader could not split, rebuilt from
    the fields otherwise (only ever computed for quarantined rows)."""
    fields = sql.SQL(", ").join(
        sql.SQL("coalesce(s.{}, '')").format(sql.Identifier(f"c{i}")) for i in range(cols.count)
    )
    return sql.SQL("coalesce(s.raw, concat_ws({}, {}))").format(sql.Literal(cols.delimiter), fields)


def _quarantine(
    conn: psycopg.Connection,
    names: _StagingNames,
    cols: StagedColumns,
    batch_id: int,
    everything: bool,
) -> None:
    _exec(
        conn,
        sql.SQL("""INSERT INTO recranker.quarantine (batch_id, line, raw, reasons)
                   SELECT %s, c.line, {raw},
                          CASE WHEN cardinality(c.reasons) = 0 THEN ARRAY['batch_rejected']
                               ELSE c.reasons END
                   FROM {c} c JOIN {s} s USING (line)
                   WHERE {which}""").format(
            raw=_raw_sql(cols),
            c=_StagingNames.ident(names.classified),
            s=_StagingNames.ident(names.staging),
            which=sql.SQL("true" if everything else "c.outcome = 'quarantine'"),
        ),
        (batch_id,),
    )


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


def _upsert_items(
    conn: psycopg.Connection,
    names: _StagingNames,
    has_items: bool,
    classified: sql.Composable,
    batch_id: int,
    auto_create: bool,
) -> int:
    n = 0
    if has_items:
        n += _exec(
            conn,
            sql.SQL("""INSERT INTO recranker.items
                           (item_id, title, year, genres, attributes, first_batch_id)
                       SELECT item_id, title, year, coalesce(genres, '{{}}'), attributes, %s
                       FROM {} ORDER BY item_id
                       ON CONFLICT (item_id) DO UPDATE
                       SET title = EXCLUDED.title, year = EXCLUDED.year,
                           genres = EXCLUDED.genres, attributes = EXCLUDED.attributes,
                           updated_at = now()
                       WHERE (items.title, items.year, items.genres, items.attributes)
                             IS DISTINCT FROM (EXCLUDED.title, EXCLUDED.year, EXCLUDED.genres,
                                               EXCLUDED.attributes)""").format(
                _StagingNames.ident(names.items)
            ),
            (batch_id,),
        ).rowcount
    if auto_create:
        n += _insert_new_ids(conn, "items", "item_id", classified, batch_id)
    return n


def _insert_new_ids(
    conn: psycopg.Connection, table: str, column: str, classified: sql.Composable, batch_id: int
) -> int:
    """Create the users or items that merged rows name and the table does not have yet."""
    return _exec(
        conn,
        sql.SQL("""INSERT INTO {table} ({col}, first_batch_id)
                   SELECT DISTINCT {col}, %s::bigint FROM {c} WHERE outcome = 'merge'
                   ON CONFLICT ({col}) DO NOTHING""").format(
            table=sql.Identifier("recranker", table), col=sql.Identifier(column), c=classified
        ),
        (batch_id,),
    ).rowcount


def _upsert_users(
    conn: psycopg.Connection,
    names: _StagingNames,
    has_users: bool,
    classified: sql.Composable,
    batch_id: int,
) -> int:
    n = 0
    if has_users:
        n += _exec(
            conn,
            sql.SQL("""INSERT INTO recranker.users (user_id, attributes, first_batch_id)
                       SELECT user_id, attributes, %s FROM {} ORDER BY user_id
                       ON CONFLICT (user_id) DO UPDATE
                       SET attributes = EXCLUDED.attributes, updated_at = now()
                       WHERE users.attributes IS DISTINCT FROM EXCLUDED.attributes""").format(
                _StagingNames.ident(names.users)
            ),
            (batch_id,),
        ).rowcount
    return n + _insert_new_ids(conn, "users", "user_id", classified, batch_id)


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


def _store_validation(
    database_url: str,
    batch_id: int | None,
    stage: str,
    suite: str,
    outcomes: list[ExpectationOutcome],
) -> None:
    if batch_id is None:
        return
    with connect(database_url) as conn, conn.transaction():
        _insert_validation(conn, batch_id, stage, suite, outcomes)


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
