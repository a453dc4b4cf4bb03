"""Ingest: one interaction file becomes one batch. In one transaction, read it once, typing and
classifying every row (merge or quarantine, with reasons) batch by batch and inserting the valid
rows as it goes (repeats send the batch through a staging table, where they become duplicates or
quarantined conflicts); then quarantine the rest, validate with Great Expectations and write the
ledger. A re-run of the same content is a no-op."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import re
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

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
from recranker_core.db.connect import connect, set_memory
from recranker_core.errors import DataError, ValidationFailed
from recranker_core.interrupts import stop_reason
from recranker_core.validation.rules import StagedColumns, event_ts_sql, resolve_repeats_sql
from recranker_core.validation.suite import ExpectationOutcome

if TYPE_CHECKING:
    import pyarrow as pa

    from recranker_core.validation.classify import Classified, Clock, Lookups
    from recranker_core.validation.suite import StagedBounds, SuiteFacts

log = logging.getLogger(__name__)

STAGING_SCHEMA = "recranker_staging"
_COPY_CHUNK = 1 << 20
# Bytes of a file per batch: small enough that the first batch is soon inserted and the server
# and this process take turns often, large enough that a statement's overhead does not count.
_READ_BLOCK = 4 << 20
_LEDGER_LOCK = 7_310_002
# The steps of an ingest, as IngestResult.seconds names them when each is done: the merge reads,
# classifies and inserts in one pass. Parts of the merge are added as they end: `classify` (the
# time spent typing rows), `key` (a primary key built again), `validate` and `validate_table`.
_STAGES = ("hash", "stage", "merge")


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


def _exec(conn: psycopg.Connection, statement: Any, params: Any = None) -> psycopg.Cursor[Any]:
    """Execute, and log statements slow enough for an operator to wonder where the time went."""
    t0 = time.perf_counter()
    cur = conn.execute(statement, params)
    took = time.perf_counter() - t0
    if took > 1.0:
        text = statement.as_string(conn) if isinstance(statement, sql.Composable) else statement
        log.info("%.1fs, %s rows: %s", took, cur.rowcount, " ".join(text.split())[:90])
    return cur


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
# An empty line: a line break right after another (the first one is the carried-over byte).
_EMPTY_LINE = re.compile(rb"\n\r?\n")


@dataclass(frozen=True)
class _Layout:
    """What a pass over the bytes tells before staging: where the data ends (trailing blank lines
    are not records), how many physical lines it has after the header, and which reader can be
    trusted with it."""

    data_end: int
    data_lines: int
    trailing_blank_lines: int
    has_no_quote_byte: bool
    has_end_of_data_line: bool
    has_quote: bool = False
    has_nul: bool = False
    has_empty_line: bool = False  # an empty line among the data (COPY refuses it)
    # Every line break is LF, or every one is CRLF (and no other CR): COPY and the fast reader
    # then cut lines in the same places.
    line_breaks_alike: bool = True


def _scan(path: Path, chunk: int = 8 << 20) -> _Layout:
    header_end: int | None = None
    last_content = 0  # offset just after the last byte that is not blank
    newlines = carriage_returns = crlf = 0
    no_quote = end_of_data = quote = nul = False
    first_empty: int | None = None  # offset of the line break before the first empty line
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
            carriage_returns += block.count(b"\r")
            crlf += block.count(b"\r\n") + (carry.endswith(b"\r") and block.startswith(b"\n"))
            no_quote = no_quote or _NO_QUOTE.encode() in block
            quote = quote or b'"' in block
            nul = nul or b"\x00" in block
            end_of_data = end_of_data or bool(_END_OF_DATA.search(carry + block))
            if first_empty is None and (m := _EMPTY_LINE.search(carry + block, 1)):
                first_empty = offset - len(carry) + m.start()
            carry = (carry + block)[-4:]
            offset += len(block)
        end_of_data = end_of_data or bool(_END_OF_DATA.search(carry + b"\n"))
        alike = carriage_returns == 0 or carriage_returns == crlf == newlines
        flags = {"has_quote": quote, "has_nul": nul, "line_breaks_alike": alike}
        if header_end is None or last_content <= header_end:
            return _Layout(header_end or offset, 0, 0, no_quote, end_of_data, **flags)
        # An empty line before the last non-blank byte lies among the data (after it, it is one
        # of the trailing blank lines).
        flags["has_empty_line"] = first_empty is not None and first_empty < last_content
        # The data ends with the line break that follows its last non-blank byte; what comes
        # after it is blank lines.
        fh.seek(last_content)
        tail = fh.read()
    nl = tail.find(b"\n")
    if nl < 0:  # the last line has no line break
        return _Layout(offset, newlines, 0, no_quote, end_of_data, **flags)
    blank = tail[nl + 1 :]
    blank_lines = blank.count(b"\n") + (1 if blank and not blank.endswith(b"\n") else 0)
    data_lines = newlines - 1 - blank.count(b"\n")
    return _Layout(last_content + nl + 1, data_lines, blank_lines, no_quote, end_of_data, **flags)


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


# The classified rows: valid rows arrive with line, ids, rating and event_us only (the defaults
# say 'merge' and no reasons); quarantined rows with line, outcome, reasons and raw.
_CLASSIFIED_COLUMNS = sql.SQL(
    """line bigint NOT NULL, user_id text COLLATE "C", item_id text COLLATE "C", rating real,
       event_us bigint, outcome text NOT NULL DEFAULT 'merge',
       reasons text[] NOT NULL DEFAULT '{}', raw text"""
)


class _ReadByLine(Exception):
    """The fast reader cannot be trusted with the file; the line-by-line reader takes over."""


@dataclass
class _Reader:
    """Where a file's records come from, as Arrow batches of text fields (columns line, c0, c1,
    ..., parse_error, raw); `batches()` can be called again (the raw text of some rows is read a
    second time on the rare paths that need it)."""

    kind: str  # fast | staged | lines | parquet
    batches: Callable[[], Iterator[pa.RecordBatch]]
    cols: StagedColumns
    layout: _Layout | None = None  # None for Parquet


@dataclass
class _Staged:
    """What classification learnt while reading a file (all the merge needs without a rescan)."""

    reader: _Reader
    bounds: StagedBounds
    facts: SuiteFacts
    rows: int = 0
    valid: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    # Per combination of reasons, its first line and that line's text.
    examples: dict[int, tuple[int, str]] = field(default_factory=dict)
    users: list[pa.Array] = field(default_factory=list)  # distinct ids of valid rows, per batch
    items: list[pa.Array] = field(default_factory=list)
    # The quarantined rows (line, outcome, reasons as a text[] literal, raw), per batch.
    quarantine: list[pa.Table] = field(default_factory=list)
    classify_s: float = 0.0  # time spent typing and classifying

    @property
    def quarantined(self) -> int:
        return self.rows - self.valid

    def distinct(self, which: str) -> list[str]:
        import pyarrow as pa
        import pyarrow.compute as pc

        parts = self.users if which == "users" else self.items
        if not parts:
            return []
        return pc.unique(pa.concat_arrays(parts)).to_pylist()

    def described(self) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """Counts per reason and the first line of each reason combination (the first ten), as
        _describe_quarantine gives them."""
        from recranker_core.validation.classify import reasons_of_key

        reasons = dict(sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])))
        firsts = sorted((line, key, raw) for key, (line, raw) in self.examples.items())[:10]
        examples = [
            {"line": line, "reasons": reasons_of_key(key), "raw": raw[:200]}
            for line, key, raw in firsts
        ]
        return reasons, examples


@dataclass
class _Plan:
    """How a file is read and classified, set up before the merge: the reader, the database's
    answers (clock, item lookups, ISO 8601 text) and the bounds of the staged suite."""

    src: SourceFile
    reader: _Reader
    clock: Clock
    lookups: Lookups
    bounds: StagedBounds
    estimate: int  # at most this many rows: physical lines after the header, or Parquet rows

    def read(self, conn: psycopg.Connection, work: Callable[[], _Staged]) -> _Staged:
        """Run `work` (a pass over the reader's batches) in a savepoint; if the fast reader gives
        up midway, undo it and run it again over the line-by-line reader."""
        while True:
            try:
                with conn.transaction():
                    return work()
            except _ReadByLine as exc:
                assert self.reader.layout is not None  # only the fast reader gives up midway
                log.info("%s: %s; reading it line by line", self.src.path, exc)
                self.reader = _line_reader(self.src, self.reader.cols, self.reader.layout)


def _prepare(
    conn: psycopg.Connection,
    src: SourceFile,
    names: _StagingNames,
    result: IngestResult,
    settings: Settings,
    database_url: str,
    item_ids: frozenset[str],
    scratch: ExitStack,
) -> _Plan:
    """Choose the reader (a file the fast reader cannot be trusted with is read by PostgreSQL's
    COPY, if quoted, or line by line, as before; the rules are the same for every reader) and
    open the connection classification asks the database on."""
    from recranker_core.validation.suite import StagedBounds

    reader = _reader(conn, src, names, result, scratch)
    lookup = scratch.enter_context(
        connect(database_url, autocommit=True, application_name="recranker-ingest")
    )
    lookup.execute("SET TIME ZONE 'UTC'")
    if reader.layout is not None:
        estimate = reader.layout.data_lines
    else:
        import pyarrow.parquet as pq

        estimate = pq.ParquetFile(src.path).metadata.num_rows
    return _Plan(
        src=src,
        reader=reader,
        clock=_clock(lookup, settings),
        lookups=_lookups(lookup, item_ids, settings),
        bounds=StagedBounds.now(settings.ingest),
        estimate=estimate,
    )


def _reader(
    conn: psycopg.Connection,
    src: SourceFile,
    names: _StagingNames,
    result: IngestResult,
    scratch: ExitStack,
) -> _Reader:
    if src.fmt == "parquet":
        return _parquet_reader(src)
    header = _read_header(src)
    cols = _staged_columns(header, src.delimiter)
    layout = _scan(src.path)
    result.trailing_blank_lines = layout.trailing_blank_lines
    if layout.trailing_blank_lines:
        log.info(
            "%s: %d blank line(s) at the end of the file are not records",
            src.path,
            layout.trailing_blank_lines,
        )
    by_line = _one_line_per_record(src)
    if layout.has_end_of_data_line:
        log.info("%s: a line holds only \\., which COPY would take as the end", src.path)
        return _line_reader(src, cols, layout)
    if by_line and layout.has_no_quote_byte:
        log.info("%s: the file holds the byte 0x01; reading it line by line", src.path)
        return _line_reader(src, cols, layout)
    if layout.has_nul:
        log.info("%s: the file holds NUL bytes; reading it line by line", src.path)
        return _line_reader(src, cols, layout)
    if layout.has_empty_line:
        log.info("%s: an empty line among the data; reading it line by line", src.path)
        return _line_reader(src, cols, layout)
    if (by_line or not layout.has_quote) and layout.line_breaks_alike:
        return _fast_reader(src, cols, layout, by_line)
    # Quoted CSV, or carriage returns COPY reads its own way: PostgreSQL's COPY decides.
    return _copy_reader(conn, src, names, cols, layout, by_line, scratch)


def _text_batch(
    lines: Any, fields: list[Any], parse_error: Any = None, raw: Any = None
) -> pa.RecordBatch:
    """A batch as the classifier reads it (columns line, c0, c1, ..., parse_error, raw)."""
    import pyarrow as pa

    def text(values: Any) -> pa.Array:
        return values if isinstance(values, pa.Array) else pa.array(values, pa.string())

    n = len(lines)
    columns = [pa.array(lines, pa.int64())] + [text(f) for f in fields]
    columns += [
        pa.nulls(n, pa.string()) if parse_error is None else text(parse_error),
        pa.nulls(n, pa.string()) if raw is None else text(raw),
    ]
    names = ["line"] + [f"c{i}" for i in range(len(fields))] + ["parse_error", "raw"]
    return pa.RecordBatch.from_arrays(columns, names=names)


def _fast_reader(src: SourceFile, cols: StagedColumns, layout: _Layout, by_line: bool) -> _Reader:
    """pyarrow's multi-threaded CSV reader over the file, without quoting: taken only where that
    reads exactly what COPY reads (one record per line: a line format, or CSV without a quote
    character) and every line break is the same. A line it cannot read (wrong field count, not
    UTF-8, empty) sends the file to the line-by-line reader, as COPY's refusal did."""

    def batches() -> Iterator[pa.RecordBatch]:
        import numpy as np
        import pyarrow as pa
        import pyarrow.csv as pacsv

        names = [f"c{i}" for i in range(cols.count)]
        with pa.memory_map(str(src.path)) as mapped:
            data = mapped.read_buffer(layout.data_end)
        line = 2
        try:
            reader = pacsv.open_csv(
                pa.BufferReader(data),
                # One thread: the other core is the server's, inserting the previous batch.
                read_options=pacsv.ReadOptions(
                    column_names=names, skip_rows=1, block_size=_READ_BLOCK, use_threads=False
                ),
                parse_options=pacsv.ParseOptions(
                    delimiter=cols.delimiter,
                    quote_char=False,
                    escape_char=False,
                    newlines_in_values=False,
                    ignore_empty_lines=False,
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in names},
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                    null_values=[],
                ),
            )
            for chunk in reader:
                n = chunk.num_rows
                yield _text_batch(np.arange(line, line + n), list(chunk.columns))
                line += n
        except pa.ArrowInvalid as exc:
            raise _ReadByLine(str(exc).splitlines()[0]) from exc
        if by_line and line - 2 != layout.data_lines:
            # One record per line is the contract of these formats; never trust less.
            raise _ReadByLine(f"read {line - 2:,} records from {layout.data_lines:,} lines")

    return _Reader("fast", batches, cols, layout)


