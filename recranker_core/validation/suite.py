"""Great Expectations suites: the staged batch (before the merge) and the rows the merge wrote to
recranker.interactions (after it). Each expectation is a GX expectation validated by GX's own
logic (`metrics_validate`: success, `mostly`, the BASIC result) on the metrics it asks for; the
metrics come from what ingest already knows instead of a rescan: the staged batch's from its
classified columns as they are read, the merged rows' from one aggregate over the batch. Results
are stored in recranker.validation_results. The quarantine split (classify.py) decides where rows
go; the suites report the same rules, and the two must agree."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from recranker_core.config import IngestSettings

if TYPE_CHECKING:
    import psycopg

    from recranker_core.validation.classify import Classified

log = logging.getLogger(__name__)

# GX's BASIC result lists this many unexpected values.
PARTIAL = 20


@dataclass(frozen=True)
class ExpectationOutcome:
    """One expectation's result, in the shape of a validation_results row."""

    expectation: str
    column: str | None
    success: bool
    element_count: int | None
    unexpected_count: int | None
    details: dict[str, Any] = field(default_factory=dict)

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ColumnFacts:
    """The metrics of one column expectation: null rows, unexpected non-null rows, and the first
    PARTIAL unexpected values in line order."""

    nulls: int = 0
    unexpected: int = 0
    first: list[Any] = field(default_factory=list)


@dataclass
class SuiteFacts:
    """Rows seen and the facts of each expectation of a suite, by its key."""

    rows: int = 0
    columns: dict[str, ColumnFacts] = field(default_factory=dict)

    def column(self, key: str) -> ColumnFacts:
        return self.columns.setdefault(key, ColumnFacts())


@dataclass(frozen=True)
class StagedBounds:
    """The time bounds the staged suite checks, fixed when the batch starts so that the facts
    gathered while reading and the expectations shown agree."""

    min_ts: datetime
    max_ts: datetime

    @classmethod
    def now(cls, rules: IngestSettings) -> StagedBounds:
        return cls(
            min_ts=datetime.fromisoformat(rules.min_event_ts.replace("Z", "+00:00")),
            max_ts=datetime.now(UTC) + timedelta(seconds=rules.future_tolerance_s),
        )


def _staged_expectations(rules: IngestSettings, bounds: StagedBounds) -> list[tuple[str, Any]]:
    import great_expectations.expectations as gxe

    from recranker_core.validation.rules import BAD_ID

    return [
        ("parse_error:null", gxe.ExpectColumnValuesToBeNull(column="parse_error")),
        ("user_id:not_null", gxe.ExpectColumnValuesToNotBeNull(column="user_id")),
        (
            "user_id:length",
            gxe.ExpectColumnValueLengthsToBeBetween(
                column="user_id", max_value=rules.max_id_length
            ),
        ),
        ("user_id:regex", gxe.ExpectColumnValuesToNotMatchRegex(column="user_id", regex=BAD_ID)),
        ("item_id:not_null", gxe.ExpectColumnValuesToNotBeNull(column="item_id")),
        (
            "item_id:length",
            gxe.ExpectColumnValueLengthsToBeBetween(
                column="item_id", max_value=rules.max_id_length
            ),
        ),
        ("item_id:regex", gxe.ExpectColumnValuesToNotMatchRegex(column="item_id", regex=BAD_ID)),
        (
            "item_known:in_set",
            gxe.ExpectColumnValuesToBeInSet(column="item_known", value_set=[True]),
        ),
        ("rating:not_null", gxe.ExpectColumnValuesToNotBeNull(column="rating")),
        (
            "rating:between",
            gxe.ExpectColumnValuesToBeBetween(
                column="rating", min_value=rules.rating_min, max_value=rules.rating_max
            ),
        ),
        ("event_ts:not_null", gxe.ExpectColumnValuesToNotBeNull(column="event_ts")),
        (
            "event_ts:between",
            gxe.ExpectColumnValuesToBeBetween(
                column="event_ts", min_value=bounds.min_ts, max_value=bounds.max_ts
            ),
        ),
    ]


