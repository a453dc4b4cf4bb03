"""The quarantine split's rules: the reasons a row can be quarantined for, the patterns they
use, and the SQL that resolves repeats of stored or earlier rows inside the merge. classify.py
applies the row rules to each batch as it is read; the GX suite reports the same rules."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

# Reason codes, one per rule; each names the field it is about.
REASONS = {
    "invalid_utf8": "the line is not valid UTF-8",
    "nul_byte": "the line contains a NUL byte",
    "malformed_csv": "the line is not valid CSV (unbalanced quotes)",
    "wrong_field_count": "the line has more or fewer fields than the header",
    "empty_line": "the line is empty",
    "user_id_missing": "user_id is empty",
    "user_id_too_long": "user_id is longer than ingest.max_id_length",
    "user_id_control_character": "user_id holds a control character (tab, CR, LF, ...)",
    "user_id_whitespace": "user_id begins or ends with a space (ids are never trimmed)",
    "item_id_missing": "item_id is empty",
    "item_id_too_long": "item_id is longer than ingest.max_id_length",
    "item_id_control_character": "item_id holds a control character (tab, CR, LF, ...)",
    "item_id_whitespace": "item_id begins or ends with a space (ids are never trimmed)",
    "item_unknown": "item_id is neither in recranker.items nor in the batch's item file",
    "rating_missing": "rating is empty",
    "rating_not_numeric": "rating is not a number",
    "rating_not_finite": "rating is NaN or infinite",
    "rating_out_of_range": "rating is outside [ingest.rating_min, ingest.rating_max]",
    "timestamp_missing": "timestamp is empty",
    "timestamp_invalid": "timestamp is neither unix seconds nor an ISO 8601 date-time",
    "timestamp_in_future": "timestamp lies after the ingest clock (+ ingest.future_tolerance_s)",
    "timestamp_too_old": "timestamp lies before ingest.min_event_ts",
    "conflicting_duplicate_in_batch": "the batch has this (user_id, item_id, timestamp) twice "
    "with different ratings",
    "conflicts_with_existing": "recranker.interactions holds this (user_id, item_id, timestamp) "
    "with a different rating",
    "batch_rejected": "the row is valid but its batch was over the failure budget",
}

# The patterns of the rules, as the GX suite shows them (classify.py runs them).
# C0 controls (tab, LF, CR, ...), DEL and the C1 controls.
CONTROL_CHARACTER = r"[\x01-\x1f\x7f-\x9f]"
# An id that an operator would read as another id: padded with spaces.
SURROUNDING_SPACE = r"^ | $"
BAD_ID = f"{CONTROL_CHARACTER}|{SURROUNDING_SPACE}"

# A staged row's event time is held as unix microseconds (`event_us`); this is it as the
# timestamptz it becomes, exactly (whole seconds through to_timestamp, then the microseconds).
EVENT_TS = (
    "(to_timestamp({c}.event_us / 1000000) + mod({c}.event_us, 1000000) * interval '1 microsecond')"
)


@dataclass(frozen=True)
class StagedColumns:
    """Which staging columns hold the needed fields (staging columns are named c0, c1, ...)."""

    user_id: int
    item_id: int
    rating: int
    timestamp: int
    count: int
    delimiter: str


def event_ts_sql(alias: str) -> sql.Composable:
    """The timestamptz of staged rows under `alias` (see EVENT_TS)."""
    return sql.SQL(EVENT_TS.format(c=alias))


def resolve_repeats_sql(classified: sql.Identifier) -> list[sql.Composed]:
    """UPDATEs that turn valid rows repeating a stored row or an earlier line of the batch into
    duplicates (same rating) or quarantined conflicts (different rating).

    Run inside the merge transaction while holding the merge lock, so that what is stored cannot
    change between this check and the insert. The first statement compares with the table; the
    second looks only at keys that occur more than once in what is left, so a batch without
    repeats costs one hash aggregate.
    """
    return [
        sql.SQL(
            """
UPDATE {c} AS c
SET outcome = CASE WHEN e.rating IS NOT DISTINCT FROM c.rating THEN 'duplicate'
                   ELSE 'quarantine' END,
    reasons = CASE WHEN e.rating IS NOT DISTINCT FROM c.rating THEN c.reasons
                   ELSE ARRAY['conflicts_with_existing'] END
FROM recranker.interactions e
WHERE c.outcome = 'merge'
  AND e.user_id = c.user_id AND e.item_id = c.item_id AND e.event_ts = {event_ts}
"""
        ).format(c=classified, event_ts=event_ts_sql("c")),
        sql.SQL(
            """
WITH repeated AS (
    SELECT user_id, item_id, event_us, min(rating) <> max(rating) AS conflict
    FROM {c} WHERE outcome = 'merge'
    GROUP BY user_id, item_id, event_us HAVING count(*) > 1
), ranked AS (
    SELECT c.line, r.conflict,
           row_number() OVER (PARTITION BY c.user_id, c.item_id, c.event_us ORDER BY c.line) AS rn
    FROM {c} c
    JOIN repeated r USING (user_id, item_id, event_us)
    WHERE c.outcome = 'merge'
)
UPDATE {c} AS c
SET outcome = CASE WHEN r.conflict THEN 'quarantine' ELSE 'duplicate' END,
    reasons = CASE WHEN r.conflict THEN ARRAY['conflicting_duplicate_in_batch'] ELSE c.reasons END
FROM ranked r
WHERE c.line = r.line AND (r.conflict OR r.rn > 1)
"""
        ).format(c=classified),
    ]
