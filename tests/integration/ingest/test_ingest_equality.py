"""The vectorised ingest against the path it replaced, on bad input, against a real PostgreSQL.

The reference is the former ingest, kept here: staging by COPY (line by line where COPY refuses
or cannot be trusted), the SQL classification, and Great Expectations' own SQL rescan of the
classified rows. For every file, both must give the same quarantine (lines, reasons, text), the
same merged rows (ids, rating, timestamp to the microsecond), the same ledger counts and the
same staged-suite results, on the streamed path (rows inserted as they are classified) and on
the staged one (a rejected batch); and the bulk merge (primary key dropped and rebuilt) the same
as the row-by-row one, repeats included."""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from recranker_core.config import IngestSettings, Settings
from recranker_core.datasets.sources import describe_file, read_items
from recranker_core.ingest import IngestResult, ingest_outcome
from recranker_core.ingest import read as ing  # the reference path reuses the readers
from recranker_core.validation.rules import BAD_ID, CONTROL_CHARACTER, StagedColumns

HEADER = "user_id,item_id,rating,timestamp\n"
ITEMS = "item_id,title\ni1,One\ni2,Two\ni3,Three\n"

# ---------------------------------------------------------------------------------------------
# The reference path: the former staging and SQL classification, verbatim in what they decide.

_NUMBER = r"^[+-]?[0-9]*\.?[0-9]+$"
_UNIX_SECONDS = r"^[+-]?[0-9]+(\.[0-9]+)?$"
_ISO_8601 = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?)?"
    r" ?(Z|[+-][0-9]{2}(:?[0-9]{2})?)?$"
)
_NOT_FINITE = ["nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"]

REFERENCE_CLASSIFY = """
CREATE TABLE {classified} AS
SELECT c.*, CASE WHEN cardinality(c.reasons) = 0 THEN 'merge' ELSE 'quarantine' END AS outcome
FROM (
    SELECT t.line, t.parse_error, t.user_id, t.item_id, t.rating::real AS rating, t.event_ts,
           {item_known} AS item_known,
           CASE WHEN t.parse_error IS NOT NULL THEN ARRAY[t.parse_error]
           ELSE array_remove(ARRAY[
               CASE WHEN t.user_id IS NULL THEN 'user_id_missing'
                    WHEN length(t.user_id) > {max_len} THEN 'user_id_too_long'
                    WHEN t.user_id ~ {bad_id} THEN CASE WHEN t.user_id ~ {control}
                        THEN 'user_id_control_character' ELSE 'user_id_whitespace' END END,
               CASE WHEN t.item_id IS NULL THEN 'item_id_missing'
                    WHEN length(t.item_id) > {max_len} THEN 'item_id_too_long'
                    WHEN t.item_id ~ {bad_id} THEN CASE WHEN t.item_id ~ {control}
                        THEN 'item_id_control_character' ELSE 'item_id_whitespace' END
                    WHEN NOT {item_known} THEN 'item_unknown' END,
               CASE WHEN t.rating_txt IS NULL THEN 'rating_missing'
                    WHEN lower(t.rating_txt) = ANY({not_finite}) THEN 'rating_not_finite'
                    WHEN t.rating IS NULL THEN 'rating_not_numeric'
                    WHEN t.rating < {rmin} OR t.rating > {rmax} THEN 'rating_out_of_range' END,
               CASE WHEN t.ts_txt IS NULL THEN 'timestamp_missing'
                    WHEN t.event_ts IS NULL THEN 'timestamp_invalid'
                    WHEN t.event_ts > {max_ts} THEN 'timestamp_in_future'
                    WHEN t.event_ts < {min_ts}::timestamptz THEN 'timestamp_too_old' END
           ]::text[], NULL) END AS reasons
    FROM (
        SELECT p.*,
               CASE WHEN length(p.rating_txt) <= 30 AND p.rating_txt ~ {number}
                    THEN p.rating_txt::float8 END AS rating,
               CASE WHEN length(p.ts_txt) <= 30 AND p.ts_txt ~ {unix}
                    THEN CASE WHEN abs(p.ts_txt::float8) < 1e11
                              THEN to_timestamp(p.ts_txt::float8) END
                    WHEN p.ts_txt ~ {iso} THEN recranker.try_timestamptz(p.ts_txt) END AS event_ts
        FROM (
            SELECT s.line, s.parse_error,
                   CASE WHEN btrim({u}) <> '' THEN {u} END AS user_id,
                   CASE WHEN btrim({i}) <> '' THEN {i} END AS item_id,
                   nullif(btrim({r}), '') AS rating_txt,
                   nullif(btrim({ts}), '') AS ts_txt
            FROM {staging} s
            OFFSET 0
        ) p
        OFFSET 0
    ) t
    LEFT JOIN recranker.items it ON it.item_id = t.item_id
    {item_file_join}
    OFFSET 0
) c
"""


