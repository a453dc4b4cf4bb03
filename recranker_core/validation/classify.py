"""The quarantine split, vectorised: one batch of staged text fields is typed and every row given
exactly one outcome (merge or quarantine) with its reasons (rules.REASONS), column by column
over the whole batch rather than row by row. Ids and ratings repeat a lot, so their rules run once
per distinct value. Repeats of stored or earlier rows are resolved later, in SQL
(rules.resolve_repeats_sql)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from recranker_core.config import IngestSettings
from recranker_core.validation.rules import REASONS

if TYPE_CHECKING:
    import pyarrow as pa

# Reason codes as small integers (0: none), in REASONS' order.
REASON_NAMES: tuple[str, ...] = ("",) + tuple(REASONS)
_CODE = {name: code for code, name in enumerate(REASON_NAMES) if name}
# The four slots of a row's reasons, in the order the reasons are listed: user_id, item_id,
# rating, timestamp. A line that could not be split has one reason, in the first slot.
SLOTS = 4
# Combined keys of a row's reason codes (base 32 per slot) fit an int32.
_KEY_BASE = 32
assert len(REASON_NAMES) <= _KEY_BASE

# The patterns of rules.py in RE2 syntax (what pyarrow runs); the same text works for both.
# NUL joins the control characters: PostgreSQL text cannot hold it, and only a Parquet string can
# bring one this far (a CSV line holding NUL is quarantined as nul_byte when read).
CONTROL_CHARACTER = r"[\x00-\x1f\x7f-\x9f]"
BAD_ID = CONTROL_CHARACTER + r"|^ | $"
_NUMBER = r"^[+-]?[0-9]*\.?[0-9]+$"
_UNIX_SECONDS = r"^[+-]?[0-9]+(\.[0-9]+)?$"
_ISO_8601 = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?)?"
    r" ?(Z|[+-][0-9]{2}(:?[0-9]{2})?)?$"
)
_NOT_FINITE = ("nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity")
# PostgreSQL's epoch (2000-01-01) in unix seconds: to_timestamp(float8) computes from it.
_PG_EPOCH_S = 946_684_800
_PG_EPOCH_US = _PG_EPOCH_S * 1_000_000
# Unix seconds with at most this many digits and nothing else take the fast path (< 1e11).
_FAST_DIGITS = 11


@dataclass(frozen=True)
class Clock:
    """The time bounds of valid events, in unix microseconds: `max_us` is the database's now()
    plus ingest.future_tolerance_s, `min_us` is ingest.min_event_ts."""

    max_us: int
    min_us: int


@dataclass
class Lookups:
    """What classification asks the database. `known_items` (None: ingest.auto_create_items)
    answers which of some item ids are in recranker.items or the batch's item file;
    `iso_micros` types ISO 8601 text as PostgreSQL does (unix microseconds, None if invalid)."""

    known_items: Callable[[list[str]], set[str]] | None
    iso_micros: Callable[[list[str]], list[int | None]]


@dataclass
class Classified:
    """One batch, typed. Ids are as given (null when missing or blank); rating is float32 and
    event_us unix microseconds, null where the text is not one; `codes` holds each row's reason
    codes (REASON_NAMES) in SLOTS columns, all zero for a valid row."""

    line: npt.NDArray[np.int64]
    parse_error: pa.Array
    user_id: pa.Array
    item_id: pa.Array
    item_known: npt.NDArray[np.bool_]
    rating: pa.Array
    event_us: pa.Array
    codes: npt.NDArray[np.uint8]
    valid: npt.NDArray[np.bool_]
    fields: list[pa.Array]
    raw: pa.Array
    delimiter: str
    # The rating as the shortest text that reads back as the same float32 (null: not a rating).
    rating_text: pa.Array
    # Some id holds a quote or a comma (CSV must quote it).
    ids_need_quotes: bool

    def __len__(self) -> int:
        return len(self.line)

    def reason_keys(self) -> npt.NDArray[np.int32]:
        """One int32 per row naming its combination of reasons (0: valid)."""
        key = np.zeros(len(self), dtype=np.int32)
        for slot in range(SLOTS):
            key = key * _KEY_BASE + self.codes[:, slot]
        return key

    def raw_text(self, rows: npt.NDArray[np.int64]) -> pa.Array:
        """The staged text of each of `rows` (see raw_lines)."""
        return _raw(self.fields, self.raw, rows, self.delimiter)


def raw_lines(batch: pa.RecordBatch, rows: npt.NDArray[np.int64], delimiter: str) -> pa.Array:
    """The staged line of each of `rows` of a batch as the readers give it: verbatim where the
    reader kept it (a line it could not split), else its fields joined by the delimiter (what
    the line was, for the line formats and unquoted CSV)."""
    fields = [batch.column(f"c{i}") for i in range(batch.num_columns - 3)]
    return _raw(fields, batch.column("raw"), rows, delimiter)


def _raw(
    fields: list[pa.Array], raw: pa.Array, rows: npt.NDArray[np.int64], delimiter: str
) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(rows) == 0:
        return pa.array([], pa.string())
    index = pa.array(rows)
    parts = [pc.fill_null(f.take(index), "") for f in fields]
    text = pc.coalesce(raw.take(index), pc.binary_join_element_wise(*parts, delimiter))
    # PostgreSQL text cannot hold NUL (only a Parquet string can bring one here).
    return pc.replace_substring(text, "\x00", "\\x00")


def reasons_of_key(key: int) -> list[str]:
    """The reason names of a combined key (Classified.reason_keys), in slot order."""
    names = []
    for slot in reversed(range(SLOTS)):
        code = (key // _KEY_BASE**slot) % _KEY_BASE
        if code:
            names.append(REASON_NAMES[code])
    return names


def classify(
    batch: pa.RecordBatch,
    positions: tuple[int, int, int, int],
    delimiter: str,
    rules: IngestSettings,
    clock: Clock,
    lookups: Lookups,
) -> Classified:
    """Type and classify one batch of staged rows: columns `line` (int64), `c0`, `c1`, ... (the
    fields as text), `parse_error` and `raw` (the reason and text of a line that could not be
    split; null otherwise). `positions` are the fields holding user_id, item_id, rating and
    timestamp. The rules and their order are those of rules.REASONS."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    fields = [batch.column(f"c{i}") for i in range(batch.num_columns - 3)]
    u, i, r, t = (fields[p] for p in positions)
    codes = np.zeros((n, SLOTS), dtype=np.uint8)
    user_id, codes[:, 0], _, user_quotes = _ids(u, "user_id", rules.max_id_length, None)
    item_id, codes[:, 1], item_known, item_quotes = _ids(
        i, "item_id", rules.max_id_length, lookups.known_items
    )
    rating, rating_text, codes[:, 2] = _ratings(r, rules)
    event_us, codes[:, 3] = _timestamps(t, clock, lookups.iso_micros)
    # A line that could not be split has its one reason and nothing else (its fields are null).
    parse_error = batch.column("parse_error")
    unsplit = _mask(pc.is_valid(parse_error))
    if unsplit.any():
        codes[unsplit] = 0
        errors = parse_error.filter(pa.array(unsplit)).to_pylist()
        codes[unsplit, 0] = [_CODE[e] for e in errors]
    return Classified(
        line=batch.column("line").to_numpy().astype(np.int64, copy=False),
        parse_error=parse_error,
        user_id=user_id,
        item_id=item_id,
        item_known=item_known,
        rating=rating,
        event_us=event_us,
        codes=codes,
        valid=np.logical_not(codes.any(axis=1)),
        fields=fields,
        raw=batch.column("raw"),
        delimiter=delimiter,
        rating_text=rating_text,
        ids_need_quotes=user_quotes or item_quotes,
    )


