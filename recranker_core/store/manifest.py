"""The manifest of a stored artifact: every file's relative path, size and sha256, plus free JSON
metadata (kind, hyperparameters, metrics, lineage); built from a directory, checked against one.

A manifest read from a store is data from outside: `Manifest.from_json` refuses anything that is not
exactly what `to_json` writes, and above all paths that would leave the artifact's directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from recranker_core.errors import ArtifactIntegrityError, DataError

FORMAT_VERSION = 1
# The manifest travels with the files under this name, at the top of the artifact (in the store
# and in a fetched directory), so the name is reserved and never listed as one of the files.
MANIFEST_NAME = "manifest.json"
CHUNK_SIZE = 1024 * 1024
# Enough of a digest to tell two apart in a message; the full value is in the manifest.
DIGEST_SHOWN = 12
# Problems named one by one in an error message; a thoroughly broken artifact gets a count.
PROBLEMS_SHOWN = 10

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact."""

    sha256: str  # lowercase hex
    size: int  # bytes


@dataclass(frozen=True)
class Manifest:
    """What an artifact holds; `files` maps relative posix paths, sorted, to their entries."""

    files: dict[str, FileEntry]
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: utc_now_iso())
    format_version: int = FORMAT_VERSION

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files.values())

    # ------------------------------------------------------------------ build and (de)serialise

    @classmethod
    def for_directory(
        cls, path: Path, meta: dict[str, Any] | None = None, *, created_at: str | None = None
    ) -> Manifest:
        """Hash every file under ``path`` (streaming) into a new manifest.

        A top-level ``manifest.json`` is skipped: it is the manifest of an earlier fetch or
        upload, and the new one takes its place. Files reached through symlinks are read as
        their targets (a Hugging Face snapshot is a tree of such links); symlinked directories
        and special files are refused, since what they hold is not part of this tree.
        """
        path = Path(path)
        if not path.is_dir():
            raise DataError(f"{path}: not a directory; an artifact is a directory of files")
        found, problems = _scan(path)
        if problems:
            raise DataError(
                f"{path} cannot be stored as an artifact: {'; '.join(problems)}. "
                "Copy the real files into the directory instead."
            )
        for rel in found:
            try:
                check_relative_path(rel)
            except ValueError as exc:
                raise DataError(f"{path}: {exc}; rename it before storing the artifact") from exc
        files = {rel: hash_file(found[rel]) for rel in sorted(found)}
        return cls(
            files=files,
            meta=_plain_json(meta or {}),
            created_at=created_at or utc_now_iso(),
        )

    def to_json(self) -> str:
        """The manifest as JSON with sorted keys and a fixed layout: the same manifest always
        gives the same bytes (so it can itself be hashed or diffed)."""
        document = {
            "format_version": self.format_version,
            "created_at": self.created_at,
            "meta": self.meta,
            "files": {
                rel: {"sha256": entry.sha256, "size": entry.size}
                for rel, entry in sorted(self.files.items())
            },
        }
        text = json.dumps(document, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
        return text + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "manifest") -> Manifest:
        """Parse and check a manifest; ``source`` (a URI or path) is named in every error."""

        def bad(what: str) -> ArtifactIntegrityError:
            return ArtifactIntegrityError(
                f"{source}: invalid manifest: {what}. The artifact cannot be trusted; "
                "store it again under a new prefix."
            )

        try:
            document = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"not valid JSON ({exc})") from exc
        if not isinstance(document, dict):
            raise bad("the top level is not a JSON object")
        version = document.get("format_version")
        if type(version) is not int or version < 1:
            raise bad(f"format_version must be a positive integer, found {version!r}")
        if version > FORMAT_VERSION:
            raise ArtifactIntegrityError(
                f"{source}: manifest format {version} was written by a newer recranker "
                f"(this one reads format {FORMAT_VERSION}); upgrade recranker to read it"
            )
        created_at = document.get("created_at")
        if not isinstance(created_at, str):
            raise bad(f"created_at must be a string, found {created_at!r}")
        meta = document.get("meta")
        if not isinstance(meta, dict):
            raise bad("meta must be a JSON object")
        raw_files = document.get("files")
        if not isinstance(raw_files, dict):
            raise bad("files must be a JSON object")
        files: dict[str, FileEntry] = {}
        for rel, raw in raw_files.items():
            try:
                check_relative_path(rel)
            except ValueError as exc:
                raise bad(str(exc)) from exc
            if not isinstance(raw, dict):
                raise bad(f"{rel!r}: entry must be an object with sha256 and size")
            digest, size = raw.get("sha256"), raw.get("size")
            if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
                raise bad(f"{rel!r}: sha256 must be 64 lowercase hex digits, found {digest!r}")
            if type(size) is not int or size < 0:
                raise bad(f"{rel!r}: size must be a non-negative integer, found {size!r}")
            files[rel] = FileEntry(sha256=digest, size=size)
        # "a" as a file and "a/b" as another cannot both exist on disk; a download would fail
        # halfway with an OS error instead of a clear one.
        parents = {p for rel in files for p in _parents(rel)}
        clash = sorted(parents & files.keys())
        if clash:
            raise bad(f"{clash[0]!r} is listed both as a file and as a directory")
        return cls(
            files=dict(sorted(files.items())),
            meta=meta,
            created_at=created_at,
            format_version=version,
        )

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        """The manifest stored in a fetched directory (its ``manifest.json``)."""
        path = Path(directory) / MANIFEST_NAME
        return cls.from_json(path.read_bytes(), source=str(path))

    # ------------------------------------------------------------------ verification

    def verify_directory(self, path: Path) -> None:
        """Check that ``path`` holds exactly these files with these sizes and checksums.

        Raises ArtifactIntegrityError naming every file that is missing, unexpected, of the
        wrong size or with the wrong sha256. Sizes are compared first, so a truncated file is
        found without reading it.
        """
        path = Path(path)
        if not path.is_dir():
            raise ArtifactIntegrityError(f"{path}: no such directory; fetch the artifact again")
        found, problems = _scan(path)
        for rel in sorted(self.files.keys() - found.keys()):
            problems.append(f"{rel}: missing")
        for rel in sorted(found.keys() - self.files.keys()):
            problems.append(f"{rel}: unexpected file, not in the manifest")
        for rel in sorted(self.files.keys() & found.keys()):
            expected = self.files[rel]
            size = found[rel].stat().st_size
            # A size mismatch is found without reading the file (a truncated 2 GB model).
            actual = FileEntry("", size) if size != expected.size else hash_file(found[rel])
            problem = describe_mismatch(rel, expected, actual)
            if problem:
                problems.append(problem)
        if problems:
            raise integrity_error(
                str(path), problems, hint="delete the directory and fetch the artifact again"
            )