class _Fallback(Exception):
    pass


def reference_stage(conn: psycopg.Connection, src: Any, staging: str) -> StagedColumns:
    """The former staging: COPY into a text table, line by line where COPY refuses the file."""
    target = sql.Identifier(staging)
    if src.fmt == "parquet":
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        from recranker_core.datasets.sources import map_header

        pfile = pq.ParquetFile(src.path)
        header = map_header(list(pfile.schema_arrow.names), str(src.path))
        wanted = [
            header.columns[header.positions[f]]
            for f in ("user_id", "item_id", "rating", "timestamp")
        ]
        conn.execute(sql.SQL("CREATE TABLE {} ({})").format(target, ing._staging_columns(4, 1)))
        with (
            conn.cursor() as cur,
            cur.copy(
                sql.SQL("COPY {} (c0, c1, c2, c3) FROM STDIN (FORMAT csv)").format(target)
            ) as copy,
        ):
            for batch in pfile.iter_batches(columns=wanted):
                arrays = list(batch.columns)
                if pa.types.is_timestamp(arrays[3].type):
                    arrays[3] = pc.divide(
                        pc.cast(pc.cast(arrays[3], pa.timestamp("us", "UTC")), pa.int64()),
                        1_000_000.0,
                    )
                table = pa.table(
                    [pc.cast(a, pa.string()) for a in arrays], names=["c0", "c1", "c2", "c3"]
                )
                buf = io.BytesIO()
                pacsv.write_csv(table, buf, pacsv.WriteOptions(include_header=False))
                copy.write(buf.getvalue())
        return StagedColumns(0, 1, 2, 3, 4, ",")
    header = ing._read_header(src)
    cols = ing._staged_columns(header, src.delimiter)
    layout = ing._scan(src.path)
    by_line = ing._one_line_per_record(src)
    options = [sql.SQL("FORMAT csv, HEADER true, DELIMITER {}").format(sql.Literal(src.delimiter))]
    if by_line:
        options.append(sql.SQL("QUOTE {}").format(sql.Literal("\x01")))
    columns = sql.SQL(", ").join(sql.Identifier(f"c{i}") for i in range(cols.count))
    try:
        if layout.has_end_of_data_line or (by_line and layout.has_no_quote_byte):
            raise _Fallback
        with conn.transaction():
            conn.execute(
                sql.SQL("CREATE TABLE {} ({})").format(target, ing._staging_columns(cols.count, 2))
            )
            with (
                conn.cursor() as cur,
                cur.copy(
                    sql.SQL("COPY {} ({}) FROM STDIN ({})").format(
                        target, columns, sql.SQL(", ").join(options)
                    )
                ) as copy,
            ):
                copy.write(src.path.read_bytes()[: layout.data_end])
            staged = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target)).fetchone()
            if by_line and staged != (layout.data_lines,):
                raise _Fallback
        return cols
    except (psycopg.errors.DataError, _Fallback):
        pass
    conn.execute(
        sql.SQL("CREATE TABLE {} ({})").format(target, ing._staging_columns(cols.count, 2))
    )
    every = sql.SQL(", ").join(
        [sql.Identifier("line"), columns, sql.Identifier("parse_error"), sql.Identifier("raw")]
    )
    with (
        conn.cursor() as cur,
        cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(target, every)) as copy,
    ):
        for line, fields, error, raw in ing._read_lines(
            src.path, src.delimiter, cols.count, by_line, layout.data_end
        ):
            if error is None:
                copy.write_row((line, *fields, None, None))
            else:
                copy.write_row((line, *([None] * cols.count), error, raw))
    return cols


