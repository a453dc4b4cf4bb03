"""Great Expectations suites: the staged batch (before the merge) and the interactions table
(after it). They report the rules as GX results, stored in recranker.validation_results; the
quarantine split in rules.py decides where rows go, and the two must agree."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from recranker_core.config import IngestSettings
from recranker_core.db.connect import sqlalchemy_url

log = logging.getLogger(__name__)


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


def _staged_expectations(rules: IngestSettings) -> list[Any]:
    import great_expectations.expectations as gxe

    from recranker_core.validation.rules import BAD_ID

    max_ts = datetime.now(UTC) + timedelta(seconds=rules.future_tolerance_s)
    min_ts = datetime.fromisoformat(rules.min_event_ts.replace("Z", "+00:00"))
    return [
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
        gxe.ExpectColumnValuesToBeBetween(column="event_ts", min_value=min_ts, max_value=max_ts),
    ]


def _table_expectations(rules: IngestSettings) -> list[Any]:
    import great_expectations.expectations as gxe

    max_ts = datetime.now(UTC) + timedelta(seconds=rules.future_tolerance_s)
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeBetween(
            column="rating", min_value=rules.rating_min, max_value=rules.rating_max
        ),
        gxe.ExpectColumnValuesToBeBetween(column="event_ts", max_value=max_ts),
    ]


def _run_suite(
    database_url: str, schema: str, table: str, suite_name: str, expectations: list[Any]
) -> list[ExpectationOutcome]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX sets some of its module loggers to INFO itself; its chatter is not for our users.
    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_postgres(
        name=f"recranker-{uuid.uuid4().hex[:8]}",
        connection_string=sqlalchemy_url(database_url),
    )
    asset = source.add_table_asset(name=table, table_name=table, schema_name=schema)
    batch = asset.add_batch_definition_whole_table("whole").get_batch()
    suite = gx.ExpectationSuite(name=suite_name, expectations=expectations)
    result = batch.validate(suite, result_format="BASIC")
    outcomes = []
    for r in result.results:
        cfg = r.expectation_config
        if cfg is None:
            continue
        kwargs = dict(cfg.kwargs)
        res = r.result or {}
        outcomes.append(
            ExpectationOutcome(
                expectation=cfg.type,
                column=kwargs.get("column") or ",".join(kwargs.get("column_list", [])) or None,
                success=bool(r.success),
                element_count=res.get("element_count", res.get("observed_value")),
                unexpected_count=res.get("unexpected_count"),
                details={
                    "kwargs": {k: str(v) for k, v in kwargs.items() if k != "batch_id"},
                    "partial_unexpected": [str(v) for v in res.get("partial_unexpected_list", [])][
                        :5
                    ],
                },
            )
        )
    source_engine = getattr(source, "get_engine", None)
    if callable(source_engine):
        source_engine().dispose()
    log.info(
        "%s: %d of %d expectations met",
        suite_name,
        sum(o.success for o in outcomes),
        len(outcomes),
    )
    return outcomes


def validate_staged(
    database_url: str, schema: str, table: str, rules: IngestSettings
) -> list[ExpectationOutcome]:
    """Run the staged-batch suite over a classified staging table."""
    return _run_suite(database_url, schema, table, "staged_batch", _staged_expectations(rules))


def validate_table(database_url: str, rules: IngestSettings) -> list[ExpectationOutcome]:
    """Run the post-merge suite over recranker.interactions."""
    return _run_suite(
        database_url, "recranker", "interactions", "interactions_table", _table_expectations(rules)
    )
