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
from typing import TYPE_CHECKING, Any

from recranker_core.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
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

_ITEM_ZIPF = 1.0
_USER_ZIPF = 0.5
_AFFINITY_SHARE = 0.5
# MovieLens-100K's rating proportions for 1..5 (see movielens.py).
_RATING_SHARES = (0.0611, 0.1137, 0.2715, 0.3417, 0.2120)
_CALIBRATION_ROWS = 200_000
_REDRAW_ROUNDS = 12
_MISSING_YEAR_SHARE = 0.005

# Random streams are keyed by what they generate, never by the chunk size, so changing chunk_rows
# changes only the file layout (Parquet row groups), not one value.
_STREAM_SETUP = 0
_STREAM_BLOCK = 1
_STREAM_USERS = 2
_STREAM_ITEMS = 3
_STREAM_CALIBRATION = 4
# Rows per generation block. A block ends on a user boundary, so one very active user makes a
# longer block; memory stays around max(chunk_rows, _BLOCK_ROWS, largest user) rows.
_BLOCK_ROWS = 1 << 17
_ATTR_CHUNK = 1 << 16

# MovieLens-100K genres with how often each occurs there, used as primary-genre weights.
_GENRES: tuple[tuple[str, int], ...] = (
    ("Drama", 725),
    ("Comedy", 505),
    ("Action", 251),
    ("Thriller", 251),
    ("Romance", 247),
    ("Adventure", 135),
    ("Children's", 122),
    ("Crime", 109),
    ("Sci-Fi", 101),
    ("Horror", 92),
    ("War", 71),
    ("Mystery", 61),
    ("Musical", 56),
    ("Documentary", 50),
    ("Animation", 42),
    ("Western", 27),
    ("Film-Noir", 24),
    ("Fantasy", 22),
)
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


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    import numpy as np

    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, index)))