def _line_reader(src: SourceFile, cols: StagedColumns, layout: _Layout) -> _Reader:
    """Each physical line after the header on its own, with the reason of a line that cannot be
    split (the slow reader of files COPY and the fast reader refuse)."""
    by_line = _one_line_per_record(src)

    def batches() -> Iterator[pa.RecordBatch]:
        rows = _read_lines(src.path, src.delimiter, cols.count, by_line, layout.data_end)
        while True:
            block = [row for _, row in zip(range(1 << 16), rows, strict=False)]
            if not block:
                return
            fields = [[r[1][i] if r[2] is None else None for r in block] for i in range(cols.count)]
            yield _text_batch(
                [r[0] for r in block], fields, [r[2] for r in block], [r[3] for r in block]
            )

    return _Reader("lines", batches, cols, layout)


def _copy_reader(
    conn: psycopg.Connection,
    src: SourceFile,
    names: _StagingNames,
    cols: StagedColumns,
    layout: _Layout,
    by_line: bool,
    scratch: ExitStack,
) -> _Reader:
    """PostgreSQL's COPY reads the file into a text staging table (RFC 4180 quoting, its own
    line breaks), and the staged rows are read back into a local file; a file COPY refuses is
    read line by line."""
    options = [sql.SQL("FORMAT csv, HEADER true, DELIMITER {}").format(sql.Literal(src.delimiter))]
    if by_line:
        options.append(sql.SQL("QUOTE {}").format(sql.Literal(_NO_QUOTE)))
    target = sql.SQL("{} ({})").format(
        _StagingNames.ident(names.staging),
        sql.SQL(", ").join(sql.Identifier(f"c{i}") for i in range(cols.count)),
    )
    try:
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
                raise _ReadByLine(f"COPY read {staged:,} records from {layout.data_lines:,} lines")
    except psycopg.errors.DataError as exc:
        log.info(
            "%s: COPY refused the file (%s); reading it line by line",
            src.path,
            str(exc).splitlines()[0],
        )
        return _line_reader(src, cols, layout)
    except _ReadByLine as exc:
        log.info("%s: %s; reading it line by line", src.path, exc)
        return _line_reader(src, cols, layout)
    path = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="recranker-"))) / "s.csv"
    columns = sql.SQL(", ").join(
        sql.Identifier(c)
        for c in ["line", *(f"c{i}" for i in range(cols.count)), "parse_error", "raw"]
    )
    with (
        path.open("wb") as out,
        conn.cursor() as cur,
        cur.copy(
            sql.SQL("COPY (SELECT {} FROM {} ORDER BY line) TO STDOUT (FORMAT csv)").format(
                columns, _StagingNames.ident(names.staging)
            )
        ) as copy,
    ):
        for data in copy:
            out.write(data)

    def batches() -> Iterator[pa.RecordBatch]:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        column_names = ["line", *(f"c{i}" for i in range(cols.count)), "parse_error", "raw"]
        types = {c: pa.string() for c in column_names}
        types["line"] = pa.int64()
        reader = pacsv.open_csv(
            str(path),
            read_options=pacsv.ReadOptions(column_names=column_names, block_size=_READ_BLOCK),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            # COPY writes NULL as an empty unquoted field and '' as "".
            convert_options=pacsv.ConvertOptions(
                column_types=types,
                null_values=[""],
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
        )
        yield from (pa.RecordBatch.from_arrays(b.columns, names=column_names) for b in reader)

    return _Reader("staged", batches, cols, layout)


def _parquet_reader(src: SourceFile) -> _Reader:
    """The four needed columns of a Parquet file as text, the way COPY used to receive them
    (timestamps as unix seconds); line numbers count rows from 1."""
    import pyarrow as pa
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

    def batches() -> Iterator[pa.RecordBatch]:
        import numpy as np
        import pyarrow.compute as pc

        line = 1
        for batch in pq.ParquetFile(src.path).iter_batches(columns=wanted, batch_size=1 << 18):
            arrays = list(batch.columns)
            ts = arrays[3]
            if pa.types.is_timestamp(ts.type):
                # Unix seconds, the form the classifier reads fastest.
                arrays[3] = pc.divide(
                    pc.cast(pc.cast(ts, pa.timestamp("us", "UTC")), pa.int64()), 1_000_000.0
                )
            n = batch.num_rows
            yield _text_batch(np.arange(line, line + n), [pc.cast(a, pa.string()) for a in arrays])
            line += n

    return _Reader("parquet", batches, cols)


def _clock(lookup: psycopg.Connection, settings: Settings) -> Clock:
    """The time bounds of valid events, from the database's clock and its reading of
    ingest.min_event_ts (what the rules have always compared with)."""
    from recranker_core.validation.classify import Clock

    row = lookup.execute(
        """SELECT (extract(epoch FROM now() + make_interval(secs => %s)) * 1000000)::bigint,
                  (extract(epoch FROM %s::timestamptz) * 1000000)::bigint""",
        (settings.ingest.future_tolerance_s, settings.ingest.min_event_ts),
    ).fetchone()
    assert row is not None
    return Clock(max_us=int(row[0]), min_us=int(row[1]))


def _lookups(lookup: psycopg.Connection, item_ids: frozenset[str], settings: Settings) -> Lookups:
    """Item ids asked of recranker.items (and the batch's item file) once each; ISO 8601 text
    typed by PostgreSQL's timestamptz input, as it always was."""
    from recranker_core.validation.classify import Lookups

    seen: dict[str, bool] = {}

    def known_items(ids: list[str]) -> set[str]:
        ask = [i for i in ids if i not in seen and i not in item_ids]
        if ask:
            found = {
                r[0]
                for r in lookup.execute(
                    "SELECT item_id FROM recranker.items WHERE item_id = ANY(%s)", (ask,)
                )
            }
            seen.update((i, i in found) for i in ask)
        return {i for i in ids if i in item_ids or seen.get(i, False)}

    def iso_micros(values: list[str]) -> list[int | None]:
        rows = lookup.execute(
            """SELECT (extract(epoch FROM recranker.try_timestamptz(v)) * 1000000)::bigint
               FROM unnest(%s::text[]) WITH ORDINALITY AS t(v, n) ORDER BY n""",
            (values,),
        ).fetchall()
        return [r[0] for r in rows]

    return Lookups(
        known_items=None if settings.ingest.auto_create_items else known_items,
        iso_micros=iso_micros,
    )


def _classify_into(
    conn: psycopg.Connection, names: _StagingNames, plan: _Plan, settings: Settings
) -> _Staged:
    """Classify the reader's batches into a staging table (the path of batches whose repeats are
    resolved in SQL, and of rejected ones): the valid rows in one COPY that a worker thread
    feeds while the next batch is classified, the quarantined rows after it."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    from psycopg.copy import QueuedLibpqWriter

    _create_table(conn, names.classified, _CLASSIFIED_COLUMNS)
    staged = _new_staged(plan)
    valid_copy = sql.SQL(
        "COPY {} (line, user_id, item_id, rating, event_us) FROM STDIN (FORMAT csv)"
    ).format(_StagingNames.ident(names.classified))
    with conn.cursor() as cur, cur.copy(valid_copy, writer=QueuedLibpqWriter(cur)) as copy:
        for classified in _classified_batches(plan, settings, staged):
            if classified.valid.any():
                copy.write(_valid_csv(classified))
    if staged.quarantine:
        rows = io.BytesIO()
        pacsv.write_csv(
            pa.concat_tables(staged.quarantine), rows, pacsv.WriteOptions(include_header=False)
        )
        with (
            conn.cursor() as cur,
            cur.copy(
                sql.SQL("COPY {} (line, outcome, reasons, raw) FROM STDIN (FORMAT csv)").format(
                    _StagingNames.ident(names.classified)
                )
            ) as copy,
        ):
            copy.write(rows.getbuffer())
    return staged


def _new_staged(plan: _Plan) -> _Staged:
    from recranker_core.validation.suite import SuiteFacts

    return _Staged(reader=plan.reader, bounds=plan.bounds, facts=SuiteFacts())


def _classified_batches(plan: _Plan, settings: Settings, staged: _Staged) -> Iterator[Classified]:
    """The reader's batches, typed and classified, each counted into `staged` (its quarantined
    rows kept there) before it is handed on."""
    from recranker_core.validation.classify import classify
    from recranker_core.validation.suite import add_staged_facts

    cols = plan.reader.cols
    positions = (cols.user_id, cols.item_id, cols.rating, cols.timestamp)
    for batch in plan.reader.batches():
        t0 = time.perf_counter()
        classified = classify(
            batch, positions, cols.delimiter, settings.ingest, plan.clock, plan.lookups
        )
        add_staged_facts(staged.facts, classified, settings.ingest, plan.bounds)
        bad = _tally(staged, classified)
        if len(bad):
            staged.quarantine.append(bad)
        staged.classify_s += time.perf_counter() - t0
        yield classified


def _tally(staged: _Staged, batch: Classified) -> pa.Table:
    """Count one classified batch into `staged`; its quarantined rows (line, outcome, reasons as
    a text[] literal, raw) for the COPY after the valid ones."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from recranker_core.validation.classify import REASON_NAMES, reasons_of_key

    staged.rows += len(batch)
    valid = pa.array(batch.valid)
    staged.valid += int(batch.valid.sum())
    staged.users.append(pc.unique(batch.user_id.filter(valid)))
    staged.items.append(pc.unique(batch.item_id.filter(valid)))
    bad = np.flatnonzero(~batch.valid)
    if not len(bad):
        return pa.table({})
    counts = np.bincount(batch.codes[bad].ravel(), minlength=len(REASON_NAMES))
    staged.reasons.update({REASON_NAMES[c]: int(n) for c, n in enumerate(counts) if c and n})
    keys = batch.reason_keys()[bad]
    distinct, first, which = np.unique(keys, return_index=True, return_inverse=True)
    new = [k for k, key in enumerate(distinct) if int(key) not in staged.examples]
    if new:
        rows = bad[first[new]]
        for key, line, raw in zip(
            distinct[new], batch.line[rows], batch.raw_text(rows).to_pylist(), strict=True
        ):
            staged.examples[int(key)] = (int(line), raw)
    literals = pa.array(["{" + ",".join(reasons_of_key(int(k))) + "}" for k in distinct])
    return pa.table(
        {
            "line": pa.array(batch.line[bad]),
            "outcome": pa.array(["quarantine"] * len(bad)),
            "reasons": literals.take(pa.array(which.ravel())),
            "raw": batch.raw_text(bad),
        }
    )


