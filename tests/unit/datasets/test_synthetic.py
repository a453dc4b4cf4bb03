"""The synthetic generator at small sizes: exact counts, unique keys, every user present, skewed
popularity, MovieLens-like ratings, and the same bytes for the same seed in either format."""

from __future__ import annotations

import csv
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from recranker_core.datasets import synthetic, synthetic_model
from recranker_core.datasets.synthetic import (
    DEFAULT_DAYS,
    DEFAULT_END_TS,
    SynthFiles,
    generate,
)
from recranker_core.errors import ConfigError

USERS, ITEMS, ROWS = 300, 600, 20_000
Row = tuple[str, str, int, int]


def _read_interactions(path: Path) -> list[Row]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["user_id", "item_id", "rating", "timestamp"]
        return [(u, i, int(r), int(t)) for u, i, r, t in reader]


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    assert table.column_names == ["user_id", "item_id", "rating", "timestamp"]
    cols = [table.column(n).to_pylist() for n in table.column_names]
    return list(zip(*cols, strict=True))


def _read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        return next(reader), list(reader)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthFiles:
    out = tmp_path_factory.mktemp("synth")
    return generate(out, users=USERS, items=ITEMS, interactions=ROWS, seed=11)


@pytest.fixture(scope="module")
def rows(synth: SynthFiles) -> list[Row]:
    return _read_interactions(synth.interactions)


def test_row_counts_are_exact(synth: SynthFiles, rows: list[Row]) -> None:
    assert synth.interactions.name == "interactions.csv"
    assert (synth.interaction_rows, synth.item_rows, synth.user_rows) == (ROWS, ITEMS, USERS)
    assert len(rows) == ROWS
    item_header, items = _read_table(synth.items)
    user_header, users = _read_table(synth.users)
    assert item_header == ["item_id", "title", "year", "genres"]
    assert user_header == ["user_id", "age", "gender", "occupation"]
    assert (len(items), len(users)) == (ITEMS, USERS)


def test_ids_are_formatted_and_known(synth: SynthFiles, rows: list[Row]) -> None:
    _, items = _read_table(synth.items)
    _, users = _read_table(synth.users)
    item_ids = [r[0] for r in items]
    user_ids = [r[0] for r in users]
    assert item_ids == [f"i{n:05d}" for n in range(1, ITEMS + 1)]
    assert user_ids == [f"u{n:06d}" for n in range(1, USERS + 1)]
    assert {r[1] for r in rows} <= set(item_ids)
    assert all(re.fullmatch(r"u\d{6}", r[0]) for r in rows)


def test_ids_widen_for_large_counts(tmp_path: Path) -> None:
    files = generate(tmp_path, users=3, items=123_456, interactions=3, seed=0)
    first = _read_interactions(files.interactions)[0]
    assert re.fullmatch(r"u\d{6}", first[0]) and re.fullmatch(r"i\d{6}", first[1])


def test_no_duplicate_keys_and_times_increase_per_user(rows: list[Row]) -> None:
    assert len({(u, i, t) for u, i, _, t in rows}) == len(rows)
    last: dict[str, int] = {}
    for u, _, _, t in rows:
        assert t > last.get(u, -1), f"timestamps of {u} do not increase"
        last[u] = t
    # Repeated (user, item) pairs are allowed (at other times) but rare.
    assert len({(u, i) for u, i, _, _ in rows}) > 0.99 * len(rows)