def _mask(array: pa.Array) -> npt.NDArray[np.bool_]:
    """A boolean array as numpy, null as False."""
    import pyarrow.compute as pc

    return np.asarray(pc.fill_null(array, False).to_numpy(zero_copy_only=False), dtype=np.bool_)


def _by_value(array: pa.Array) -> tuple[pa.Array, npt.NDArray[np.int64]]:
    """The distinct values of `array` and, per row, the index of its value; a null row points one
    past the last value, so per-value results extended by the null case can be taken by row."""
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(array)
    values = encoded.dictionary
    index = pc.fill_null(encoded.indices, len(values)).to_numpy().astype(np.int64, copy=False)
    return values, index


def _ids(
    column: pa.Array,
    name: str,
    max_length: int,
    known: Callable[[list[str]], set[str]] | None,
) -> tuple[pa.Array, npt.NDArray[np.uint8], npt.NDArray[np.bool_], bool]:
    """An id column as given (null when blank: spaces only), its reason per row (missing, too
    long, control character or surrounding space, and with `known`, unknown), whether the id
    is known (`known` None: every row is, as ingest.auto_create_items wants) and whether some id
    holds a quote or a comma."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values, index = _by_value(column)
    blank = _mask(pc.equal(pc.utf8_trim(values, " "), ""))
    too_long = _mask(pc.greater(pc.utf8_length(values), max_length))
    bad = _mask(pc.match_substring_regex(values, BAD_ID))
    control = _mask(pc.match_substring_regex(values, CONTROL_CHARACTER))
    code = np.zeros(len(values) + 1, dtype=np.uint8)
    code[:-1] = np.select(
        [blank, too_long, bad & control, bad],
        [
            _CODE[f"{name}_missing"],
            _CODE[f"{name}_too_long"],
            _CODE[f"{name}_control_character"],
            _CODE[f"{name}_whitespace"],
        ],
        0,
    )
    code[-1] = _CODE[f"{name}_missing"]
    is_known = np.ones(len(values) + 1, dtype=np.bool_)
    if known is not None:
        present = np.flatnonzero(~blank)
        asked = values.take(pa.array(present)).to_pylist()
        found = known(asked)
        is_known[:] = False
        is_known[present] = np.fromiter((v in found for v in asked), bool, count=len(asked))
        code[(code == 0) & ~is_known] = _CODE["item_unknown"]
    kept = pa.array(np.append(~blank, False)[index])
    ids = pc.if_else(kept, column, pa.scalar(None, pa.string()))
    quotes = bool(_mask(pc.match_substring_regex(values, '[",]')).any())
    return ids, code[index], is_known[index], quotes


def _ratings(
    column: pa.Array, rules: IngestSettings
) -> tuple[pa.Array, pa.Array, npt.NDArray[np.uint8]]:
    """Ratings as float32 (null where the text is not a finite number) and as the text of that
    float32, and the reason per row: missing, not finite, not numeric, out of
    [rating_min, rating_max] (compared as float8, the real is stored)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values, index = _by_value(column)
    text = pc.utf8_trim(values, " ")
    missing = _mask(pc.equal(text, ""))
    not_finite = _mask(pc.is_in(pc.utf8_lower(text), value_set=pa.array(_NOT_FINITE)))
    numeric = _mask(
        pc.and_(pc.less_equal(pc.utf8_length(text), 30), pc.match_substring_regex(text, _NUMBER))
    )
    number = np.full(len(values), np.nan)
    if numeric.any():
        number[numeric] = pc.cast(text.filter(pa.array(numeric)), pa.float64()).to_numpy()
    out_of_range = numeric & ((number < rules.rating_min) | (number > rules.rating_max))
    code = np.zeros(len(values) + 1, dtype=np.uint8)
    code[:-1] = np.select(
        [missing, not_finite, ~numeric, out_of_range],
        [
            _CODE["rating_missing"],
            _CODE["rating_not_finite"],
            _CODE["rating_not_numeric"],
            _CODE["rating_out_of_range"],
        ],
        0,
    )
    code[-1] = _CODE["rating_missing"]
    per_value = pa.array(
        np.append(number, np.nan).astype(np.float32), mask=np.append(~numeric, True)
    )
    rows = pa.array(index)
    return per_value.take(rows), pc.cast(per_value, pa.string()).take(rows), code[index]