def _valid_csv(batch: Classified) -> bytes:
    """The valid rows of a batch as CSV for COPY."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    valid = pa.array(batch.valid)
    table = pa.table(
        {
            "line": pa.array(batch.line).filter(valid),
            "user_id": batch.user_id.filter(valid),
            "item_id": batch.item_id.filter(valid),
            "rating": batch.rating_text.filter(valid),
            "event_us": batch.event_us.filter(valid),
        }
    )
    # Quoting every id costs the writer and COPY; only ids holding a quote or a comma need it
    # (a valid id holds no line break).
    quoting = "needed" if batch.ids_need_quotes else "none"
    out = io.BytesIO()
    pacsv.write_csv(table, out, pacsv.WriteOptions(include_header=False, quoting_style=quoting))
    return out.getvalue()


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


@dataclass(frozen=True)
class _Catalogue:
    """The batch's item and user files as staged: how many rows each had, and the ids of each
    (upserted from the files, so rows naming them need not create them)."""

    items: int = 0
    users: int = 0
    item_ids: frozenset[str] = frozenset()
    user_ids: frozenset[str] = frozenset()

    def new(self, which: str, ids: list[str]) -> list[str]:
        known = self.user_ids if which == "users" else self.item_ids
        return [i for i in ids if i not in known]


class _CatalogueStaging:
    """The batch's item and user files (small, but read row by row) staged by a worker thread on
    its own connection while the merge inserts the rows. The item file is read first, here: the
    classification needs its ids. The tables are marked as the ingest session's, so that another
    ingest's sweep leaves them alone while it lives."""

    def __init__(self, database_url: str, src: SourceFile, names: _StagingNames, owner: int):
        self._items = read_items(src.items_path) if src.items_path is not None else None
        self.item_ids = frozenset(i.item_id for i in self._items or ())
        self._done: _Catalogue | None = None
        self._error: BaseException | None = None

        def stage() -> None:
            try:
                with connect(
                    database_url, autocommit=True, application_name="recranker-ingest"
                ) as conn:
                    self._done = _stage_catalogue(conn, src, names, self._items, owner)
            except BaseException as exc:  # noqa: BLE001 - handed to the ingest's thread
                self._error = exc

        self._thread = threading.Thread(target=stage, name="recranker-catalogue", daemon=True)

    def start(self) -> None:
        if self._thread.ident is None:
            self._thread.start()

    def result(self) -> _Catalogue:
        """The staged catalogue; the user file's DataError, if it could not be read."""
        self.start()
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._done is not None
        return self._done

    def wait(self) -> None:
        if self._thread.ident is not None:
            self._thread.join()


