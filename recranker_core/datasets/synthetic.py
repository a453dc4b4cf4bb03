"""Synthetic MovieLens-shaped data at any scale, for benchmarks and tests: users.csv, items.csv and
an interaction file (CSV or Parquet) written chunk by chunk in bounded memory, the same bytes for
the same arguments.

The shape: item popularity follows a Zipf law (exponent 1.0) over a random ranking of the items;
user activity a milder rank power law (exponent 0.5) with at least one interaction per user; half of
a user's interactions come from one favourite genre, so there is a collaborative signal to learn;
ratings 1..5 follow MovieLens-100K's proportions (6/11/27/34/21 %), higher for good items, for
generous users and inside the favourite genre. Rows come grouped by user, each user's timestamps
strictly increasing (so (user, item, timestamp) is unique) inside the window that ends at `end`.
A (user, item) pair repeats (at different times) only rarely, when redraws run out.
"""

from __future__ import annotations

import csv
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from recranker_core.datasets.synthetic_model import (
    _GENRES,
    _STREAM_ITEMS,
    _STREAM_USERS,
    _activity_counts,
    _blocks,
    _format_ids,
    _ItemModel,
    _rating_thresholds,
    _rng,
)
from recranker_core.errors import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)

INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
ITEM_COLUMNS = ("item_id", "title", "year", "genres")
USER_COLUMNS = ("user_id", "age", "gender", "occupation")
FORMATS = ("csv", "parquet")

# 2025-01-01T00:00:00Z: a fixed end keeps the output independent of the wall clock (same seed,
# same bytes) while staying in the past, so ingest never sees future timestamps.
DEFAULT_END_TS = 1_735_689_600
DEFAULT_DAYS = 3 * 365

# Rows per chunk of users.csv and items.csv.
_ATTR_CHUNK = 1 << 16
_MISSING_YEAR_SHARE = 0.005

_OCCUPATIONS: tuple[tuple[str, int], ...] = (
    ("student", 196),
    ("other", 105),
    ("educator", 95),
    ("administrator", 79),
    ("engineer", 67),
    ("programmer", 66),
    ("librarian", 51),
    ("writer", 45),
    ("executive", 32),
    ("scientist", 31),
    ("artist", 28),
    ("technician", 27),
    ("marketing", 26),
    ("entertainment", 18),
    ("healthcare", 16),
    ("retired", 14),
    ("lawyer", 12),
    ("salesman", 12),
    ("none", 9),
    ("homemaker", 7),
    ("doctor", 7),
)
_ADJECTIVES = (
    "Silent", "Broken", "Golden", "Last", "Hidden", "Wild", "Dark", "Lost", "Crimson", "Endless",
    "Frozen", "Secret", "Burning", "Distant", "Quiet", "Electric", "Savage", "Little", "Midnight",
    "Forgotten", "Restless", "Bitter", "Hollow", "Shining", "Final", "Lonely", "Iron", "Velvet",
)  # fmt: skip
# MovieLens moves a leading article to the end ("River, The"), which puts commas in titles; the
# quoted form puts quotes in some. Both must survive a CSV round trip.
_TITLE_PATTERNS = (
    "The {adj} {noun}",
    "{adj} {noun}",
    "{noun} of the {noun2}",
    "{adj} {noun}, The",
    "{noun}: The {adj} {noun2}",
    '"{adj}" {noun}',
)
_NOUNS = (
    "River", "City", "Summer", "Road", "Heart", "Empire", "Garden", "Storm", "Island", "Night",
    "Mirror", "Kingdom", "Harbor", "Promise", "Frontier", "Shadow", "Orchard", "Station", "Winter",
    "Voyage", "Witness", "Stranger", "Legacy", "Tide", "Signal", "Canyon", "Ballad", "Circus",
)  # fmt: skip


@dataclass(frozen=True)
class SynthFiles:
    """Where `generate` wrote the data set and how many rows each file holds (headers excluded)."""

    directory: Path
    interactions: Path
    items: Path
    users: Path
    fmt: str
    interaction_rows: int
    item_rows: int
    user_rows: int