def _timestamps(
    column: pa.Array, clock: Clock, iso_micros: Callable[[list[str]], list[int | None]]
) -> tuple[pa.Array, npt.NDArray[np.uint8]]:
    """Event times in unix microseconds, as PostgreSQL types them: unix seconds (|s| < 1e11)
    through to_timestamp(float8), ISO 8601 text through its timestamptz input; null where the
    text is neither. The reason per row: missing, invalid, in the future, too old."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(column)
    micros = np.zeros(n, dtype=np.int64)
    known = np.zeros(n, dtype=np.bool_)
    code = np.zeros(n, dtype=np.uint8)
    fast = _digits_only(column, _FAST_DIGITS)
    if fast.any():
        seconds = pc.cast(column.filter(pa.array(fast)), pa.int64()).to_numpy()
        micros[fast] = _to_timestamp(seconds.astype(np.float64))
        known[fast] = True
    rest = np.flatnonzero(~fast)
    if len(rest):
        text = pc.utf8_trim(column.take(pa.array(rest)), " ")
        missing = ~_mask(pc.is_valid(text)) | _mask(pc.equal(text, ""))
        unix = _mask(
            pc.and_(
                pc.less_equal(pc.utf8_length(text), 30),
                pc.match_substring_regex(text, _UNIX_SECONDS),
            )
        )
        iso = ~unix & _mask(pc.match_substring_regex(text, _ISO_8601))
        if unix.any():
            seconds_f = pc.cast(text.filter(pa.array(unix)), pa.float64()).to_numpy()
            in_range = np.abs(seconds_f) < 1e11
            rows = rest[unix][in_range]
            micros[rows] = _to_timestamp(seconds_f[in_range])
            known[rows] = True
        if iso.any():
            iso_values, iso_index = _by_value(text.filter(pa.array(iso)))
            parsed = iso_micros(iso_values.to_pylist())
            ok = np.fromiter((p is not None for p in parsed), dtype=np.bool_, count=len(parsed))
            as_int = np.fromiter((p or 0 for p in parsed), dtype=np.int64, count=len(parsed))
            rows = rest[iso]
            micros[rows] = as_int[iso_index]
            known[rows] = ok[iso_index]
        code[rest[missing]] = _CODE["timestamp_missing"]
    invalid = ~known & (code == 0)
    code[invalid] = _CODE["timestamp_invalid"]
    code[known & (micros > clock.max_us)] = _CODE["timestamp_in_future"]
    code[known & (micros < clock.min_us)] = _CODE["timestamp_too_old"]
    return pa.array(micros, mask=~known), code


def _to_timestamp(seconds: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """PostgreSQL's to_timestamp(float8), in unix microseconds: the same double arithmetic
    (shift to its 2000 epoch, scale, round half to even), so every bit agrees."""
    pg = np.rint((seconds - float(_PG_EPOCH_S)) * 1e6).astype(np.int64)
    return pg + _PG_EPOCH_US


def _digits_only(column: pa.Array, max_digits: int) -> npt.NDArray[np.bool_]:
    """Per row: 1..max_digits ASCII digits and nothing else (null: False), read straight from
    the string buffers."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if column.null_count:
        column = pc.fill_null(column, "")
    if not pa.types.is_string(column.type):
        column = column.cast(pa.string())
    n = len(column)
    _, offsets_buf, data_buf = column.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[column.offset : column.offset + n + 1]
    data = (
        np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    )
    start = int(offsets[0])
    lengths = np.diff(offsets)
    fits = (lengths >= 1) & (lengths <= max_digits)
    body = data[start : int(offsets[-1])]
    # Non-digit bytes are rare in a column of unix seconds: find them, then their rows.
    nondigit = np.flatnonzero((body < ord("0")) | (body > ord("9")))
    if len(nondigit):
        rows = np.searchsorted(offsets, nondigit + start, side="right") - 1
        fits[rows] = False
    return fits
