"""Reading a file: its header and layout (one pass over the bytes), and the reader its records
come from as Arrow batches of text: fast (pyarrow), COPY (quoted CSV), line by line, Parquet."""

from __future__ import annotations

import csv
import logging
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from recranker_core.datasets.sources import Header, SourceFile, map_header
from recranker_core.errors import DataError
from recranker_core.ingest.staging import _count, _create_table, _StagingNames
from recranker_core.validation.rules import StagedColumns

if TYPE_CHECKING:
    import pyarrow as pa

    from recranker_core.ingest.run import IngestResult

log = logging.getLogger(__name__)

_COPY_CHUNK = 1 << 20
# Bytes of a file per batch: small enough that the first batch is soon inserted and the server
# and this process take turns often, large enough that a statement's overhead does not count.
_READ_BLOCK = 4 << 20


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