def generate(
    out_dir: Path,
    *,
    users: int,
    items: int,
    interactions: int,
    seed: int,
    fmt: str = "csv",
    chunk_rows: int = 1_000_000,
    end: int = DEFAULT_END_TS,
    days: int = DEFAULT_DAYS,
) -> SynthFiles:
    """Write users.csv, items.csv and interactions.csv (or .parquet) into `out_dir`.

    `end` (unix seconds) and `days` bound the timestamps: every one lies in [end - days, end).
    Each file is written under a temporary name and renamed at the end, so a reader never sees a
    half-written file. Ids look like `u000123` and `i00042` (wider when the counts need it).
    """
    _check_arguments(users, items, interactions, seed, fmt, chunk_rows, end, days)
    import numpy as np

    window = days * 86_400
    counts = _activity_counts(users, items, interactions, seed)
    busiest = int(counts.max())
    if busiest > window:
        raise ConfigError(
            f"one synthetic user needs {busiest:,} distinct timestamps but the window holds only "
            f"{window:,} seconds; raise days or users, or lower interactions"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _ItemModel.build(items, seed)
    thresholds = _rating_thresholds(model, counts, seed)

    user_width = max(6, len(str(users)))
    item_width = max(5, len(str(items)))
    item_ids = _format_ids("i", np.arange(1, items + 1), item_width)

    log.info(
        "Generating %s interactions for %s users and %s items into %s (%s)",
        f"{interactions:,}",
        f"{users:,}",
        f"{items:,}",
        out_dir,
        fmt,
    )
    users_path = _write_users(out_dir / "users.csv", users, user_width, seed)
    items_path = _write_items(out_dir / "items.csv", model, item_ids, end, seed)

    blocks = _blocks(counts, seed, model, thresholds, end, window, user_width, item_ids)
    name = f"interactions.{fmt}"
    writer = _write_interactions_parquet if fmt == "parquet" else _write_interactions_csv
    inter_path, written = writer(out_dir / name, _rechunk(blocks, chunk_rows))
    other = out_dir / f"interactions.{'csv' if fmt == 'parquet' else 'parquet'}"
    if other.exists():
        # A loader pointed at the directory would read both files and ingest every row twice.
        log.warning("Removing %s left by an earlier run in the other format", other)
        other.unlink()
    if written != interactions:  # pragma: no cover - an internal invariant
        raise AssertionError(f"wrote {written} interaction rows, expected {interactions}")
    log.info("Wrote %s interaction rows to %s", f"{written:,}", inter_path)
    return SynthFiles(
        directory=out_dir,
        interactions=inter_path,
        items=items_path,
        users=users_path,
        fmt=fmt,
        interaction_rows=written,
        item_rows=items,
        user_rows=users,
    )


def _check_arguments(
    users: int,
    items: int,
    interactions: int,
    seed: int,
    fmt: str,
    chunk_rows: int,
    end: int,
    days: int,
) -> None:
    problems = []
    if users < 1 or items < 1:
        problems.append(f"users ({users}) and items ({items}) must be at least 1")
    if interactions < users:
        problems.append(
            f"interactions ({interactions}) must be at least users ({users}): every user gets one"
        )
    if seed < 0:
        problems.append(f"seed ({seed}) must not be negative")
    if fmt not in FORMATS:
        problems.append(f"fmt {fmt!r} is not one of {', '.join(FORMATS)}")
    if chunk_rows < 1:
        problems.append(f"chunk_rows ({chunk_rows}) must be at least 1")
    if days < 1 or end - days * 86_400 < 0:
        problems.append(f"the window ({days} days before {end}) must lie after 1970")
    if problems:
        raise ConfigError("cannot generate synthetic data: " + "; ".join(problems))


def _rechunk(blocks: Iterator[pa.Table], chunk_rows: int) -> Iterator[pa.Table]:
    import pyarrow as pa

    pending: list[pa.Table] = []
    size = 0
    for table in blocks:
        pending.append(table)
        size += table.num_rows
        while size >= chunk_rows:
            whole = pa.concat_tables(pending)
            yield whole.slice(0, chunk_rows).combine_chunks()
            rest = whole.slice(chunk_rows)
            pending, size = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
    if size:
        yield pa.concat_tables(pending).combine_chunks()


def _atomic_write(path: Path, write: Callable[[Path], int]) -> tuple[Path, int]:
    """Run `write` on a temporary file next to `path`, then rename it into place."""
    # Not mkstemp: its files are private (0600); these get the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        rows = write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path, rows


def _write_interactions_csv(path: Path, chunks: Iterator[pa.Table]) -> tuple[Path, int]:
    import pyarrow.csv as pacsv

    # Arrow quotes header names even with quoting "none"; ids never hold commas or quotes.
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")

    def write(tmp: Path) -> int:
        rows = 0
        with tmp.open("wb") as f:
            f.write((",".join(INTERACTION_COLUMNS) + "\n").encode())
            for table in chunks:
                pacsv.write_csv(table, f, options)
                rows += table.num_rows
        return rows

    return _atomic_write(path, write)


def _write_interactions_parquet(path: Path, chunks: Iterator[pa.Table]) -> tuple[Path, int]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("user_id", pa.string()),
            ("item_id", pa.string()),
            ("rating", pa.int8()),
            ("timestamp", pa.int64()),  # unix seconds, as in the CSV
        ]
    )

    def write(tmp: Path) -> int:
        rows = 0
        with pq.ParquetWriter(tmp, schema) as writer:
            for table in chunks:
                writer.write_table(table, row_group_size=table.num_rows)
                rows += table.num_rows
        return rows

    return _atomic_write(path, write)


