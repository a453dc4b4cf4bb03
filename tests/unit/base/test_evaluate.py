"""Full-ranking evaluation on a split small enough to check by hand."""

from __future__ import annotations

import numpy as np

from recranker_core.base.evaluate import evaluate_scores, target_ranks
from recranker_core.base.split import build_split


def split_of(rows):
    users, items, ratings, ts = zip(*rows, strict=True)
    return build_split(users, items, ratings, ts)


def tiny():
    # One user: a, b (train likes), c (valid), d (test); items e, f never seen by this user.
    return split_of(
        [
            ("u", "a", 5, 1),
            ("u", "b", 5, 2),
            ("u", "c", 5, 3),
            ("u", "d", 5, 4),
            ("v", "e", 5, 1),
            ("v", "f", 2, 2),
        ]
    )


def fixed(scores: dict[str, float], data):
    vec = np.array([scores[i] for i in data.item_ids])
    return lambda users: np.tile(vec, (len(users), 1))


def test_seen_items_are_excluded_and_rank_counts_better_items():
    data = tiny()
    # a and b score highest but are train items: excluded for both targets.
    score = fixed({"a": 9, "b": 8, "c": 5, "d": 4, "e": 6, "f": 1}, data)
    # valid (c): candidates c, d, e, f -> e above c -> rank 1
    assert list(target_ranks(score, data, "valid")) == [1]
    # test (d): c is now excluded too (validation period): candidates d, e, f -> rank 1
    assert list(target_ranks(score, data, "test")) == [1]


def test_ties_count_against_the_held_out_item():
    data = tiny()
    flat = fixed(dict.fromkeys("abcdef", 1.0), data)
    # test item d: a, b, c excluded; e and f tie with d -> rank 2 (last of three)
    assert list(target_ranks(flat, data, "test")) == [2]
    # valid item c: a, b excluded; d, e, f tie with c -> rank 3
    assert list(target_ranks(flat, data, "valid")) == [3]
    lifted = fixed({"a": 1, "b": 1, "c": 1, "d": 3, "e": 2, "f": 2}, data)
    assert list(target_ranks(lifted, data, "test")) == [0]


def test_evaluate_scores_shape():
    data = tiny()
    out = evaluate_scores(fixed({"a": 0, "b": 0, "c": 3, "d": 9, "e": 1, "f": 2}, data), data)
    assert out["test"]["hr@3"] == 1.0 and out["test"]["ndcg@3"] == 1.0
    assert out["valid"]["hr@3"] == 1.0 and out["valid"]["ndcg@3"] < 1.0  # d ranks above c


def test_ranks_do_not_depend_on_the_batch_or_the_float_type(monkeypatch):
    import recranker_core.base.evaluate as evaluate

    rng = np.random.default_rng(3)
    n = 3000
    users = rng.integers(0, 40, n).astype(str)
    items = rng.integers(0, 60, n).astype(str)
    ratings = rng.integers(1, 6, n)
    data = build_split(users, items, ratings, np.arange(n))
    table = rng.standard_normal((data.n_users, data.n_items)).round(1)  # with ties

    def score64(u):
        return table[u]

    def score32(u):
        return table[u].astype(np.float32)

    expected = target_ranks(score64, data, "test", batch_size=data.n_users)
    assert expected.size == data.evaluable_users().size > 10
    # The default batch is sized by the catalogue: a block of 7 rows -> 7 users at a time.
    monkeypatch.setattr(evaluate, "SCORE_BLOCK_ELEMENTS", 7 * data.n_items)
    np.testing.assert_array_equal(target_ranks(score64, data, "test"), expected)
    np.testing.assert_array_equal(target_ranks(score32, data, "test"), expected)
    np.testing.assert_array_equal(target_ranks(score32, data, "test", batch_size=3), expected)


def test_held_out_item_seen_earlier_keeps_its_score():
    # u rated c 3 stars before liking it: c is in the validation exclusions and is the
    # validation item. The exclusions must not hide it: its own score ranks it.
    rows = [
        ("u", "a", 5, 1),
        ("u", "c", 3, 2),
        ("u", "b", 5, 3),
        ("u", "c", 5, 4),
        ("u", "d", 5, 5),
        ("v", "e", 5, 1),
    ]
    data = split_of(rows)
    u = data.user_ids.index("u")
    c = data.item_ids.index("c")
    assert data.valid_item[u] == c and c in data.seen(u, "valid")
    score = fixed({"a": 0.0, "b": 0.0, "c": 9.0, "d": 1.0, "e": 2.0}, data)
    assert list(target_ranks(score, data, "valid")) == [0]
