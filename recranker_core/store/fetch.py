"""Fetching registered artifacts: the registry row's digests checked, then a verified local
copy kept in a cache in front of the store (`fetch_cached`, `fetch_registered`)."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from recranker_core.errors import (
    ArtifactIntegrityError,
    ArtifactNotFoundError,
)
from recranker_core.store.artifacts import (
    ArtifactStore,
    _human_size,
    check_registered,
    normalise_prefix,
)
from recranker_core.store.manifest import (
    PROBLEMS_SHOWN,
    SHA256_HEX,
    Manifest,
    check_relative_path,
)

log = logging.getLogger(__name__)

# The only kinds of file a registered artifact may hold: each is read without running code from
# it (JSON, safetensors, ONNX, text), or, `.pt`, by `torch.load(weights_only=True)`, which builds
# tensors and plain containers only. Anything else is refused before it is downloaded.
LOADABLE_SUFFIXES = (".json", ".jsonl", ".safetensors", ".onnx", ".md", ".pt")


def fetch_cached(
    store: ArtifactStore,
    prefix: str,
    cache_root: Path,
    *,
    expected: Mapping[str, str] | None = None,
    owner: str = "",
    remedy: str = "train it again",
) -> Path:
    """A verified local copy of the artifact under ``cache_root``, downloaded only when needed.

    An existing copy is checked against its manifest (sizes, then sha256 of every file), and
    that manifest against ``expected`` when given (relative path -> sha256 from the registry
    row ``owner``); a copy that fails either check is removed and fetched again, so a tampered
    cache is never used. Artifacts are immutable, so a valid copy needs no download; with
    ``expected``, the store's manifest is still read (one small object) so that damage in the
    store is reported even while this machine serves its verified copy.
    """
    prefix = normalise_prefix(prefix)
    dest = Path(cache_root) / cache_entry_name(store.uri(prefix), prefix)
    if dest.exists() or dest.is_symlink():
        try:
            manifest = _verified_copy(dest, expected, owner, remedy)
        except (ArtifactIntegrityError, OSError) as exc:
            log.warning("cached copy %s of %s is not valid (%s); fetching again", dest, prefix, exc)
            _remove(dest)
        else:
            log.info(
                "using cached %s (%d files, %s, verified)",
                dest,
                len(manifest.files),
                _human_size(manifest.total_size),
            )
            if expected is not None:
                _report_store_damage(store, prefix, expected, owner, remedy)
            return dest
    try:
        store.get_directory(prefix, dest, expected, owner, remedy)
    except FileExistsError:
        # A concurrent fetch renamed its verified copy into place first; use that one.
        _verified_copy(dest, expected, owner, remedy)
    return dest


def fetch_registered(
    store: ArtifactStore,
    prefix: str,
    cache_root: Path,
    files: Mapping[str, str],
    owner: str,
    *,
    remedy: str = "train it again",
) -> Path:
    """The verified local copy of a registered artifact: ``files`` (relative path -> sha256, the
    registry row's ``files`` column) is the trust anchor for the download and for the cache;
    ``owner`` names the row in messages (``model 3 (mf) in recranker.models``), ``remedy`` what
    to do about a refused artifact.

    Refused with ArtifactIntegrityError before anything is downloaded: a row without digests, a
    path that could leave the artifact's directory, a file of a kind recranker does not load
    safely (LOADABLE_SUFFIXES), or a stored manifest that disagrees with the row.
    """
    return fetch_cached(
        store,
        prefix,
        cache_root,
        expected=registered_files(files, owner, remedy),
        owner=owner,
        remedy=remedy,
    )


def registered_files(
    files: Mapping[str, str], owner: str, remedy: str = "train it again"
) -> dict[str, str]:
    """The registry row's file digests, checked: plain relative paths, sha256 hex digests, and
    only files of the kinds in LOADABLE_SUFFIXES."""
    if not isinstance(files, Mapping) or not files:
        raise ArtifactIntegrityError(
            f"{owner} has no file digests in the registry (its `files` column is empty), so its "
            f"artifact cannot be verified and is not loaded: {remedy}"
        )
    problems: list[str] = []
    for rel, digest in files.items():
        try:
            check_relative_path(rel)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            problems.append(f"{rel}: {digest!r} is not a sha256 digest")
        if not rel.lower().endswith(LOADABLE_SUFFIXES):
            problems.append(
                f"{rel}: not a kind of file recranker loads (only {', '.join(LOADABLE_SUFFIXES)})"
            )
    if problems:
        raise ArtifactIntegrityError(
            f"{owner} lists files that are never loaded: {'; '.join(problems[:PROBLEMS_SHOWN])}. "
            f"recranker does not write such artifacts; nothing was downloaded: {remedy}"
        )
    return dict(files)


def _verified_copy(
    dest: Path, expected: Mapping[str, str] | None, owner: str, remedy: str
) -> Manifest:
    manifest = Manifest.load(dest)
    if expected is not None:
        check_registered(
            manifest,
            expected,
            where=str(dest),
            owner=owner,
            hint="the cached copy was changed",
            remedy=remedy,
        )
    manifest.verify_directory(dest)
    return manifest


def _report_store_damage(
    store: ArtifactStore, prefix: str, expected: Mapping[str, str], owner: str, remedy: str
) -> None:
    """Say so when the stored copy no longer matches the registry, even though this machine
    serves a verified cached one (other machines would refuse it). Best effort: an unreachable
    store is not an error while the cache is valid."""
    try:
        manifest = store.read_manifest(prefix)
        check_registered(
            manifest,
            expected,
            where=store.uri(prefix),
            owner=owner,
            hint="this machine keeps serving its verified cached copy, machines without one "
            "will refuse it",
            remedy=remedy,
        )
    except ArtifactIntegrityError as exc:
        log.error("%s", exc)
    except ArtifactNotFoundError:
        log.error(
            "%s is gone from the store (%s); this machine keeps serving its verified cached "
            "copy, machines without one cannot load it",
            store.uri(prefix),
            owner,
        )
    except Exception as exc:  # noqa: BLE001 - an unreachable store must not stop a valid cache
        log.debug("could not read the stored manifest of %s: %s", store.uri(prefix), exc)


def cache_entry_name(uri: str, prefix: str) -> str:
    """A directory name for one artifact: the prefix made filesystem-safe and readable, plus a
    digest of the full URI, so two stores (or ``a/b`` and ``a_b``) never share an entry."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", prefix).strip("._")[:80] or "artifact"
    return f"{readable}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
