"""The quarantine split: the SQL that types a staged batch and gives every row exactly one
outcome (merge, duplicate, quarantine) with its reasons. The GX suite checks the same rules and
reports them; this is what decides where each row goes."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from recranker_core.config import IngestSettings

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

# Unbounded patterns plus a length guard: PostgreSQL's regex engine is several times slower on
# bounded repetitions ({1,15}) than on + and *, and this runs once per staged row.
_NUMBER = r"^[+-]?[0-9]*\.?[0-9]+$"
_UNIX_SECONDS = r"^[+-]?[0-9]+(\.[0-9]+)?$"
_ISO_8601 = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?)?"
    r" ?(Z|[+-][0-9]{2}(:?[0-9]{2})?)?$"
)
# C0 controls (tab, LF, CR, ...), DEL and the C1 controls; NUL cannot reach a text column (the
# line is quarantined as nul_byte before).
CONTROL_CHARACTER = r"[\x01-\x1f\x7f-\x9f]"
# An id that an operator would read as another id: padded with spaces.
SURROUNDING_SPACE = r"^ | $"
BAD_ID = f"{CONTROL_CHARACTER}|{SURROUNDING_SPACE}"
_NOT_FINITE = ("nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity")


@dataclass(frozen=True)
class StagedColumns:
    """Which staging columns hold the needed fields (staging columns are named c0, c1, ...)."""

    user_id: int
    item_id: int
    rating: int
    timestamp: int
    count: int
    delimiter: str


def classify_sql(
    staging: sql.Identifier,
    staged_items: sql.Identifier | None,
    classified: sql.Identifier,
    cols: StagedColumns,
    rules: IngestSettings,
) -> sql.Composed:
    """CREATE the classified table: one row per staged row with typed fields, its reasons, and
    outcome 'merge' (valid) or 'quarantine' (reasons say why). Repeats of stored or earlier rows
    are resolved later, inside the merge transaction (resolve_repeats_sql)."""

    def col(i: int) -> sql.Composable:
        return sql.SQL("s.{}").format(sql.Identifier(f"c{i}"))

    item_file_join = (
        sql.SQL("LEFT JOIN {} si ON si.item_id = t.item_id").format(staged_items)
        if staged_items is not None
        else sql.SQL("")
    )
    item_in_file = (
        sql.SQL("si.item_id IS NOT NULL") if staged_items is not None else sql.SQL("false")
    )
    item_known = (
        sql.SQL("true")
        if rules.auto_create_items
        else sql.SQL("(it.item_id IS NOT NULL OR {})").format(item_in_file)
    )
    return sql.SQL(
        """
CREATE UNLOGGED TABLE {classified} AS
-- Each level ends in OFFSET 0, which keeps the planner from inlining it: an inlined expression
-- is evaluated once per reference, and rating and event_ts are referenced several times.
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
            -- Ids exactly as given (a blank one is missing); rating and timestamp are parsed,
            -- so spaces around them do not matter.
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
    ).format(
        classified=classified,
        staging=staging,
        u=col(cols.user_id),
        i=col(cols.item_id),
        r=col(cols.rating),
        ts=col(cols.timestamp),
        number=sql.Literal(_NUMBER),
        unix=sql.Literal(_UNIX_SECONDS),
        iso=sql.Literal(_ISO_8601),
        item_known=item_known,
        max_len=sql.Literal(rules.max_id_length),
        # One regular expression per id on the common path; the second only names the reason.
        bad_id=sql.Literal(BAD_ID),
        control=sql.Literal(CONTROL_CHARACTER),
        not_finite=sql.Literal(list(_NOT_FINITE)),
        rmin=sql.Literal(rules.rating_min),
        rmax=sql.Literal(rules.rating_max),
        max_ts=sql.SQL("(now() + make_interval(secs => {}))").format(
            sql.Literal(rules.future_tolerance_s)
        ),
        min_ts=sql.Literal(rules.min_event_ts),
        item_file_join=item_file_join,
    )


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
  AND e.user_id = c.user_id AND e.item_id = c.item_id AND e.event_ts = c.event_ts
"""
        ).format(c=classified),
        sql.SQL(
            """
WITH repeated AS (
    SELECT user_id, item_id, event_ts, min(rating) <> max(rating) AS conflict
    FROM {c} WHERE outcome = 'merge'
    GROUP BY user_id, item_id, event_ts HAVING count(*) > 1
), ranked AS (
    SELECT c.line, r.conflict,
           row_number() OVER (PARTITION BY c.user_id, c.item_id, c.event_ts ORDER BY c.line) AS rn
    FROM {c} c
    JOIN repeated r USING (user_id, item_id, event_ts)
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
