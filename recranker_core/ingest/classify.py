"""Classifying a file's rows (merge or quarantine, with reasons) batch by batch: the plan set up
before the merge (the reader, the database's clock and lookups), what classification learns
while reading, and the path that classifies into a staging table."""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from recranker_core.config import Settings
from recranker_core.datasets.sources import SourceFile
from recranker_core.db.connect import connect
from recranker_core.ingest.read import _line_reader, _ReadByLine, _Reader, _reader
from recranker_core.ingest.staging import _create_table, _StagingNames

if TYPE_CHECKING:
    import pyarrow as pa

    from recranker_core.ingest.run import IngestResult
    from recranker_core.validation.classify import Classified, Clock, Lookups
    from recranker_core.validation.suite import StagedBounds, SuiteFacts

log = logging.getLogger(__name__)

# The classified rows: valid rows arrive with line, ids, rating and event_us only (the defaults
# say 'merge' and no reasons); quarantined rows with line, outcome, reasons and raw.
_CLASSIFIED_COLUMNS = sql.SQL(
    """line bigint NOT NULL, user_id text COLLATE "C", item_id text COLLATE "C", rating real,
       event_us bigint, outcome text NOT NULL DEFAULT 'merge',
       reasons text[] NOT NULL DEFAULT '{}', raw text"""
)


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