def _write_users(path: Path, users: int, width: int, seed: int) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    occ_names = pa.array([name for name, _ in _OCCUPATIONS])
    occ_weights = np.array([w for _, w in _OCCUPATIONS], dtype=np.float64)
    genders = pa.array(["F", "M"])
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")

    def write(tmp: Path) -> int:
        with tmp.open("wb") as f:
            f.write((",".join(USER_COLUMNS) + "\n").encode())
            for part, first in enumerate(range(0, users, _ATTR_CHUNK)):
                last = min(first + _ATTR_CHUNK, users)
                rng = _rng(seed, _STREAM_USERS, part)
                n = last - first
                # MovieLens-100K: ages 7..73 around 34, 71 % men.
                age = np.clip(np.rint(rng.normal(34.0, 12.0, n)), 7, 80).astype(np.int16)
                gender = (rng.random(n) < 0.71).astype(np.int64)
                occ = rng.choice(len(occ_weights), size=n, p=occ_weights / occ_weights.sum())
                table = pa.table(
                    {
                        "user_id": _format_ids("u", np.arange(first + 1, last + 1), width),
                        "age": pa.array(age),
                        "gender": genders.take(pa.array(gender)),
                        "occupation": occ_names.take(pa.array(occ)),
                    }
                )
                pacsv.write_csv(table, f, options)
        return users

    return _atomic_write(path, write)[0]


def _write_items(path: Path, model: _ItemModel, item_ids: pa.Array, end: int, seed: int) -> Path:
    import numpy as np

    genre_names = [name for name, _ in _GENRES]
    # The last full year before the window ends, so no movie comes out after its ratings.
    last_year = datetime.fromtimestamp(end, UTC).year - 1
    ids = item_ids.to_pylist()

    def write(tmp: Path) -> int:
        # The csv module, unlike Arrow, quotes only the titles that need it ("River, The").
        with tmp.open("w", encoding="utf-8", newline="") as f:
            out = csv.writer(f, lineterminator="\n")
            out.writerow(ITEM_COLUMNS)
            for part, first in enumerate(range(0, model.n, _ATTR_CHUNK)):
                last = min(first + _ATTR_CHUNK, model.n)
                rng = _rng(seed, _STREAM_ITEMS, part)
                n = last - first
                # Release years lean recent; a few are unknown, as in MovieLens.
                year = np.maximum(last_year - np.floor(rng.exponential(12.0, n)), 1920)
                no_year = rng.random(n) < _MISSING_YEAR_SHARE
                extra = rng.choice(3, size=n, p=[0.45, 0.35, 0.2])
                extra_genres = rng.integers(0, len(genre_names), size=(n, 2))
                pattern = rng.integers(0, len(_TITLE_PATTERNS), size=n)
                adj = rng.integers(0, len(_ADJECTIVES), size=n)
                noun = rng.integers(0, len(_NOUNS), size=(n, 2))
                sequel = rng.random(n) < 0.04
                # Plain Python values from here on: indexing numpy arrays one element at a
                # time is several times slower than lists.
                years = [
                    "" if miss else str(y)
                    for y, miss in zip(year.astype(int).tolist(), no_year.tolist(), strict=True)
                ]
                primary = model.genre[first:last].tolist()
                rows = []
                for k, (pat, a, (n1, n2), (g1, g2), n_extra, is_sequel) in enumerate(
                    zip(
                        pattern.tolist(),
                        adj.tolist(),
                        noun.tolist(),
                        extra_genres.tolist(),
                        extra.tolist(),
                        sequel.tolist(),
                        strict=True,
                    )
                ):
                    genres = [genre_names[primary[k]]]
                    for g in (g1, g2)[:n_extra]:
                        if genre_names[g] not in genres:
                            genres.append(genre_names[g])
                    title = _TITLE_PATTERNS[pat].format(
                        adj=_ADJECTIVES[a], noun=_NOUNS[n1], noun2=_NOUNS[n2]
                    )
                    rows.append(
                        (
                            ids[first + k],
                            title + " II" if is_sequel else title,
                            years[k],
                            "|".join(genres),
                        )
                    )
                out.writerows(rows)
        return model.n

    return _atomic_write(path, write)[0]
