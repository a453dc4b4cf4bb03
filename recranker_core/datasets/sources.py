"""Interaction sources: find the files behind a path or s3:// URI, tell their format, and read
their header into the columns the ingest needs. Streaming the rows is the ingest's job."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from recranker_core.datasets.movielens import UserRecord
from recranker_core.errors import DataError
from recranker_core.store.manifest import check_safe_path

if TYPE_CHECKING:
    from recranker_core.stack import S3Config

log = logging.getLogger(__name__)

FORMATS = ("movielens", "csv", "parquet")
# Accepted header names for each field the ingest needs; first match wins.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "user_id": ("user_id", "userid", "user"),
    "item_id": ("item_id", "itemid", "item", "movie_id", "movieid"),
    "rating": ("rating", "score"),
    "timestamp": ("timestamp", "event_ts", "ts", "time"),
}
_INTERACTION_SUFFIXES = {".inter": "movielens", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class SourceFile:
    """One interaction file and what travels with it (item and user files of the same batch)."""

    path: Path
    fmt: str
    source: str  # what the user named: local path or s3:// URI of this file
    delimiter: str = ","
    items_path: Path | None = None
    users_path: Path | None = None


@dataclass
class Header:
    """The file's columns and where the needed fields are among them."""

    columns: list[str]
    positions: dict[str, int] = field(default_factory=dict)


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def guess_format(path: Path) -> str:
    fmt = _INTERACTION_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; "
            f"pass --format with one of {', '.join(FORMATS)}"
        )
    return fmt


def _sibling(path: Path, suffixes: tuple[str, ...], stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        for suffix in suffixes:
            candidate = path.with_name(stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def describe_file(path: Path, fmt: str | None, source: str | None = None) -> SourceFile:
    """A SourceFile for one interaction file, with its item/user files found beside it.

    MovieLens atomic files travel as `<name>.inter` with `<name>.item` and `<name>.user`; CSV,
    TSV and Parquet files pick up `items.csv` / `users.csv` in the same directory.
    """
    fmt = fmt or guess_format(path)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "movielens":
        items = _sibling(path, (".item",), (path.stem,))
        users = _sibling(path, (".user",), (path.stem,))
        delimiter = "\t"
    else:
        items = _sibling(path, (".csv",), ("items",))
        users = _sibling(path, (".csv",), ("users",))
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    return SourceFile(
        path=path,
        fmt=fmt,
        source=source or str(path),
        delimiter=delimiter,
        items_path=items,
        users_path=users,
    )


def discover(
    target: str, fmt: str | None, cache_dir: Path, s3: S3Config | None
) -> list[SourceFile]:
    """The interaction files behind a file, a directory or an s3://bucket/prefix, in name order.

    s3 objects are downloaded into cache_dir first (the ingest reads files, and the content hash
    is taken from the bytes it reads).
    """
    if target.startswith("s3://"):
        if s3 is None:
            raise DataError(f"{target}: an s3:// source needs S3 settings (RECRANKER_S3_ENDPOINT)")
        return _discover_s3(target, fmt, cache_dir, s3)
    path = Path(target).expanduser()
    if path.is_file():
        return [describe_file(path, fmt)]
    if path.is_dir():
        found = [
            describe_file(p, fmt)
            for p in sorted(path.iterdir())
            if p.is_file() and _is_interaction_file(p, fmt)
        ]
        if not found:
            raise DataError(
                f"{path}: no interaction files (*.inter, *.csv, *.tsv, *.parquet) in this directory"
            )
        return found
    raise DataError(f"{target}: no such file or directory")


def _is_interaction_file(path: Path, fmt: str | None) -> bool:
    if path.stem in ("items", "users") or path.suffix.lower() in (".item", ".user"):
        return False
    guessed = _INTERACTION_SUFFIXES.get(path.suffix.lower())
    return guessed is not None and (fmt is None or fmt == guessed)


def _discover_s3(target: str, fmt: str | None, cache_dir: Path, s3: S3Config) -> list[SourceFile]:
    bucket, _, prefix = target[len("s3://") :].partition("/")
    client = s3.client()
    keys: list[str] = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []))
    if not keys:
        raise DataError(f"{target}: no objects under this prefix")
    paths = cache_paths(target, bucket, keys, cache_dir)
    for key, dest in paths.items():
        dest.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading s3://%s/%s", bucket, key)
        client.download_file(bucket, key, str(dest))
    files = []
    for key, dest in sorted(paths.items()):
        if _is_interaction_file(dest, fmt):
            files.append(describe_file(dest, fmt, source=f"s3://{bucket}/{key}"))
    if not files:
        raise DataError(f"{target}: no interaction files (*.inter, *.csv, *.tsv, *.parquet)")
    return files


def cache_paths(target: str, bucket: str, keys: list[str], cache_dir: Path) -> dict[str, Path]:
    """Where each object of an s3:// source is downloaded: ``cache_dir/bucket/key``. Folder
    markers ("a/b/") hold no data and are left out; a key that would leave the cache (a ``..``
    component, an absolute path, a backslash) refuses the whole source before any download."""
    try:
        check_safe_path(bucket)
    except ValueError as exc:
        raise DataError(f"{target}: invalid bucket name {bucket!r}: {exc}") from None
    paths: dict[str, Path] = {}
    for key in keys:
        if key.endswith("/"):
            continue
        try:
            check_safe_path(key)
        except ValueError as exc:
            raise DataError(
                f"{target}: refusing object key {key!r}: {exc}; nothing was downloaded. Rename "
                "or remove that object"
            ) from None
        paths[key] = cache_dir / bucket / key
    return paths