@dataclass
class Expected:
    quarantine: dict[int, tuple[list[str], str]]
    merged: set[tuple[str, str, float, Any]]
    staged_suite: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[int, str] = field(default_factory=dict)  # every staged line's text


def reference(conn: psycopg.Connection, url: str, src: Any, rules: IngestSettings) -> Expected:
    """What the former path decided for `src`: quarantined lines with reasons and text, merged
    rows, and GX's results over the classified table (tables made here are dropped after)."""
    tag = uuid.uuid4().hex[:8]
    staging, classified, items = f"ref_s_{tag}", f"ref_c_{tag}", f"ref_i_{tag}"
    try:
        cols = reference_stage(conn, src, staging)
        item_file_join, in_file = sql.SQL(""), sql.SQL("false")
        if src.items_path is not None:
            conn.execute(
                sql.SQL("CREATE TABLE {} (item_id text PRIMARY KEY)").format(sql.Identifier(items))
            )
            with (
                conn.cursor() as cur,
                cur.copy(sql.SQL("COPY {} FROM STDIN").format(sql.Identifier(items))) as copy,
            ):
                for item_id in {i.item_id for i in read_items(src.items_path)}:
                    copy.write_row((item_id,))
            item_file_join = sql.SQL("LEFT JOIN {} si ON si.item_id = t.item_id").format(
                sql.Identifier(items)
            )
            in_file = sql.SQL("si.item_id IS NOT NULL")
        known = (
            sql.SQL("true")
            if rules.auto_create_items
            else sql.SQL("(it.item_id IS NOT NULL OR {})").format(in_file)
        )

        def col(i: int) -> sql.Composable:
            return sql.SQL("s.{}").format(sql.Identifier(f"c{i}"))

        conn.execute(
            sql.SQL(REFERENCE_CLASSIFY).format(
                classified=sql.Identifier(classified),
                staging=sql.Identifier(staging),
                u=col(cols.user_id),
                i=col(cols.item_id),
                r=col(cols.rating),
                ts=col(cols.timestamp),
                number=sql.Literal(_NUMBER),
                unix=sql.Literal(_UNIX_SECONDS),
                iso=sql.Literal(_ISO_8601),
                item_known=known,
                max_len=sql.Literal(rules.max_id_length),
                bad_id=sql.Literal(BAD_ID),
                control=sql.Literal(CONTROL_CHARACTER),
                not_finite=sql.Literal(_NOT_FINITE),
                rmin=sql.Literal(rules.rating_min),
                rmax=sql.Literal(rules.rating_max),
                max_ts=sql.SQL("(now() + make_interval(secs => {}))").format(
                    sql.Literal(rules.future_tolerance_s)
                ),
                min_ts=sql.Literal(rules.min_event_ts),
                item_file_join=item_file_join,
            )
        )
        raw = sql.SQL("coalesce(s.raw, concat_ws({}, {}))").format(
            sql.Literal(cols.delimiter),
            sql.SQL(", ").join(
                sql.SQL("coalesce(s.{}, '')").format(sql.Identifier(f"c{i}"))
                for i in range(cols.count)
            ),
        )
        quarantine = {
            line: (reasons, text)
            for line, reasons, text in conn.execute(
                sql.SQL(
                    "SELECT c.line, c.reasons, {} FROM {} c JOIN {} s USING (line) "
                    "WHERE c.outcome = 'quarantine'"
                ).format(raw, sql.Identifier(classified), sql.Identifier(staging))
            )
        }
        every = dict(
            conn.execute(
                sql.SQL("SELECT s.line, {} FROM {} s").format(raw, sql.Identifier(staging))
            ).fetchall()
        )
        merged = set(
            conn.execute(
                sql.SQL(
                    "SELECT user_id, item_id, rating, event_ts FROM {} WHERE outcome = 'merge'"
                ).format(sql.Identifier(classified))
            ).fetchall()
        )
        suite = gx_rescan(url, classified, rules)
        return Expected(quarantine, merged, suite, every)
    finally:
        for table in (staging, classified, items):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