def _stage_catalogue(
    conn: psycopg.Connection,
    src: SourceFile,
    names: _StagingNames,
    items: list[Any] | None,
    owner: int,
) -> _Catalogue:
    """Stage the batch's item and user files, so rows can refer to items they add."""
    n_users = 0
    user_ids: frozenset[str] = frozenset()
    with conn.transaction():
        if items is not None:
            _create_table(
                conn,
                names.items,
                sql.SQL(
                    "item_id text PRIMARY KEY, title text, year integer, genres text[], "
                    "attributes jsonb"
                ),
                owner,
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
        if src.users_path is not None:
            users = read_users(src.users_path)
            _create_table(
                conn, names.users, sql.SQL("user_id text PRIMARY KEY, attributes jsonb"), owner
            )
            with (
                conn.cursor() as cur,
                cur.copy(
                    sql.SQL("COPY {} FROM STDIN").format(_StagingNames.ident(names.users))
                ) as copy,
            ):
                by_id = {u.user_id: u for u in users}
                for us in by_id.values():
                    copy.write_row((us.user_id, json.dumps(us.attributes)))
            n_users = len(users)
            user_ids = frozenset(by_id)
    item_ids = frozenset(i.item_id for i in items or ())
    return _Catalogue(len(items or ()), n_users, item_ids, user_ids)


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


def _write_quarantine(conn: psycopg.Connection, batch_id: int, staged: _Staged) -> None:
    """COPY the quarantined rows kept by classification into recranker.quarantine."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if not staged.quarantine:
        return
    rows = pa.concat_tables(staged.quarantine)
    table = pa.table(
        {
            "batch_id": pa.array([batch_id] * len(rows), pa.int64()),
            "line": rows["line"],
            "raw": rows["raw"],
            "reasons": rows["reasons"],
        }
    )
    out = io.BytesIO()
    pacsv.write_csv(table, out, pacsv.WriteOptions(include_header=False))
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY recranker.quarantine (batch_id, line, raw, reasons) FROM STDIN (FORMAT csv)"
        ) as copy,
    ):
        copy.write(out.getbuffer())


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
    conn: psycopg.Connection, result: IngestResult, names: _StagingNames
) -> None:
    """Counts per reason and the first line of each reason combination, for messages (from the
    staged rows, after repeats were resolved)."""
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
                """SELECT line, reasons, raw
               FROM (SELECT DISTINCT ON (reasons) line, reasons, raw FROM {c}
                     WHERE outcome = 'quarantine' ORDER BY reasons, line) q
               ORDER BY line LIMIT 10"""
            ).format(c=classified),
        )
    ]


def _fill_raw(
    conn: psycopg.Connection, names: _StagingNames, staged: _Staged, everything: bool
) -> None:
    """Give the staged rows about to be quarantined without their text (rows found repeating
    after classification, or every valid row of a rejected batch) the text of their line, read
    from the file again: classification keeps only the quarantined rows' text."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from recranker_core.validation.classify import raw_lines

    classified = _StagingNames.ident(names.classified)
    which = sql.SQL("true" if everything else "outcome = 'quarantine'")
    lines = np.array(
        [
            r[0]
            for r in _exec(
                conn,
                sql.SQL("SELECT line FROM {} WHERE raw IS NULL AND {}").format(classified, which),
            )
        ],
        dtype=np.int64,
    )
    if not len(lines):
        return
    _exec(conn, "CREATE TEMP TABLE recranker_raw (line bigint, raw text) ON COMMIT DROP")
    with (
        conn.cursor() as cur,
        cur.copy("COPY recranker_raw (line, raw) FROM STDIN (FORMAT csv)") as copy,
    ):
        for batch in staged.reader.batches():
            line = batch.column("line").to_numpy()
            rows = np.flatnonzero(np.isin(line, lines))
            if not len(rows):
                continue
            table = pa.table(
                {
                    "line": pa.array(line[rows]),
                    "raw": raw_lines(batch, rows, staged.reader.cols.delimiter),
                }
            )
            out = io.BytesIO()
            pacsv.write_csv(table, out, pacsv.WriteOptions(include_header=False))
            copy.write(out.getbuffer())
    _exec(
        conn,
        sql.SQL(
            "UPDATE {} c SET raw = r.raw FROM recranker_raw r "
            "WHERE c.line = r.line AND c.raw IS NULL"
        ).format(classified),
    )
    _exec(conn, "DROP TABLE recranker_raw")


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


def _quarantine(
    conn: psycopg.Connection, names: _StagingNames, batch_id: int, everything: bool
) -> None:
    _exec(
        conn,
        sql.SQL("""INSERT INTO recranker.quarantine (batch_id, line, raw, reasons)
                   SELECT %s, line, raw,
                          CASE WHEN cardinality(reasons) = 0 THEN ARRAY['batch_rejected']
                               ELSE reasons END
                   FROM {c}
                   WHERE {which}""").format(
            c=_StagingNames.ident(names.classified),
            which=sql.SQL("true" if everything else "outcome = 'quarantine'"),
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
    merged_ids: list[str] | None,
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
        n += _insert_new_ids(conn, "items", "item_id", classified, batch_id, merged_ids)
    return n


def _insert_new_ids(
    conn: psycopg.Connection,
    table: str,
    column: str,
    classified: sql.Composable,
    batch_id: int,
    merged_ids: list[str] | None,
) -> int:
    """Create the users or items that merged rows name and the table does not have yet. The ids
    come from classification when no row changed outcome since (no scan of the staged rows),
    less those the batch's own files just upserted."""
    target = sql.Identifier("recranker", table)
    col = sql.Identifier(column)
    if merged_ids is not None:
        if not merged_ids:
            return 0
        return _exec(
            conn,
            sql.SQL("""INSERT INTO {table} ({col}, first_batch_id)
                       SELECT v, %s::bigint FROM unnest(%s::text[]) v
                       ON CONFLICT ({col}) DO NOTHING""").format(table=target, col=col),
            (batch_id, merged_ids),
        ).rowcount
    return _exec(
        conn,
        sql.SQL("""INSERT INTO {table} ({col}, first_batch_id)
                   SELECT DISTINCT {col}, %s::bigint FROM {c} WHERE outcome = 'merge'
                   ON CONFLICT ({col}) DO NOTHING""").format(table=target, col=col, c=classified),
        (batch_id,),
    ).rowcount


def _upsert_users(
    conn: psycopg.Connection,
    names: _StagingNames,
    has_users: bool,
    classified: sql.Composable,
    batch_id: int,
    merged_ids: list[str] | None,
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
    return n + _insert_new_ids(conn, "users", "user_id", classified, batch_id, merged_ids)


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