def normalise_column(name: str) -> str:
    """MovieLens atomic headers carry a type suffix (`user_id:token`); CSV ones may be quoted."""
    return name.strip().strip('"').split(":", 1)[0].strip().lower()


def map_header(columns: list[str], where: str) -> Header:
    """Locate the needed fields among the columns, or say which one is missing and where."""
    header = Header(columns=columns)
    normalised = [normalise_column(c) for c in columns]
    for field_name, aliases in FIELD_ALIASES.items():
        for alias in aliases:
            if alias in normalised:
                header.positions[field_name] = normalised.index(alias)
                break
        else:
            raise DataError(
                f"{where}, line 1: no {field_name!r} column "
                f"(accepted names: {', '.join(aliases)}); "
                f"the header has {', '.join(repr(c) for c in columns) or 'no columns'}"
            )
    return header


@dataclass(frozen=True)
class ItemRow:
    item_id: str
    title: str | None
    year: int | None
    genres: list[str]
    attributes: dict[str, str]


def _is_atomic(path: Path) -> bool:
    return path.suffix.lower() in (".item", ".user")


def _catalogue_rows(path: Path, id_field: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header (normalised) and (line, fields) of a small item or user file.

    Atomic files (`name:type` headers) are tab-separated, the others by their extension.
    """
    import csv

    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    lines = text.splitlines()
    if not lines:
        raise DataError(f"{path}: the file is empty")
    first = lines[0]
    delimiter = "\t" if (":" in first and "\t" in first) or path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    try:
        header = [normalise_column(c) for c in next(reader)]
        if id_field not in header:
            raise DataError(f"{path}, line 1: no {id_field!r} column; the header has {header}")
        rows = []
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{path}, line {reader.line_num}: {len(fields)} fields where the header has "
                    f"{len(header)}"
                )
            rows.append((reader.line_num, fields))
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: {exc}") from exc
    return header, rows


_BAD_ID = re.compile(r"[\x00-\x1f\x7f-\x9f]|^ | $")


def _check_id(path: Path, line: int | None, field_name: str, value: str) -> str:
    """The id as given, or DataError: a catalogue id is stored byte for byte like the
    interactions' ids, so it must not be empty, hold a control character or be padded."""
    where = f"{path}, line {line}" if line is not None else str(path)
    if not value.strip():
        raise DataError(f"{where}: {field_name} is empty")
    if _BAD_ID.search(value):
        raise DataError(
            f"{where}: {field_name} {value!r} holds a control character or begins or ends with a "
            "space; ids are stored exactly as given, so fix it in the file"
        )
    return value


def read_items(path: Path) -> list[ItemRow]:
    """Items of a MovieLens `.item` file or an items CSV (item_id,title,year,genres,...).

    A year that is not a number becomes None, its text kept in attributes["year_raw"]: a
    catalogue typo is no reason to refuse a day of interactions.
    """
    if _is_atomic(path):
        from recranker_core.datasets.movielens import load_items

        return [
            ItemRow(_check_id(path, None, "item_id", i.item_id), i.title, i.year, i.genres, {})
            for i in load_items(path)
        ]
    header, rows = _catalogue_rows(path, "item_id")
    pos = {name: i for i, name in enumerate(header)}
    title_col = next((c for c in ("title", "movie_title", "name") if c in pos), None)
    year_col = next((c for c in ("year", "release_year") if c in pos), None)
    genre_col = next((c for c in ("genres", "genre", "class") if c in pos), None)
    known = {"item_id", title_col, year_col, genre_col}
    items = []
    for line, fields in rows:
        item_id = _check_id(path, line, "item_id", fields[pos["item_id"]])
        year: int | None = None
        attributes = {h: fields[i] for h, i in pos.items() if h not in known}
        raw_year = fields[pos[year_col]].strip() if year_col is not None else ""
        if raw_year:
            try:
                year = int(float(raw_year))
            except ValueError:
                log.warning(
                    "%s, line %d: year %r is not a number; stored as unknown", path, line, raw_year
                )
                attributes["year_raw"] = raw_year
        genres: list[str] = []
        if genre_col is not None:
            raw = fields[pos[genre_col]].strip()
            # CSV files separate genres with "|"; MovieLens atomic files with spaces.
            parts = raw.split("|") if "|" in raw else raw.split()
            genres = [g.strip() for g in parts if g.strip()]
        items.append(
            ItemRow(
                item_id=item_id,
                title=(fields[pos[title_col]].strip() or None) if title_col else None,
                year=year,
                genres=genres,
                attributes=attributes,
            )
        )
    return items


def read_users(path: Path) -> list[UserRecord]:
    """Users of a MovieLens `.user` file or a users CSV (user_id plus any attribute columns)."""
    if _is_atomic(path):
        from recranker_core.datasets.movielens import load_users

        users = load_users(path)
        for user in users:
            _check_id(path, None, "user_id", user.user_id)
        return users
    header, rows = _catalogue_rows(path, "user_id")
    uid = header.index("user_id")
    users = []
    for line, fields in rows:
        user_id = _check_id(path, line, "user_id", fields[uid])
        users.append(
            UserRecord(
                user_id=user_id,
                attributes={h: fields[i] for i, h in enumerate(header) if i != uid},
            )
        )
    return users