def _activity_counts(users: int, items: int, interactions: int, seed: int) -> np.ndarray:
    """Interactions per user (indexed by user number - 1): 1 each, the rest by a rank power law
    over a random ranking of the users, nobody above half the catalogue (MovieLens-100K's most
    active user rated 44 % of it) unless the totals leave no other way."""
    import numpy as np

    rng = _rng(seed, _STREAM_SETUP, 0)
    weights = np.arange(1, users + 1, dtype=np.float64) ** -_USER_ZIPF
    by_rank = rng.multinomial(interactions - users, weights / weights.sum()) + 1
    cap = max(-(-interactions // users), items // 2, 1)
    # Hand what lies above the cap to the users below it, by the same law, until none is over;
    # users * cap >= interactions, so there is always room.
    while (excess := int(np.maximum(by_rank - cap, 0).sum())) > 0:
        np.minimum(by_rank, cap, out=by_rank)
        room = np.where(by_rank < cap, weights, 0.0)
        by_rank += rng.multinomial(excess, room / room.sum())
    counts = np.empty(users, dtype=np.int64)
    counts[rng.permutation(users)] = by_rank
    return counts


@dataclass(frozen=True)
class _ItemModel:
    """What drives which items are picked and how they are rated."""

    n: int
    genre: np.ndarray  # primary genre index per item
    quality: np.ndarray  # latent rating offset per item
    global_cdf: np.ndarray  # cumulative popularity over items in `global_order`
    global_order: np.ndarray  # item index by popularity rank
    genre_keys: np.ndarray  # genre + within-genre cumulative popularity, ascending
    genre_order: np.ndarray  # item index for each entry of genre_keys
    genre_share: np.ndarray  # probability of each genre as a user's favourite

    @staticmethod
    def build(items: int, seed: int) -> _ItemModel:
        import numpy as np

        rng = _rng(seed, _STREAM_SETUP, 1)
        genre_weights = np.array([w for _, w in _GENRES], dtype=np.float64)
        genre = rng.choice(len(_GENRES), size=items, p=genre_weights / genre_weights.sum())
        order = rng.permutation(items)  # order[r] = item at popularity rank r
        pop = np.arange(1, items + 1, dtype=np.float64) ** -_ITEM_ZIPF
        global_cdf = np.cumsum(pop / pop.sum())
        global_cdf[-1] = 1.0

        # Popular items are rated a little higher, as in MovieLens.
        rank_of = np.empty(items, dtype=np.int64)
        rank_of[order] = np.arange(items)
        log_rank = np.log1p(rank_of.astype(np.float64))
        pop_z = (log_rank.mean() - log_rank) / (log_rank.std() or 1.0)
        quality = rng.normal(0.0, 0.5, size=items) + 0.2 * pop_z

        # Sorting by (genre, rank) lets one searchsorted draw from any genre's own popularity
        # law: a draw for genre g is g + u with u in [0, 1), and genre g's keys span (g, g + 1].
        by_genre = np.lexsort((np.arange(items), genre[order]))
        genre_order = order[by_genre]
        genre_of = genre[genre_order]
        w = pop[by_genre]
        starts = np.flatnonzero(np.r_[True, genre_of[1:] != genre_of[:-1]])
        ends = np.r_[starts[1:], items]
        within = np.empty(items, dtype=np.float64)
        for s, e in zip(starts, ends, strict=True):
            c = np.cumsum(w[s:e])
            within[s:e] = c / c[-1]
            within[e - 1] = 1.0
        present = np.bincount(genre, minlength=len(_GENRES)).astype(np.float64)
        return _ItemModel(
            n=items,
            genre=genre,
            quality=quality,
            global_cdf=global_cdf,
            global_order=order,
            genre_keys=genre_of + within,
            genre_order=genre_order,
            genre_share=present / present.sum(),
        )

    def sample(
        self, rng: np.random.Generator, favourite: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """One item per entry of `favourite` (a genre index per row) and whether it came from it."""
        import numpy as np

        n = int(favourite.shape[0])
        in_genre = rng.random(n) < _AFFINITY_SHARE
        u = rng.random(n)
        item = np.empty(n, dtype=np.int64)
        out = ~in_genre
        pos = np.searchsorted(self.global_cdf, u[out], side="right")
        item[out] = self.global_order[np.minimum(pos, self.n - 1)]
        pos = np.searchsorted(self.genre_keys, favourite[in_genre] + u[in_genre], side="right")
        item[in_genre] = self.genre_order[np.minimum(pos, self.n - 1)]
        return item, in_genre


def _latent(
    rng: np.random.Generator, model: _ItemModel, item: np.ndarray, in_genre: np.ndarray, bias: Any
) -> np.ndarray:
    return model.quality[item] + bias + 0.3 * in_genre + rng.standard_normal(int(item.shape[0]))


def _user_traits(rng: np.random.Generator, model: _ItemModel, n: int) -> tuple[Any, Any]:
    favourite = rng.choice(len(model.genre_share), size=n, p=model.genre_share)
    bias = rng.normal(0.0, 0.35, size=n)
    return favourite, bias


def _draw_rows(
    rng: np.random.Generator, model: _ItemModel, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows for users with these counts, grouped by user: the user's position in `counts`, the
    item and the latent rating score."""
    import numpy as np

    favourite, bias = _user_traits(rng, model, int(counts.shape[0]))
    seg = np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)
    item, in_genre = model.sample(rng, favourite[seg])
    _redraw_repeats(rng, model, seg, favourite, item, in_genre)
    return seg, item, _latent(rng, model, item, in_genre, bias[seg])


def _rating_thresholds(model: _ItemModel, counts: np.ndarray, seed: int) -> np.ndarray:
    """Cut points on the latent score that give MovieLens's rating proportions, measured on rows
    drawn exactly as the real ones for a random set of users (item quality, genre affinity and
    the redraws of repeats all shift the mix)."""
    import numpy as np

    rng = _rng(seed, _STREAM_CALIBRATION)
    pick = rng.permutation(counts.shape[0])
    enough = int(np.searchsorted(np.cumsum(counts[pick]), _CALIBRATION_ROWS)) + 1
    _, _, latent = _draw_rows(rng, model, counts[pick[:enough]])
    return np.quantile(latent, np.cumsum(_RATING_SHARES)[:-1])


def _blocks(
    counts: np.ndarray,
    seed: int,
    model: _ItemModel,
    thresholds: np.ndarray,
    end: int,
    window: int,
    user_width: int,
    item_ids: pa.Array,
) -> Iterator[pa.Table]:
    """Interaction tables for consecutive runs of users, about _BLOCK_ROWS rows each."""
    import numpy as np
    import pyarrow as pa

    cum = np.cumsum(counts)
    start_ts = end - window
    first = 0
    block = 0
    while first < counts.shape[0]:
        done = cum[first - 1] if first else 0
        last = int(np.searchsorted(cum, done + _BLOCK_ROWS, side="right"))
        last = max(last, first + 1)
        c = counts[first:last]
        n_users = last - first
        n = int(c.sum())
        rng = _rng(seed, _STREAM_BLOCK, block)

        seg, item, latent = _draw_rows(rng, model, c)
        rating = (np.searchsorted(thresholds, latent) + 1).astype(np.int8)

        # Each user is active over [begin, begin + span]; the room left for `c` strictly
        # increasing seconds keeps the last one before `end`.
        begin = start_ts + np.floor(rng.random(n_users) * (window - c + 1)).astype(np.int64)
        span = np.floor(np.sqrt(rng.random(n_users)) * (end - c - begin + 1)).astype(np.int64)

        # Rows of one user are exchangeable, so sorting only the time draws within each user
        # (the user number as integer part) orders them without moving items or ratings.
        frac = np.sort(seg + rng.random(n)) - seg
        raw = begin[seg] + np.floor(frac * span[seg]).astype(np.int64)
        # Bump ties apart: a running maximum of (t - position) per user, plus the position,
        # is strictly increasing and still ends before `end` (see `span`).
        seg_start = np.r_[0, np.cumsum(c)[:-1]]
        pos = np.arange(n, dtype=np.int64) - seg_start[seg]
        offset = seg << 35  # above any timestamp, so the running maximum restarts per user
        ts = np.maximum.accumulate(offset + raw - pos) - offset + pos

        user_ids = _format_ids("u", np.arange(first + 1, last + 1), user_width)
        yield pa.table(
            {
                "user_id": user_ids.take(pa.array(seg)),
                "item_id": item_ids.take(pa.array(item)),
                "rating": pa.array(rating),
                "timestamp": pa.array(ts),
            }
        )
        first = last
        block += 1


def _redraw_repeats(
    rng: np.random.Generator,
    model: _ItemModel,
    seg: np.ndarray,
    favourite: np.ndarray,
    item: np.ndarray,
    in_genre: np.ndarray,
) -> None:
    """Draw again, in place, the rows that repeat an item their user already has.

    MovieLens holds each (user, item) once; drawing with replacement from a Zipf law would repeat
    the head items over and over for active users. A few rounds of redraws remove nearly all
    repeats and, as a side effect, cap an item's reach at the number of users, which flattens the
    head the way real popularity curves are flat at the top. Users with more interactions than the
    catalogue can hold keep some repeats (at distinct times).
    """
    import numpy as np

    keys = seg * model.n + item
    # unique's return_index takes each key's first row (it sorts stably), so the result does not
    # depend on the sort algorithm.
    taken, first = np.unique(keys, return_index=True)
    todo = np.setdiff1d(np.arange(keys.shape[0]), first, assume_unique=True)
    for round_ in range(_REDRAW_ROUNDS):
        if todo.size == 0:
            return
        if round_ < _REDRAW_ROUNDS // 2:
            new_item, new_in_genre = model.sample(rng, favourite[seg[todo]])
        else:
            # A user holding most of the popular mass keeps hitting it; uniform draws find the
            # tail in a few rounds (the tail is where very active users end up anyway).
            new_item = rng.integers(0, model.n, size=int(todo.shape[0]), dtype=np.int64)
            new_in_genre = np.zeros(todo.shape[0], dtype=bool)
        new_keys = seg[todo] * model.n + new_item
        at = np.minimum(np.searchsorted(taken, new_keys), taken.shape[0] - 1)
        fresh = taken[at] != new_keys
        _, first_new = np.unique(new_keys, return_index=True)
        once = np.zeros(todo.shape[0], dtype=bool)
        once[first_new] = True
        ok = fresh & once
        item[todo[ok]] = new_item[ok]
        in_genre[todo[ok]] = new_in_genre[ok]
        taken = np.sort(np.concatenate([taken, new_keys[ok]]))
        todo = todo[~ok]


def _format_ids(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    digits = pc.utf8_lpad(pc.cast(pa.array(numbers), pa.string()), width=width, padding="0")
    return pc.binary_join_element_wise(prefix, digits, "")


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