def add_staged_facts(
    facts: SuiteFacts, batch: Classified, rules: IngestSettings, bounds: StagedBounds
) -> None:
    """Add one classified batch to the staged suite's facts: per expectation, what GX would
    count over the batch's typed columns (nulls are neither expected nor unexpected)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from recranker_core.validation.classify import BAD_ID

    n = len(batch)
    facts.rows += n

    def add(key: str, nulls: np.ndarray, unexpected: np.ndarray, values: Any) -> None:
        col = facts.column(key)
        col.nulls += int(nulls.sum())
        rows = np.flatnonzero(unexpected)
        col.unexpected += len(rows)
        room = PARTIAL - len(col.first)
        if room > 0 and len(rows):
            col.first.extend(values(rows[:room]))

    def mask(array: pa.Array) -> np.ndarray:
        return np.asarray(pc.fill_null(array, False).to_numpy(zero_copy_only=False), dtype=bool)

    def taken(array: pa.Array) -> Any:
        return lambda rows: array.take(pa.array(rows)).to_pylist()

    def nones(rows: np.ndarray) -> list[None]:
        return [None] * len(rows)

    no_nulls = np.zeros(n, dtype=bool)
    has_error = mask(pc.is_valid(batch.parse_error))
    add("parse_error:null", ~has_error, has_error, taken(batch.parse_error))
    for name, ids in (("user_id", batch.user_id), ("item_id", batch.item_id)):
        null = ~mask(pc.is_valid(ids))
        add(f"{name}:not_null", null, null, nones)
        add(
            f"{name}:length",
            null,
            mask(pc.greater(pc.utf8_length(ids), rules.max_id_length)),
            taken(ids),
        )
        encoded = pc.dictionary_encode(ids)
        bad_value = mask(pc.match_substring_regex(encoded.dictionary, BAD_ID))
        index = pc.fill_null(encoded.indices, len(bad_value)).to_numpy()
        add(f"{name}:regex", null, np.append(bad_value, False)[index], taken(ids))
    add("item_known:in_set", no_nulls, ~batch.item_known, lambda rows: [False] * len(rows))
    rating_null = ~mask(pc.is_valid(batch.rating))
    add("rating:not_null", rating_null, rating_null, nones)
    rating = np.asarray(pc.fill_null(batch.rating, 0.0).to_numpy(), dtype=np.float32)
    out = ~rating_null & (
        (rating.astype(np.float64) < rules.rating_min) | (rating > rules.rating_max)
    )
    # PostgreSQL sends a real in its shortest form; GX showed that number as a Python float.
    add("rating:between", rating_null, out, lambda rows: [float(str(rating[r])) for r in rows])
    ts_null = ~mask(pc.is_valid(batch.event_us))
    add("event_ts:not_null", ts_null, ts_null, nones)
    micros = pc.fill_null(batch.event_us, 0).to_numpy()
    low, high = _micros(bounds.min_ts), _micros(bounds.max_ts)
    add(
        "event_ts:between",
        ts_null,
        ~ts_null & ((micros < low) | (micros > high)),
        lambda rows: [_datetime(int(micros[r])) for r in rows],
    )


def staged_outcomes(
    facts: SuiteFacts, rules: IngestSettings, bounds: StagedBounds
) -> list[ExpectationOutcome]:
    """The staged-batch suite's results from the facts gathered while the batch was read."""
    return _evaluate("staged_batch", facts, _staged_expectations(rules, bounds))