# ---------------------------------------------------------------------------------------------
# helpers shared with the stores


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_relative_path(rel: str) -> str:
    """Return ``rel`` if it is a plain relative posix path inside a directory, else ValueError.

    Used for manifest entries and store prefixes alike: `check_safe_path`, and not the name of
    the manifest itself.
    """
    check_safe_path(rel)
    if rel == MANIFEST_NAME:
        raise ValueError(f"path {rel!r} is reserved for the manifest itself")
    return rel


def check_safe_path(rel: str) -> str:
    """Return ``rel`` if joining it to a directory stays inside that directory, else ValueError:
    no absolute paths, no ``..`` (or ``.``, or empty) components, no backslashes (a separator on
    Windows, and a trap everywhere), no NUL. For object keys that become local paths."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"path {rel!r} is empty or not a string")
    if "\x00" in rel or "\\" in rel:
        raise ValueError(f"path {rel!r} contains a NUL byte or a backslash")
    if rel.startswith("/"):
        raise ValueError(f"path {rel!r} is absolute; manifest paths are relative")
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"path {rel!r} has an empty, '.' or '..' component (may escape)")
    return rel


def hash_file(path: Path) -> FileEntry:
    """Size and sha256 of one file, read in chunks (model files do not fit in memory)."""
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256")
        size = fh.tell()
    return FileEntry(sha256=digest.hexdigest(), size=size)


def copy_hashing(src: IO[bytes], dst: IO[bytes]) -> FileEntry:
    """Copy a stream, hashing on the way: one pass over the bytes for download and check."""
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK_SIZE):
        digest.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return FileEntry(sha256=digest.hexdigest(), size=size)


def describe_mismatch(rel: str, expected: FileEntry, actual: FileEntry) -> str | None:
    """One problem line for a file whose bytes differ from the manifest, or None if they match."""
    if actual.size != expected.size:
        return f"{rel}: size mismatch (expected {expected.size} bytes, found {actual.size})"
    if actual.sha256 != expected.sha256:
        return (
            f"{rel}: checksum mismatch (expected sha256 {expected.sha256[:DIGEST_SHOWN]}..., "
            f"found {actual.sha256[:DIGEST_SHOWN]}...)"
        )
    return None


def integrity_error(where: str, problems: list[str], *, hint: str) -> ArtifactIntegrityError:
    shown = "; ".join(problems[:PROBLEMS_SHOWN])
    more = f"; and {len(problems) - PROBLEMS_SHOWN} more" if len(problems) > PROBLEMS_SHOWN else ""
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    hint = hint[:1].upper() + hint[1:]
    return ArtifactIntegrityError(
        f"{where} does not match its manifest ({count}): {shown}{more}. {hint}."
    )


def _scan(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Regular files under root by relative posix path (the top-level manifest left out), and
    the entries that cannot be part of an artifact."""
    found: dict[str, Path] = {}
    problems: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for name in list(dirnames):
            if (here / name).is_symlink():
                # os.walk does not descend into it; say so rather than skip its files silently.
                rel = (here / name).relative_to(root).as_posix()
                problems.append(f"{rel}: a symlinked directory")
        for name in filenames:
            full = here / name
            rel = full.relative_to(root).as_posix()
            if rel == MANIFEST_NAME:
                continue
            try:
                mode = full.stat().st_mode  # follows file symlinks on purpose
            except FileNotFoundError:
                problems.append(f"{rel}: a dangling symlink")
                continue
            if not stat.S_ISREG(mode):
                problems.append(f"{rel}: not a regular file")
                continue
            found[rel] = full
    return found, problems


def _parents(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _plain_json(meta: dict[str, Any]) -> dict[str, Any]:
    """A copy of meta as it will read back from the JSON (tuples become lists, and so on), so a
    manifest compares equal to its own round trip; refuses what JSON cannot hold."""
    if not isinstance(meta, dict):
        raise TypeError(f"manifest meta must be a dict, got {type(meta).__name__}")
    try:
        copied: dict[str, Any] = json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"manifest meta must be plain JSON (str, finite numbers, bool, None, lists, dicts "
            f"with str keys): {exc}"
        ) from exc
    return copied