def test_timestamps_lie_in_the_window(rows: list[Row]) -> None:
    start = DEFAULT_END_TS - DEFAULT_DAYS * 86_400
    assert all(start <= t < DEFAULT_END_TS for *_, t in rows)
    # Spread over the window, not bunched at one end.
    ts = sorted(t for *_, t in rows)
    assert ts[len(ts) // 10] < start + 0.4 * DEFAULT_DAYS * 86_400
    assert ts[-len(ts) // 10] > start + 0.6 * DEFAULT_DAYS * 86_400


def test_every_user_has_an_interaction_and_activity_has_a_long_tail(rows: list[Row]) -> None:
    per_user = Counter(u for u, *_ in rows)
    assert len(per_user) == USERS
    counts = sorted(per_user.values(), reverse=True)
    assert min(counts) >= 1
    assert counts[0] > 4 * counts[len(counts) // 2]
    # Nobody holds more than half the catalogue (MovieLens's most active user: 44 %).
    assert counts[0] <= ITEMS // 2


def test_popularity_is_skewed(rows: list[Row]) -> None:
    per_item = sorted(Counter(i for _, i, _, _ in rows).values(), reverse=True)
    top = sum(per_item[: ITEMS // 10])
    assert top / len(rows) > 0.30
    # ... but no item reaches more users than there are.
    assert per_item[0] <= USERS


def test_ratings_follow_movielens_proportions(rows: list[Row]) -> None:
    counts = Counter(r for _, _, r, _ in rows)
    assert set(counts) <= {1, 2, 3, 4, 5}
    expected = {1: 0.061, 2: 0.114, 3: 0.271, 4: 0.342, 5: 0.212}
    for rating, share in expected.items():
        assert abs(counts[rating] / len(rows) - share) < 0.03, (rating, counts)


def test_items_and_users_look_like_movielens(synth: SynthFiles) -> None:
    genres = {name for name, _ in synthetic._GENRES}
    _, items = _read_table(synth.items)
    for item_id, title, year, item_genres in items:
        assert title, item_id
        assert year == "" or 1920 <= int(year) <= 2024, item_id
        assert item_genres and set(item_genres.split("|")) <= genres, item_id
    # Titles with commas and quotes survive the CSV round trip.
    assert any("," in title for _, title, _, _ in items)
    assert any('"' in title for _, title, _, _ in items)

    _, users = _read_table(synth.users)
    occupations = {name for name, _ in synthetic._OCCUPATIONS}
    for _, age, gender, occupation in users:
        assert 7 <= int(age) <= 80
        assert gender in ("F", "M")
        assert occupation in occupations


def test_same_seed_gives_the_same_bytes(tmp_path: Path, synth: SynthFiles) -> None:
    again = generate(tmp_path, users=USERS, items=ITEMS, interactions=ROWS, seed=11)
    for name in ("interactions", "items", "users"):
        assert getattr(again, name).read_bytes() == getattr(synth, name).read_bytes(), name


def test_other_seed_gives_other_data(tmp_path: Path, synth: SynthFiles) -> None:
    other = generate(tmp_path, users=USERS, items=ITEMS, interactions=ROWS, seed=12)
    for name in ("interactions", "items", "users"):
        assert getattr(other, name).read_bytes() != getattr(synth, name).read_bytes(), name


def test_chunk_size_changes_layout_not_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small generation blocks, so the data spans many blocks and many chunks.
    monkeypatch.setattr(synthetic_model, "_BLOCK_ROWS", 1_500)
    a = generate(tmp_path / "a", users=USERS, items=ITEMS, interactions=ROWS, seed=5)
    b = generate(
        tmp_path / "b", users=USERS, items=ITEMS, interactions=ROWS, seed=5, chunk_rows=777
    )
    assert a.interactions.read_bytes() == b.interactions.read_bytes()
    c = generate(
        tmp_path / "c",
        users=USERS,
        items=ITEMS,
        interactions=ROWS,
        seed=5,
        chunk_rows=777,
        fmt="parquet",
    )
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(c.interactions).metadata
    assert meta.num_row_groups == math.ceil(ROWS / 777)
    assert _read_parquet(c.interactions) == _read_interactions(a.interactions)


def test_parquet_holds_the_same_rows_as_csv(tmp_path: Path, rows: list[Row]) -> None:
    files = generate(tmp_path, users=USERS, items=ITEMS, interactions=ROWS, seed=11, fmt="parquet")
    assert files.interactions == tmp_path / "interactions.parquet"
    assert files.interaction_rows == ROWS
    assert _read_parquet(files.interactions) == rows


def test_switching_format_leaves_one_interaction_file(tmp_path: Path) -> None:
    generate(tmp_path, users=10, items=50, interactions=200, seed=1)
    generate(tmp_path, users=10, items=50, interactions=200, seed=1, fmt="parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "interactions.parquet",
        "items.csv",
        "users.csv",
    ]


def test_no_temporary_files_are_left(synth: SynthFiles) -> None:
    assert sorted(p.name for p in synth.directory.iterdir()) == [
        "interactions.csv",
        "items.csv",
        "users.csv",
    ]


def test_tiny_catalogue_still_gives_unique_keys(tmp_path: Path) -> None:
    # More interactions per user than items: repeats are forced, keys must stay unique.
    files = generate(tmp_path, users=5, items=3, interactions=400, seed=2)
    got = _read_interactions(files.interactions)
    assert len(got) == 400
    assert len({(u, i, t) for u, i, _, t in got}) == 400
    by_user: dict[str, int] = defaultdict(int)
    for u, *_ in got:
        by_user[u] += 1
    assert len(by_user) == 5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"users": 10, "items": 5, "interactions": 9}, "at least users"),
        ({"users": 0, "items": 5, "interactions": 9}, "at least 1"),
        ({"users": 1, "items": 5, "interactions": 9, "fmt": "xlsx"}, "fmt 'xlsx'"),
        ({"users": 1, "items": 5, "interactions": 9, "seed": -1}, "seed"),
        ({"users": 1, "items": 5, "interactions": 9, "chunk_rows": 0}, "chunk_rows"),
        ({"users": 1, "items": 5, "interactions": 100, "days": 0}, "window"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=re.escape(message)):
        generate(tmp_path, **args)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_a_window_too_short_for_the_busiest_user_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="distinct timestamps"):
        generate(tmp_path, users=1, items=5, interactions=100_000, seed=0, days=1)
