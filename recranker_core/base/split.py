"""The evaluation protocol's split (docs/METHOD.md section 1): per user, likes in time order;
the last like is the test item, the one before it the validation item, everything before that
the train period. Read from recranker.interactions as of a watermark, so a rerun gives the same
split."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass
class SplitData:
    """Everything the base models and the evaluator need, as compact index arrays.

    Users and items are indexed 0..n-1; `user_ids[u]` / `item_ids[i]` give the external ids.
    Only train-period data is used for fitting; `valid_item`/`test_item` are the held-out likes.
    """

    user_ids: list[str]
    item_ids: list[str]
    # Train-period likes (rating >= like threshold) as CSR rows: indptr/indices, int32.
    train_indptr: npt.NDArray[np.int64]
    train_indices: npt.NDArray[np.int32]
    # Per user, the train likes' item indices in time order (ties by item id): SASRec's input.
    train_sequences: list[npt.NDArray[np.int32]]
    # Every train-period rating (likes, neutral and dislikes): the rating regressor's data.
    rating_users: npt.NDArray[np.int32]
    rating_items: npt.NDArray[np.int32]
    rating_values: npt.NDArray[np.float32]
    # Held-out likes per user; -1 where the user has fewer than 3 likes (not evaluated).
    valid_item: npt.NDArray[np.int32]
    test_item: npt.NDArray[np.int32]
    # Items to exclude from ranking, as CSR: when scoring the validation item, every item the
    # user interacted with in the train period; when scoring the test item, additionally the
    # validation-period ones (the validation like included).
    seen_valid_indptr: npt.NDArray[np.int64]
    seen_valid_indices: npt.NDArray[np.int32]
    seen_test_indptr: npt.NDArray[np.int64]
    seen_test_indices: npt.NDArray[np.int32]
    watermark: datetime | None = None
    like_threshold: float = 4.0
    # Per user, the likes before the test like in time order (the train likes plus the
    # validation like): what a sequence model reads when ranking for the test item. None: the
    # train sequences (no validation likes known).
    test_sequences: list[npt.NDArray[np.int32]] | None = None
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def train_items(self, user: int) -> npt.NDArray[np.int32]:
        return self.train_indices[self.train_indptr[user] : self.train_indptr[user + 1]]

    def seen(self, user: int, target: str) -> npt.NDArray[np.int32]:
        """Items excluded when ranking for `target` ('valid' or 'test')."""
        if target == "valid":
            return self.seen_valid_indices[
                self.seen_valid_indptr[user] : self.seen_valid_indptr[user + 1]
            ]
        return self.seen_test_indices[self.seen_test_indptr[user] : self.seen_test_indptr[user + 1]]

    def sequences_for(self, target: str) -> list[npt.NDArray[np.int32]]:
        """The like sequences a sequence model reads when ranking for `target`."""
        if target == "test" and self.test_sequences is not None:
            return self.test_sequences
        return self.train_sequences

    def evaluable_users(self) -> npt.NDArray[np.int64]:
        return np.flatnonzero(self.test_item >= 0)


def build_split(
    user_ids: npt.ArrayLike,
    item_ids: npt.ArrayLike,
    ratings: npt.ArrayLike,
    timestamps: npt.ArrayLike,
    *,
    like_threshold: float = 4.0,
    watermark: datetime | None = None,
) -> SplitData:
    """The split from interaction columns (external ids as strings, timestamps as numbers).

    Per user, interactions are ordered by (timestamp, item id). With at least 3 likes, the last
    like is the test item and the one before it the validation item; the train period is every
    interaction before the validation like, the validation period runs up to the test like, and
    anything after the test like is ignored (it lies in the future of the test). Users with fewer
    than 3 likes are not evaluated; all their interactions are train data.
    """
    user_codes, users = _codes(np.asarray(user_ids).astype(str))
    item_codes, items = _codes(np.asarray(item_ids).astype(str))
    return split_from_codes(
        user_codes,
        item_codes,
        np.asarray(ratings, dtype=np.float32),
        np.asarray(timestamps, dtype=np.float64),
        users,
        items,
        like_threshold=like_threshold,
        watermark=watermark,
    )


def _codes(values: npt.NDArray[np.str_]) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.str_]]:
    vocabulary, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int32).reshape(-1), vocabulary


def split_from_codes(
    user_codes: npt.NDArray[np.int32],
    item_codes: npt.NDArray[np.int32],
    ratings: npt.NDArray[np.float32],
    timestamps: npt.NDArray[np.float64],
    users: npt.ArrayLike,
    items: npt.ArrayLike,
    *,
    like_threshold: float = 4.0,
    watermark: datetime | None = None,
) -> SplitData:
    """The split from compact columns: `user_codes[n]` indexes `users` and `item_codes[n]`
    indexes `items`, both sorted external ids with no id left unused (build_split's rules)."""
    import pandas as pd

    from recranker_core.errors import DataError

    users = np.asarray(users)
    items = np.asarray(items)
    df = pd.DataFrame(
        {"u": user_codes, "i": item_codes, "rating": ratings, "ts": timestamps}, copy=False
    )
    if df.empty:
        raise DataError("no interactions to split: ingest data first (`recranker ingest`)")
    if items.size < 2:
        raise DataError(f"only {items.size} item in the interactions: nothing to rank")
    # Ties in time are broken by item id, so that the split does not depend on row order.
    df = df.sort_values(["u", "ts", "i"], kind="stable").reset_index(drop=True)
    df["pos"] = df.groupby("u").cumcount()
    df["like"] = df["rating"] >= like_threshold

    likes = df[df["like"]]
    from_end = likes.groupby("u").cumcount(ascending=False)
    n_likes = likes.groupby("u")["i"].transform("size")
    evaluable = n_likes >= 3
    test_rows = likes[evaluable & (from_end == 0)]
    valid_rows = likes[evaluable & (from_end == 1)]

    n_users = users.size
    valid_item = np.full(n_users, -1, dtype=np.int32)
    test_item = np.full(n_users, -1, dtype=np.int32)
    valid_item[valid_rows["u"].to_numpy()] = valid_rows["i"].to_numpy()
    test_item[test_rows["u"].to_numpy()] = test_rows["i"].to_numpy()
    big = np.iinfo(np.int64).max
    valid_pos = np.full(n_users, big, dtype=np.int64)
    test_pos = np.full(n_users, big, dtype=np.int64)
    valid_pos[valid_rows["u"].to_numpy()] = valid_rows["pos"].to_numpy()
    test_pos[test_rows["u"].to_numpy()] = test_rows["pos"].to_numpy()

    u = df["u"].to_numpy()
    pos = df["pos"].to_numpy()
    train = df[pos < valid_pos[u]]
    before_test = df[pos < test_pos[u]]
    train_likes = train[train["like"]]

    def csr(
        frame: pd.DataFrame, unique: bool
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]:
        if unique:
            frame = frame.drop_duplicates(["u", "i"]).sort_values(["u", "i"])
        counts = np.bincount(frame["u"].to_numpy(), minlength=n_users)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return indptr, frame["i"].to_numpy().astype(np.int32)

    train_indptr, train_indices = csr(train_likes, unique=True)
    seq_indptr, seq_items = csr(train_likes, unique=False)  # time order kept
    sequences = [seq_items[seq_indptr[k] : seq_indptr[k + 1]] for k in range(n_users)]
    seen_valid_indptr, seen_valid_indices = csr(train, unique=True)
    seen_test_indptr, seen_test_indices = csr(before_test, unique=True)
    test_sequences = [
        np.append(seq, valid_item[k]).astype(np.int32) if valid_item[k] >= 0 else seq
        for k, seq in enumerate(sequences)
    ]

    return SplitData(
        user_ids=users.tolist(),
        item_ids=items.tolist(),
        train_indptr=train_indptr,
        train_indices=train_indices,
        train_sequences=sequences,
        rating_users=train["u"].to_numpy().astype(np.int32),
        rating_items=train["i"].to_numpy().astype(np.int32),
        rating_values=train["rating"].to_numpy().astype(np.float32),
        valid_item=valid_item,
        test_item=test_item,
        seen_valid_indptr=seen_valid_indptr,
        seen_valid_indices=seen_valid_indices,
        seen_test_indptr=seen_test_indptr,
        seen_test_indices=seen_test_indices,
        watermark=watermark,
        like_threshold=like_threshold,
        test_sequences=test_sequences,
        stats={
            "interactions": int(len(df)),
            "users": int(n_users),
            "items": int(items.size),
            "evaluable_users": int((test_item >= 0).sum()),
            "train_likes": int(len(train_likes)),
            "train_ratings": int(len(train)),
        },
    )


def load_split(
    database_url: str,
    *,
    like_threshold: float = 4.0,
    watermark: datetime | None = None,
    chunk_bytes: int = 64 << 20,
) -> SplitData:
    """The split of recranker.interactions as of `watermark` (default: the latest event), so that
    a rerun over the same data gives the same split.

    One pass over the rows: they stream out by COPY and are parsed `chunk_bytes` of CSV at a
    time, each id coded in the order it first appears; the sorted vocabularies and the final
    codes come from those codes at the end. Memory stays proportional to the interactions as
    compact arrays (int32 user and item codes, float32 rating, float64 time: 20 bytes a row) plus
    one copy of each distinct id, never to their text."""
    import io

    import pandas as pd
    from psycopg import IsolationLevel, sql

    from recranker_core.db.connect import connect

    columns: dict[str, list[npt.NDArray[Any]]] = {"u": [], "i": [], "rating": [], "ts": []}
    vocabularies: dict[str, dict[str, int]] = {"u": {}, "i": {}}

    def first_seen_codes(values: pd.Series, vocabulary: dict[str, int]) -> npt.NDArray[np.int32]:
        codes, uniques = pd.factorize(values)
        seen = np.fromiter(
            (vocabulary.setdefault(v, len(vocabulary)) for v in uniques),
            dtype=np.int32,
            count=len(uniques),
        )
        return seen[codes]

    def parse(block: bytes) -> None:
        frame = pd.read_csv(
            io.BytesIO(block),
            header=None,
            names=["user_id", "item_id", "rating", "ts"],
            dtype={"user_id": str, "item_id": str, "rating": np.float32, "ts": np.float64},
            keep_default_na=False,
        )
        columns["u"].append(first_seen_codes(frame["user_id"], vocabularies["u"]))
        columns["i"].append(first_seen_codes(frame["item_id"], vocabularies["i"]))
        columns["rating"].append(frame["rating"].to_numpy(np.float32))
        columns["ts"].append(frame["ts"].to_numpy(np.float64))

    with connect(database_url) as conn:
        # One snapshot for the watermark and the rows: a concurrent ingest (even of old events)
        # is either wholly in the split or not at all.
        conn.isolation_level = IsolationLevel.REPEATABLE_READ
        if watermark is None:
            row = conn.execute("SELECT max(event_ts) FROM recranker.interactions").fetchone()
            watermark = row[0] if row else None
        query = sql.SQL(
            "COPY (SELECT user_id, item_id, rating, extract(epoch FROM event_ts) "
            "FROM recranker.interactions WHERE event_ts <= {}) TO STDOUT (FORMAT csv)"
        ).format(sql.Literal(watermark))
        pending = bytearray()
        with conn.cursor() as cur, cur.copy(query) as copy:
            for block in copy:
                pending += block
                if len(pending) >= chunk_bytes:
                    cut = _row_end(pending)
                    if cut:
                        parse(bytes(pending[:cut]))
                        del pending[:cut]
        if pending.strip():
            parse(bytes(pending))

    def joined(name: str, dtype: type) -> npt.NDArray[Any]:
        parts = columns.pop(name)
        return np.concatenate(parts) if parts else np.empty(0, dtype)

    def sorted_codes(name: str) -> tuple[npt.NDArray[np.int32], list[str]]:
        """The codes renumbered to the sorted order of the ids (build_split's numbering)."""
        ids = list(vocabularies.pop(name))
        order = sorted(range(len(ids)), key=ids.__getitem__)
        rank = np.empty(len(ids), dtype=np.int32)
        rank[order] = np.arange(len(ids), dtype=np.int32)
        return rank[joined(name, np.int32)], [ids[k] for k in order]

    user_codes, users = sorted_codes("u")
    item_codes, items = sorted_codes("i")
    return split_from_codes(
        user_codes,
        item_codes,
        joined("rating", np.float32),
        joined("ts", np.float64),
        np.array(users, dtype=str),
        np.array(items, dtype=str),
        like_threshold=like_threshold,
        watermark=watermark,
    )


def _row_end(buffer: bytearray) -> int:
    """Length of the longest prefix of whole CSV rows in `buffer` (which starts at a row): after
    the last newline that lies outside a quoted field (an id may hold a quoted newline; a quote
    inside a quoted field is doubled, so an even count of quotes means outside). 0: none."""
    cut = buffer.rfind(b"\n")
    while cut >= 0 and buffer.count(b'"', 0, cut) % 2:
        cut = buffer.rfind(b"\n", 0, cut)
    return cut + 1