def table_outcomes(
    conn: psycopg.Connection, batch_id: int, rows_merged: int, rules: IngestSettings
) -> list[ExpectationOutcome]:
    """The interactions suite over the rows this batch merged (what the batch changed, read back
    from recranker.interactions on `conn`, inside the merge transaction): as many rows as the
    ledger says, ratings in range, no event in the future. One aggregate scan gives every
    metric; unexpected values are fetched only when there are some."""
    import great_expectations.expectations as gxe

    max_ts = datetime.now(UTC) + timedelta(seconds=rules.future_tolerance_s)
    bad_rating = "NOT (rating >= %(rmin)s AND rating <= %(rmax)s)"
    future = "event_ts > %(max_ts)s"
    params = {"batch": batch_id, "rmin": rules.rating_min, "rmax": rules.rating_max}
    params["max_ts"] = max_ts  # type: ignore[assignment]
    row = conn.execute(
        f"""SELECT count(*), count(*) FILTER (WHERE rating IS NULL),
                   count(*) FILTER (WHERE {bad_rating}),
                   count(*) FILTER (WHERE event_ts IS NULL), count(*) FILTER (WHERE {future})
            FROM recranker.interactions WHERE batch_id = %(batch)s""",
        params,
    ).fetchone()
    assert row is not None
    rows, rating_nulls, bad_ratings, ts_nulls, future_ts = (int(v) for v in row)

    def first(column: str, condition: str, count: int) -> list[Any]:
        if not count:
            return []
        return [
            r[0]
            for r in conn.execute(
                f"""SELECT {column} FROM recranker.interactions
                    WHERE batch_id = %(batch)s AND {condition} LIMIT {PARTIAL}""",
                params,
            )
        ]

    facts = SuiteFacts(rows=rows)
    facts.columns["rating:between"] = ColumnFacts(
        rating_nulls, bad_ratings, first("rating", bad_rating, bad_ratings)
    )
    facts.columns["event_ts:between"] = ColumnFacts(
        ts_nulls, future_ts, first("event_ts", future, future_ts)
    )
    expectations = [
        (
            "rows",
            gxe.ExpectTableRowCountToBeBetween(min_value=rows_merged, max_value=rows_merged),
        ),
        (
            "rating:between",
            gxe.ExpectColumnValuesToBeBetween(
                column="rating", min_value=rules.rating_min, max_value=rules.rating_max
            ),
        ),
        (
            "event_ts:between",
            gxe.ExpectColumnValuesToBeBetween(column="event_ts", max_value=max_ts),
        ),
    ]
    return _evaluate("interactions_table", facts, expectations)


def import_gx() -> None:
    """Import Great Expectations (seconds of imports: callers may do it ahead, in a thread)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # GX's chatter is not for our users; it also sets some of its loggers to INFO itself.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations.expectations  # noqa: F401

    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _evaluate(
    suite_name: str, facts: SuiteFacts, expectations: list[tuple[str, Any]]
) -> list[ExpectationOutcome]:
    """Each expectation validated by GX on the metrics it asks for, read from `facts`."""
    outcomes = []
    for key, expectation in expectations:
        runtime = {"result_format": "BASIC"}
        needs = expectation.get_validation_dependencies(runtime_configuration=dict(runtime))
        metrics = {
            cfg.id: _metric(name, facts, facts.columns.get(key))
            for name, cfg in needs.metric_configurations.items()
        }
        result = expectation.metrics_validate(metrics=metrics, runtime_configuration=runtime)
        outcomes.append(_outcome(result))
    log.info(
        "%s: %d of %d expectations met",
        suite_name,
        sum(o.success for o in outcomes),
        len(outcomes),
    )
    return outcomes


def _metric(name: str, facts: SuiteFacts, column: ColumnFacts | None) -> Any:
    if name == "table.row_count":
        return facts.rows
    if column is None:
        raise KeyError(f"no facts for metric {name}")
    if name == "column_values.nonnull.unexpected_count":
        return column.nulls
    if name.endswith(".unexpected_count"):
        return column.unexpected
    if name.endswith(".unexpected_values"):
        return list(column.first)
    raise KeyError(f"ingest does not compute the GX metric {name}")


def _outcome(result: Any) -> ExpectationOutcome:
    cfg = result.expectation_config
    kwargs = dict(cfg.kwargs)
    res = result.result or {}
    return ExpectationOutcome(
        expectation=cfg.type,
        column=kwargs.get("column") or ",".join(kwargs.get("column_list", [])) or None,
        success=bool(result.success),
        element_count=res.get("element_count", res.get("observed_value")),
        unexpected_count=res.get("unexpected_count"),
        details={
            "kwargs": {k: str(v) for k, v in kwargs.items() if k != "batch_id"},
            "partial_unexpected": [str(v) for v in res.get("partial_unexpected_list", [])][:5],
        },
    )


def _micros(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _datetime(micros: int) -> datetime | str:
    """The moment as GX showed it; past Python's year 9999 (an ISO time with an offset can get
    there), as text in the same shape."""
    try:
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    except OverflowError:
        return str(np.datetime64(micros, "us")).replace("T", " ") + "+00:00"
