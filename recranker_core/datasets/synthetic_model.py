"""The generator core behind `synthetic.generate`: the activity and item-popularity laws, the
item model, rating calibration and the interaction blocks (see synthetic.py for the shape).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa


_ITEM_ZIPF = 1.0
_USER_ZIPF = 0.5
_AFFINITY_SHARE = 0.5
# MovieLens-100K's rating proportions for 1..5 (see movielens.py).
_RATING_SHARES = (0.0611, 0.1137, 0.2715, 0.3417, 0.2120)
_CALIBRATION_ROWS = 200_000
_REDRAW_ROUNDS = 12

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
