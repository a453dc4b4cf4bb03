"""The protocol's split on hand-made histories: which item is held out, what each period holds,
and that nothing from the validation or test period reaches the train data."""

from __future__ import annotations

import numpy as np
import pytest

from recranker_core.base.split import build_split
from recranker_core.errors import DataError


def split_of(rows: list[tuple[str, str, float, int]]):
    users, items, ratings, ts = zip(*rows, strict=True)
    return build_split(users, items, ratings, ts, like_threshold=4.0)


def idx(data, item: str) -> int:
    return data.item_ids.index(item)


def test_last_like_is_test_second_last_is_valid():
    data = split_of(
        [
            ("u", "a", 5, 1),
            ("u", "b", 2, 2),  # dislike, train period
            ("u", "c", 4, 3),
            ("u", "d", 5, 4),  # valid
            ("u", "e", 3, 5),  # validation period, neutral
            ("u", "f", 4, 6),  # test
            ("u", "g", 1, 7),  # after the test like: ignored
        ]
    )
    assert data.valid_item[0] == idx(data, "d") and data.test_item[0] == idx(data, "f")
    assert sorted(data.item_ids[i] for i in data.train_items(0)) == ["a", "c"]
    assert [data.item_ids[i] for i in data.train_sequences[0]] == ["a", "c"]
    # Ranking for the test item, a sequence model reads the validation like too.
    assert [data.item_ids[i] for i in data.sequences_for("test")[0]] == ["a", "c", "d"]
    assert data.sequences_for("valid")[0] is data.train_sequences[0]
    assert sorted(data.item_ids[i] for i in data.seen(0, "valid")) == ["a", "b", "c"]
    assert sorted(data.item_ids[i] for i in data.seen(0, "test")) == ["a", "b", "c", "d", "e"]
    # The rating regressor sees train-period ratings only.
    assert sorted(data.item_ids[i] for i in data.rating_items) == ["a", "b", "c"]


def test_ties_in_time_broken_by_item_id_not_row_order():
    rows = [("u", "x", 5, 1), ("u", "b", 5, 9), ("u", "a", 5, 9), ("u", "c", 4, 0)]
    one = split_of(rows)
    two = split_of(list(reversed(rows)))
    for data in (one, two):
        assert data.item_ids[data.test_item[0]] == "b"  # (9, "b") sorts after (9, "a")
        assert data.item_ids[data.valid_item[0]] == "a"


def test_users_with_fewer_than_three_likes_train_but_are_not_evaluated():
    data = split_of(
        [("u", "a", 5, 1), ("u", "b", 5, 2), ("v", "a", 5, 1), ("v", "b", 4, 2), ("v", "c", 4, 3)]
    )
    u, v = data.user_ids.index("u"), data.user_ids.index("v")
    assert data.test_item[u] == -1 and data.valid_item[u] == -1
    assert sorted(data.item_ids[i] for i in data.train_items(u)) == ["a", "b"]
    assert list(data.evaluable_users()) == [v]


def test_no_held_out_item_leaks_into_train():
    rng = np.random.default_rng(0)
    pairs = rng.choice(50 * 200, size=3000, replace=False)  # each (user, item) once
    data = build_split(
        (pairs // 200).astype(str),
        (pairs % 200).astype(str),
        rng.integers(1, 6, pairs.size),
        rng.integers(0, 10_000, pairs.size),
    )
    assert data.evaluable_users().size > 20
    for user in data.evaluable_users():
        valid, test = data.valid_item[user], data.test_item[user]
        train = set(data.train_items(user).tolist())
        assert valid not in train and test not in train
        assert valid not in set(data.seen(user, "valid").tolist())
        assert test not in set(data.seen(user, "valid").tolist())
        assert test not in set(data.seen(user, "test").tolist())
        assert valid in set(data.seen(user, "test").tolist())
        assert train <= set(data.seen(user, "valid").tolist())
    assert set(data.rating_users.tolist()) <= set(range(data.n_users))


def test_too_little_data_is_a_clear_error():
    with pytest.raises(DataError, match="no interactions"):
        build_split([], [], [], [])
    with pytest.raises(DataError, match="only 1 item"):
        split_of([("u", "a", 5, 1), ("v", "a", 4, 2)])


def test_chunks_of_the_copy_stream_end_after_whole_rows_only():
    from recranker_core.base.split import _row_end

    rows = b'a,b,5,1\n"odd,""u""","item\nwith newline",4,2\nc,"x\n",3,3\n'
    # Every prefix: the cut is after the last row that ends inside it, never at a quoted newline.
    ends = [n + 1 for n in range(len(rows)) if rows[n : n + 1] == b"\n"]
    row_ends = [ends[0], ends[2], ends[4]]  # the 2nd and 4th newlines are inside quotes
    for size in range(len(rows) + 1):
        expected = max([e for e in row_ends if e <= size], default=0)
        assert _row_end(bytearray(rows[:size])) == expected, size
