"""MovieLens-100K from the real recbole 1.2.1 wheel: downloaded once per machine into a wheel cache
($RECRANKER_TEST_WHEEL_CACHE, default ~/.cache/recranker-test-wheels), then extracted into each
test's own home; the counts and quirks the rest of the project relies on are checked here."""

from __future__ import annotations

import os
import shutil
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from recranker_core.datasets.movielens import (
    MovieLensFiles,
    fetch_movielens_100k,
    load_items,
    load_users,
    read_atomic_header,
)
from recranker_core.errors import DataError

WHEEL_NAME = "recbole-1.2.1-py3-none-any.whl"
# A pip that fails the test if it is ever run: proves a call downloads nothing.
NO_PIP = [sys.executable, "-c", "import sys; sys.exit('pip must not run here')"]


def _wheel_cache() -> Path:
    raw = os.environ.get("RECRANKER_TEST_WHEEL_CACHE", "~/.cache/recranker-test-wheels")
    return Path(raw).expanduser()


@pytest.fixture(scope="session")
def recbole_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel in the machine-wide cache, downloaded (with the code under test) when missing."""
    cache = _wheel_cache()
    cached = cache / WHEEL_NAME
    if not cached.is_file():
        files = fetch_movielens_100k(tmp_path_factory.mktemp("download-home"))
        assert files.downloaded
        cache.mkdir(parents=True, exist_ok=True)
        # Copy under a temporary name first: a parallel session never sees half a wheel.
        tmp = cache / f".{WHEEL_NAME}.{os.getpid()}.tmp"
        shutil.copyfile(files.wheel, tmp)
        os.replace(tmp, cached)
    return cached


@pytest.fixture()
def home(tmp_path: Path, recbole_wheel: Path) -> Path:
    """A fresh $RECRANKER_HOME holding only the cached wheel."""
    (tmp_path / "wheels").mkdir()
    shutil.copyfile(recbole_wheel, tmp_path / "wheels" / WHEEL_NAME)
    return tmp_path


@pytest.fixture()
def fetched(home: Path) -> MovieLensFiles:
    return fetch_movielens_100k(home, pip=NO_PIP)


def test_fetch_extracts_the_three_files_with_known_counts(
    home: Path, fetched: MovieLensFiles
) -> None:
    target = home / "datasets" / "ml-100k"
    assert fetched.directory == target
    assert (fetched.inter, fetched.item, fetched.user) == (
        target / "ml-100k.inter",
        target / "ml-100k.item",
        target / "ml-100k.user",
    )
    assert (fetched.interactions, fetched.users, fetched.items) == (100_000, 943, 1_682)
    assert not fetched.downloaded
    assert fetched.extracted == ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
    assert sorted(p.name for p in target.iterdir()) == [
        "ml-100k.inter",
        "ml-100k.item",
        "ml-100k.user",
    ]


def test_second_call_downloads_and_writes_nothing(home: Path, fetched: MovieLensFiles) -> None:
    before = {p: p.stat().st_mtime_ns for p in (fetched.inter, fetched.item, fetched.user)}
    wheel_mtime = fetched.wheel.stat().st_mtime_ns
    again = fetch_movielens_100k(home, pip=NO_PIP)
    assert not again.downloaded
    assert again.extracted == ()
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert again.wheel.stat().st_mtime_ns == wheel_mtime
    assert (again.interactions, again.users, again.items) == (100_000, 943, 1_682)


def test_a_changed_file_is_restored(home: Path, fetched: MovieLensFiles) -> None:
    original = fetched.item.read_bytes()
    fetched.item.write_bytes(original.replace(b"Toy Story", b"Toy Storz"))
    untouched = fetched.inter.stat().st_mtime_ns
    again = fetch_movielens_100k(home, pip=NO_PIP)
    assert again.extracted == ("ml-100k.item",)
    assert fetched.item.read_bytes() == original
    assert fetched.inter.stat().st_mtime_ns == untouched


def test_a_missing_wheel_is_downloaded_with_pip(tmp_path: Path, recbole_wheel: Path) -> None:
    # A stand-in pip that "downloads" from the cache and checks the arguments it is given.
    fake_pip = [
        sys.executable,
        "-c",
        "import shutil, sys; args = sys.argv[1:]; "
        "assert args[:2] == ['download', '--no-deps'] and 'recbole==1.2.1' in args, args; "
        f"shutil.copy({str(recbole_wheel)!r}, args[args.index('-d') + 1])",
    ]
    files = fetch_movielens_100k(tmp_path, pip=fake_pip)
    assert files.downloaded
    assert files.wheel == tmp_path / "wheels" / WHEEL_NAME
    assert files.interactions == 100_000
    # Nothing but the wheel is left in the wheel directory (no temporary download folder).
    assert [p.name for p in (tmp_path / "wheels").iterdir()] == [WHEEL_NAME]


def test_a_failing_pip_is_reported_with_its_stderr(tmp_path: Path) -> None:
    failing = [
        sys.executable,
        "-c",
        "import sys; sys.stderr.write('ERROR: no route to the package index\\n'); sys.exit(3)",
    ]
    with pytest.raises(DataError, match="exit 3") as err:
        fetch_movielens_100k(tmp_path, pip=failing)
    assert "no route to the package index" in str(err.value)
    assert not list((tmp_path / "wheels").glob("*.whl"))


def test_a_wheel_without_the_data_is_refused(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    with zipfile.ZipFile(tmp_path / "wheels" / WHEEL_NAME, "w") as zf:
        zf.writestr("recbole/__init__.py", "")
    with pytest.raises(DataError, match="has no recbole/dataset_example/ml-100k/ml-100k.inter"):
        fetch_movielens_100k(tmp_path, pip=NO_PIP)


def test_a_corrupt_wheel_is_refused(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / WHEEL_NAME).write_bytes(b"not a zip")
    with pytest.raises(DataError, match="delete it and run again"):
        fetch_movielens_100k(tmp_path, pip=NO_PIP)


def test_headers(fetched: MovieLensFiles) -> None:
    assert read_atomic_header(fetched.inter) == [
        ("user_id", "token"),
        ("item_id", "token"),
        ("rating", "float"),
        ("timestamp", "float"),
    ]
    assert read_atomic_header(fetched.item) == [
        ("item_id", "token"),
        ("movie_title", "token_seq"),
        ("release_year", "token"),
        ("class", "token_seq"),
    ]
    assert read_atomic_header(fetched.user) == [
        ("user_id", "token"),
        ("age", "token"),
        ("gender", "token"),
        ("occupation", "token"),
        ("zip_code", "token"),
    ]


def test_items_and_their_quirks(fetched: MovieLensFiles) -> None:
    items = {i.item_id: i for i in load_items(fetched.item)}
    assert len(items) == 1_682
    assert set(items) == {str(n) for n in range(1, 1_683)}
    toy = items["1"]
    assert (toy.title, toy.year, toy.genres) == (
        "Toy Story",
        1995,
        ["Animation", "Children's", "Comedy"],
    )
    # The placeholder item: no title, no year, no genre.
    assert (items["267"].title, items["267"].year, items["267"].genres) == (None, None, [])
    # Year left in the title, "V" in the year column.
    assert items["1412"].title == "Land Before Time III: The Time of the Great Giving"
    assert items["1412"].year == 1995
    assert items["1373"].genres == []
    assert items["543"].title == "Misérables, Les"
    assert [i.item_id for i in items.values() if i.year is None] == ["267"]
    years = [i.year for i in items.values() if i.year is not None]
    assert (min(years), max(years)) == (1922, 1998)
    assert not any(
        i.title and i.title.endswith(")") and i.title[-5:-1].isdigit() for i in items.values()
    )


def test_users(fetched: MovieLensFiles) -> None:
    users = load_users(fetched.user)
    assert len(users) == 943
    assert users[0].user_id == "1"
    assert users[0].attributes == {
        "age": "24",
        "gender": "M",
        "occupation": "technician",
        "zip_code": "85711",
    }
    assert Counter(u.attributes["gender"] for u in users) == {"M": 670, "F": 273}
    # Zip codes are text: some are Canadian postal codes.
    assert any(not u.attributes["zip_code"].isdigit() for u in users)


def test_interactions(fetched: MovieLensFiles) -> None:
    with fetched.inter.open(encoding="utf-8") as f:
        next(f)
        rows = [line.rstrip("\n").split("\t") for line in f]
    assert len(rows) == 100_000
    assert len({u for u, *_ in rows}) == 943
    assert len({i for _, i, *_ in rows}) == 1_682
    assert len({(u, i) for u, i, *_ in rows}) == 100_000
    assert Counter(r for _, _, r, _ in rows) == {
        "1": 6_110,
        "2": 11_370,
        "3": 27_145,
        "4": 34_174,
        "5": 21_201,
    }
    ts = [int(t) for *_, t in rows]
    assert (min(ts), max(ts)) == (874_724_710, 893_286_638)