def gx_rescan(dsn: str, table: str, rules: IngestSettings) -> list[dict[str, Any]]:
    """The former staged suite: GX validating the classified table through its SQL engine."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    from recranker_core.db.connect import sqlalchemy_url
    from recranker_core.validation.suite import StagedBounds, _outcome

    bounds = StagedBounds.now(rules)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_postgres(
        name=f"ref-{uuid.uuid4().hex[:8]}", connection_string=sqlalchemy_url(dsn)
    )
    asset = source.add_table_asset(name=table, table_name=table, schema_name="public")
    batch = asset.add_batch_definition_whole_table("whole").get_batch()
    expectations = [
        gxe.ExpectColumnValuesToBeNull(column="parse_error"),
        gxe.ExpectColumnValuesToNotBeNull(column="user_id"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="user_id", max_value=rules.max_id_length),
        gxe.ExpectColumnValuesToNotMatchRegex(column="user_id", regex=BAD_ID),
        gxe.ExpectColumnValuesToNotBeNull(column="item_id"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="item_id", max_value=rules.max_id_length),
        gxe.ExpectColumnValuesToNotMatchRegex(column="item_id", regex=BAD_ID),
        gxe.ExpectColumnValuesToBeInSet(column="item_known", value_set=[True]),
        gxe.ExpectColumnValuesToNotBeNull(column="rating"),
        gxe.ExpectColumnValuesToBeBetween(
            column="rating", min_value=rules.rating_min, max_value=rules.rating_max
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="event_ts"),
        gxe.ExpectColumnValuesToBeBetween(
            column="event_ts", min_value=bounds.min_ts, max_value=bounds.max_ts
        ),
    ]
    result = batch.validate(
        gx.ExpectationSuite(name="staged_batch", expectations=expectations),
        result_format="BASIC",
    )
    source.get_engine().dispose()
    return [comparable(_outcome(r).as_row()) for r in result.results]


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    """An outcome without what depends on the clock it ran at (the future bound)."""
    row = json.loads(json.dumps(row, default=str))
    if row["column"] == "event_ts":
        row["details"]["kwargs"].pop("max_value", None)
    return row


# ---------------------------------------------------------------------------------------------
# The files


@dataclass
class Case:
    name: str
    file: str
    body: bytes
    fmt: str | None = None
    items: str | None = ITEMS
    items_file: str = "items.csv"
    rules: dict[str, Any] = field(default_factory=dict)
    # False where the reference's GX could not read a value back (a year past 9999).
    suite: bool = True


def csv_rows(*rows: str, header: str = HEADER) -> bytes:
    return (header + "".join(r + "\n" for r in rows)).encode()


LONG = "u" * 256
CASES = [
    Case(
        "structural",
        "s.csv",
        HEADER.encode()
        + b"u1,i1,5,1000000000\nu1,i2,5,1000000001,extra\nu1,i3\nu\xff\xfe,i1,4,1000000002\n"
        + b'u2,"i1,4,1000000003\n\nu3,i1,',
    ),
    Case(
        "values",
        "v.csv",
        csv_rows(
            "u1,i1,5,1000000000",
            "u1,i2,abc,1000000001",
            "u1,i3,0,1000000002",
            "u1,i1,6,1000000003",
            "u1,i2,NaN,1000000004",
            "u1,i3,inf,1000000005",
            "u1,i1,4,yesterday",
            "u1,i2,4,99999999999",
            "u1,i3,4,-86400",
            f"{LONG}u,i1,4,1000000006",
            ",i1,4,1000000007",
            "u1,nope,4,1000000008",
            "u1,i1,,",
            "u1,i2,4.5,2003-02-30T10:00:00Z",
            "u1,i2,4.5,2003-02-03T10:00:00Z",
        ),
    ),
    Case(
        "numbers and times",
        "n.csv",
        csv_rows(
            "a1,i1,+4,+1000000000",
            "a2,i1,.5,1000000000.5",
            "a3,i1,4.,1000000000.0000005",
            "a4,i1,-0,-1000000000",
            "a5,i1,00004, 1000000001 ",
            "a6,i1, 4 ,0001000000002",
            "a7,i1,4.0000001,99999999999",
            "a8,i1,5.00000001,100000000000",
            "a9,i1,1e1,1e9",
            "b1,i1,-inf,1.5e9",
            "b2,i1,Infinity,1000000003.25",
            "b3,i1,+nan,12",
            "b4,i1,4.9999999999999999999999,1000000004",
            "b5,i1,3.14159265358979323846264338,1000000005",
            "b6,i1,1.0000000000000000000000000000001,1000000006",
            "b7,i1,4,1735689600",
            "b8,i1,2.7182818,1000000007.999999",
            "b9,i1,4,1000000007.9999995",
            "c1,i1,4,-0",
            "c2,i1,4,0",
            "c3,i1,４,1000000008",
            "c4,i1,4,１000000009",
        ),
    ),
    Case(
        "iso times",
        "t.csv",
        csv_rows(
            "d1,i1,4,2003-02-03",
            "d2,i1,4,2003-02-03T10:00",
            "d3,i1,4,2003-02-03 10:00:00.123456789Z",
            "d4,i1,4,2003-02-03T10:00:00+05",
            "d5,i1,4,2003-02-03T10:00:00-0530",
            "d6,i1,4,2003-02-03T10:00:00 +01:00",
            "d7,i1,4,2003-02-03T24:00:00Z",
            "d8,i1,4,2003-02-03T23:59:60Z",
            "d9,i1,4,2003-13-01",
            "e1,i1,4,1969-12-31T23:59:59Z",
            "e2,i1,4,2999-01-01",
            "e4,i1,4,0000-01-01",
            "e5,i1,4,2003-02-03T10:00:00.5",
            "e6,i1,4,2003-2-3",
            "e7,i1,4,2003-02-03T10:00:00Z",
        ),
    ),
    Case(
        "year 10000",
        "y.csv",
        csv_rows("g1,i1,4,9999-12-31T23:00:00-05", "g2,i1,4,1000000000"),
        suite=False,
    ),
    Case(
        "ids",
        "i.csv",
        csv_rows(
            "f1,i1,4,1000000000",
            "f\u00a02,i1,4,1000000001",
            "f\u00853,i1,4,1000000002",
            "f\u009f4,i1,4,1000000003",
            "f\u00a05\u00a0,i1,4,1000000004",
            f"{'é' * 256},i1,4,1000000005",
            f"{'é' * 257},i1,4,1000000006",
            f"{LONG},i2,4,1000000007",
            "   ,i1,4,1000000008",
            " ,i1,4,1000000009",
            "f6,   ,4,1000000010",
            "f7, i1,4,1000000011",
            "f8,i9,4,1000000012",
            "f\x7f9,i9,4,1000000013",
            "İd,i1,4,1000000014",
            "\\N,i2,4,1000000015",
            "f10,i1,nAn,1000000016",
            "f11,i1,İnf,1000000017",
        ),
    ),
    Case(
        "quoted csv",
        "q.csv",
        csv_rows(
            "u1,i1,4,1000000000",
            '"u\t2",i1,4,1000000001',
            '"u\r3",i1,4,1000000002',
            'u4,"i\x1f1",4,1000000003',
            "u5\x7f,i1,4,1000000004",
            " u7,i1,4,1000000006",
            "u 10,i1, 4 , 1000000009 ",
            '"o""brien",i1,4,1000000010',
            '"a,b",i2,4,1000000011',
            '"u\n12",i2,4,1000000012',
            '"x",i3,"5",1000000013',
        ),
    ),
    Case(
        "crlf",
        "r.csv",
        csv_rows("u1,i1,4,1000000000", "u2,i1,9,1000000001", "u3,i1,4,x").replace(b"\n", b"\r\n"),
    ),
    Case(
        "crlf with a bare cr",
        "cr.csv",
        csv_rows("u1,i1,4,1000000000", "u2,i1,9,1000000001").replace(b"\n", b"\r\n")
        + b"u\r3,i1,4,1000000002\r\n",
    ),
    Case(
        "quoted crlf",
        "qcr.csv",
        csv_rows('"u1",i1,4,1000000000', '"u\n2",i1,4,1000000001').replace(b"\n", b"\r\n"),
    ),
    Case("cr in a line", "cr2.csv", csv_rows("u1,i1,4,1000000000", "u\r2,i1,4,1000000001")),
    Case(
        "blank lines",
        "b.csv",
        csv_rows("u1,i1,4,1000000100", "", "u2,i1,4,1000000101", "   ", "u3,i1,x,1") + b"\n \n",
    ),
    Case(
        "end of data line",
        "e.csv",
        (HEADER + "u1,i1,4,1000000200\n\\.\nu2,i1,4,1000000201\n").encode(),
    ),
    Case(
        "tsv",
        "t.tsv",
        b"user_id\titem_id\trating\ttimestamp\n"
        + "".join(
            f"{u}\t{i}\t{r}\t{t}\n"
            for u, i, r, t in [
                ('"ua', "i1", "4", "882100000"),
                ('ub"', "i2", "3", "882100001"),
                ("v,1", "i3", "9", "882100002"),
                ("v2", "i3", "4", "8821000x"),
            ]
        ).encode()
        + b"v3\tx\n",
    ),
    Case(
        "tsv with 0x01",
        "t1.tsv",
        b"user_id\titem_id\trating\ttimestamp\nv1\ti1\t4\t1000000000\nv\x012\ti1\t4\t1000000001\n",
    ),
    Case(
        "movielens",
        "day.inter",
        b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        b'1\ti1\t4\t881250949\n"2\ti2\t3\t881250950\n3\ti3\t6\t881250951\n4\ti1\t4\n',
        fmt="movielens",
        items="item_id:token\tmovie_title:token_seq\ni1\tOne\ni2\tTwo\ni3\tThree\n",
        items_file="day.item",
    ),
    Case(
        "auto-created items",
        "a.csv",
        csv_rows("u1,new1,4,1000000000", "u2,new2,4,1000000001", "u3,,4,1000000002"),
        items=None,
        rules={"auto_create_items": True},
    ),
    Case(
        "no item file",
        "nf.csv",
        csv_rows("u1,new1,4,1000000000", "u2,i1,4,1000000001"),
        items=None,
        rules={"failure_budget": 1.0},
    ),
    Case(
        "extra columns",
        "x.csv",
        csv_rows(
            "u1,tv,i1,4,1000000000",
            "u2,,i1,x,1000000001",
            header="user_id,device,item_id,rating,timestamp\n",
        ),
    ),
]


def settings_for(settings: Settings, case: Case, **extra: Any) -> Settings:
    rules = {"failure_budget": 0.99, **case.rules, **extra}
    return settings.model_copy(update={"ingest": settings.ingest.model_copy(update=rules)})


def write_case(directory: Path, case: Case) -> Path:
    directory.mkdir(parents=True)
    path = directory / case.file
    path.write_bytes(case.body)
    if case.items is not None:
        (directory / case.items_file).write_text(case.items)
    return path


def run(path: Path, settings: Settings, url: str, fmt: str | None = None) -> IngestResult:
    return ingest_outcome(describe_file(path, fmt), settings, url)


def outcome_of(url: str, result: IngestResult) -> tuple[dict[int, Any], set[Any], tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        quarantine = {
            line: (reasons, raw)
            for line, reasons, raw in conn.execute(
                "SELECT line, reasons, raw FROM recranker.quarantine WHERE batch_id = %s",
                (result.batch_id,),
            )
        }
        merged = set(
            conn.execute(
                "SELECT user_id, item_id, rating, event_ts FROM recranker.interactions "
                "WHERE batch_id = %s",
                (result.batch_id,),
            ).fetchall()
        )
        ledger = conn.execute(
            "SELECT status, rows_read, rows_merged, rows_duplicate, rows_quarantined "
            "FROM recranker.ingest_batches WHERE batch_id = %s",
            (result.batch_id,),
        ).fetchone()
    assert ledger is not None
    return quarantine, merged, ledger


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_outcome_as_the_reference_path(
    case: Case, tmp_path: Path, settings: Settings, clean_db: str
) -> None:
    cased = settings_for(settings, case)
    path = write_case(tmp_path / "case", case)
    src = describe_file(path, case.fmt)
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        expected = reference(conn, clean_db, src, cased.ingest)

    result = run(path, cased, clean_db, case.fmt)
    quarantine, merged, ledger = outcome_of(clean_db, result)

    assert quarantine == expected.quarantine
    assert merged == expected.merged
    read = len(expected.quarantine) + len(expected.merged)
    assert ledger == ("merged", read, len(expected.merged), 0, len(expected.quarantine))
    staged = [comparable(v) for v in result.validation if v["suite"] == "staged_batch"]
    for row in staged:
        row.pop("suite")
    if case.suite:
        assert staged == expected.staged_suite
    else:
        assert [(v["expectation"], v["unexpected_count"]) for v in staged] == [
            (v["expectation"], v["unexpected_count"]) for v in _counted(result)
        ]
    assert result.reasons == dict(
        sorted(
            _count_reasons(expected.quarantine).items(),
            key=lambda kv: (-kv[1], kv[0]),
        )
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_rejected_batch_quarantines_as_the_reference_path(
    case: Case, tmp_path: Path, settings: Settings, clean_db: str
) -> None:
    """With no failure budget, every file with a bad row is rejected: the staged path (the rows
    classified into a staging table) keeps every line, the bad ones with the reference's reasons
    and all with the reference's text."""
    strict = settings_for(settings, case, failure_budget=0.0)
    path = write_case(tmp_path / "case", case)
    with psycopg.connect(clean_db, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        expected = reference(conn, clean_db, describe_file(path, case.fmt), strict.ingest)
    result = run(path, strict, clean_db, case.fmt)
    quarantine, merged, ledger = outcome_of(clean_db, result)
    if not expected.quarantine:
        assert result.status == "merged"
        return
    assert result.status == "rejected" and merged == set()
    n = len(expected.raw)
    assert ledger == ("rejected", n, 0, 0, n)
    assert {line: raw for line, (_, raw) in quarantine.items()} == expected.raw
    assert {line: r for line, (r, _) in quarantine.items() if r != ["batch_rejected"]} == {
        line: r for line, (r, _) in expected.quarantine.items()
    }
    assert result.reasons == dict(
        sorted(_count_reasons(expected.quarantine).items(), key=lambda kv: (-kv[1], kv[0]))
    )


def _counted(result: IngestResult) -> list[dict[str, Any]]:
    """The staged suite's counts as the quarantine implies them, for the one case the reference
    GX cannot read (one event past year 9999: in the future, nothing else wrong)."""
    future = {"expect_column_values_to_be_between", "event_ts"}
    return [
        {
            "expectation": v["expectation"],
            "unexpected_count": 1 if {v["expectation"], v["column"]} == future else 0,
        }
        for v in result.validation
        if v["suite"] == "staged_batch"
    ]


def _count_reasons(quarantine: dict[int, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reasons, _ in quarantine.values():
        for r in reasons:
            counts[r] = counts.get(r, 0) + 1
    return counts


@pytest.mark.parametrize("name", ["values", "ids", "quoted csv", "structural"])
def test_the_bulk_merge_gives_the_same_as_the_row_by_row_merge(
    name: str, tmp_path: Path, settings: Settings, clean_db: str
) -> None:
    case = next(c for c in CASES if c.name == name)
    path = write_case(tmp_path / "case", case)
    outcomes = []
    for bulk_from in (10**9, 1):
        with psycopg.connect(clean_db, autocommit=True) as conn:
            conn.execute(
                "TRUNCATE recranker.interactions, recranker.ingest_batches, "
                "recranker.quarantine, recranker.users, recranker.items, "
                "recranker.validation_results"
            )
        result = run(path, settings_for(settings, case, bulk_load_min_rows=bulk_from), clean_db)
        outcomes.append(outcome_of(clean_db, result)[:2] + (result.reasons, result.examples))
    assert outcomes[0] == outcomes[1]
    with psycopg.connect(clean_db) as conn:
        key = conn.execute(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'recranker.interactions'::regclass AND contype = 'p'"
        ).fetchone()
    assert key == ("PRIMARY KEY (user_id, item_id, event_ts)",)


def test_repeats_resolve_the_same_in_bulk(tmp_path: Path, settings: Settings, clean_db: str):
    """test_ingest's repeats, with the primary key dropped and rebuilt: the rebuild finds the
    repeats, the merge resolves them as the row-by-row insert does."""
    bulk = settings.model_copy(
        update={
            "ingest": settings.ingest.model_copy(
                update={"bulk_load_min_rows": 1, "failure_budget": 0.9}
            )
        }
    )
    day1 = tmp_path / "a"
    day1.mkdir()
    (day1 / "items.csv").write_text(ITEMS)
    (day1 / "day1.csv").write_text(
        HEADER + "u1,i1,5,1000000000\nu1,i1,5,1000000000\nu1,i2,3,1000000001\n"
    )
    r1 = run(day1 / "day1.csv", bulk, clean_db)
    assert (r1.rows_merged, r1.rows_duplicate, r1.rows_quarantined) == (2, 1, 0)
    day2 = tmp_path / "b"
    day2.mkdir()
    (day2 / "items.csv").write_text(ITEMS)
    (day2 / "day2.csv").write_text(
        HEADER
        + "u1,i1,5,1000000000\nu1,i2,4,1000000001\nu2,i3,2,1000000005\nu2,i3,1,1000000005\n"
        + "u2,i1,4,1000000009\n"
    )
    r2 = run(day2 / "day2.csv", bulk, clean_db)
    assert (r2.rows_read, r2.rows_merged, r2.rows_duplicate, r2.rows_quarantined) == (5, 1, 1, 3)
    quarantine, _, ledger = outcome_of(clean_db, r2)
    assert quarantine == {
        3: (["conflicts_with_existing"], "u1,i2,4,1000000001"),
        4: (["conflicting_duplicate_in_batch"], "u2,i3,2,1000000005"),
        5: (["conflicting_duplicate_in_batch"], "u2,i3,1,1000000005"),
    }
    assert ledger == ("merged", 5, 1, 1, 3)
    assert r2.reasons == {"conflicting_duplicate_in_batch": 2, "conflicts_with_existing": 1}
    assert [e["line"] for e in r2.examples] == [3, 4]
    # Users of the quarantined pair only are not created; those of merged rows are.
    with psycopg.connect(clean_db) as conn:
        users = {r[0] for r in conn.execute("SELECT user_id FROM recranker.users")}
    assert users == {"u1", "u2"}


def test_a_rejected_batch_keeps_every_line_as_the_reference_does(
    tmp_path: Path, settings: Settings, clean_db: str
):
    case = next(c for c in CASES if c.name == "values")
    path = write_case(tmp_path / "case", case)
    src = describe_file(path, None)
    with psycopg.connect(clean_db, autocommit=True) as conn:
        expected = reference(conn, clean_db, src, settings.ingest)
    result = run(path, settings, clean_db)
    assert result.status == "rejected"
    quarantine, merged, ledger = outcome_of(clean_db, result)
    assert merged == set()
    assert ledger == ("rejected", 15, 0, 0, 15)
    bad = {line: reasons for line, (reasons, _) in expected.quarantine.items()}
    assert {line: r for line, (r, _) in quarantine.items() if r != ["batch_rejected"]} == bad
    good_lines = set(quarantine) - set(bad)
    assert all(quarantine[line][0] == ["batch_rejected"] for line in good_lines)
    lines = path.read_text().splitlines()
    assert {line: raw for line, (_, raw) in quarantine.items()} == {
        n: lines[n - 1] for n in range(2, 17)
    }
