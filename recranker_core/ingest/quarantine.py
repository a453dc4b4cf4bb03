"""Quarantined rows into recranker.quarantine (as classification kept them, or from staging once
repeats are resolved), their text read again where it was not kept, and the counts and first
lines per reason that messages quote."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from recranker_core.ingest.classify import _Staged
from recranker_core.ingest.staging import _StagingNames
from recranker_core.ingest.timing import _exec

if TYPE_CHECKING:
    from recranker_core.ingest.run import IngestResult


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
