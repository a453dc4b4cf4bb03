"""Artifact stores: a directory of files (model, adapter) kept under a prefix with its manifest,
in S3 or (only when asked) a local directory, downloaded with every checksum verified; and a local
verified cache in front of them.

Layout under a prefix: the artifact's files at ``<prefix>/<relative path>``, and
``<prefix>/manifest.json`` written last. The manifest is the commit: a prefix with files but no
manifest is an incomplete upload, and an artifact with a manifest is never overwritten (a new
version gets a new prefix). One writer per prefix: the registry hands out fresh prefixes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from recranker_core.errors import (
    ArtifactExistsError,
    ArtifactIntegrityError,
    ArtifactNotFoundError,
)
from recranker_core.store.manifest import (
    DIGEST_SHOWN,
    MANIFEST_NAME,
    PROBLEMS_SHOWN,
    FileEntry,
    Manifest,
    check_relative_path,
    copy_hashing,
    describe_mismatch,
    integrity_error,
)

log = logging.getLogger(__name__)

# Where the local store writes an object before renaming it into place; never a valid prefix.
LOCAL_TMP_DIR = ".recranker-tmp"


@dataclass(frozen=True)
class StoredArtifact:
    """Where an upload went and what it holds."""

    uri: str
    prefix: str
    manifest: Manifest


@runtime_checkable
class ArtifactStore(Protocol):
    """What the registry, the tuning and the batch ranking need from a store."""

    def put_directory(
        self, local: Path, prefix: str, meta: dict[str, Any] | None = None
    ) -> StoredArtifact: ...

    def get_directory(
        self,
        prefix: str,
        dest: Path,
        expected: Mapping[str, str] | None = None,
        owner: str = "",
        remedy: str = "train it again",
    ) -> Manifest: ...

    def read_manifest(self, prefix: str) -> Manifest: ...

    def exists(self, prefix: str) -> bool: ...

    def delete(self, prefix: str) -> None: ...

    def uri(self, prefix: str) -> str: ...


def normalise_prefix(prefix: str) -> str:
    """``prefix`` without surrounding slashes, refused if it could leave the store's root."""
    cleaned = prefix.strip("/") if isinstance(prefix, str) else prefix
    try:
        check_relative_path(cleaned)
    except ValueError as exc:
        raise ValueError(f"invalid artifact prefix {prefix!r}: {exc}") from exc
    if cleaned.split("/", 1)[0] == LOCAL_TMP_DIR:
        raise ValueError(f"invalid artifact prefix {prefix!r}: {LOCAL_TMP_DIR} is reserved")
    return cleaned


class _ObjectStore:
    """The artifact protocol written once over a handful of object primitives, so the S3 and the
    local store cannot drift apart in what they accept, refuse or report."""

    # -- primitives (keys are full object keys: "<prefix>/<relative path>")

    def _key_uri(self, key: str) -> str:
        raise NotImplementedError

    def _list_keys(self, under: str, limit: int | None = None) -> list[str]:
        """Keys starting with ``under`` (which ends with "/"), at most ``limit`` of them."""
        raise NotImplementedError

    def _has_key(self, key: str) -> bool:
        raise NotImplementedError

    def _open_key(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A readable stream of the object; FileNotFoundError when there is none."""
        raise NotImplementedError

    def _put_file(self, key: str, path: Path, entry: FileEntry) -> None:
        """Store a file's bytes; ArtifactIntegrityError when they are not ``entry`` any more."""
        raise NotImplementedError

    def _put_manifest(self, key: str, body: bytes) -> None:
        """Store the manifest unless one exists (ArtifactExistsError), atomically if possible."""
        raise NotImplementedError

    def _delete_keys(self, keys: list[str]) -> None:
        raise NotImplementedError

    # -- the protocol

    def uri(self, prefix: str) -> str:
        return self._key_uri(normalise_prefix(prefix))

    def exists(self, prefix: str) -> bool:
        """True when a complete artifact (one with its manifest) is stored under the prefix."""
        return self._has_key(f"{normalise_prefix(prefix)}/{MANIFEST_NAME}")

    def read_manifest(self, prefix: str) -> Manifest:
        prefix = normalise_prefix(prefix)
        key = f"{prefix}/{MANIFEST_NAME}"
        try:
            with self._open_key(key) as stream:
                body = stream.read()
        except FileNotFoundError:
            if self._list_keys(f"{prefix}/", limit=1):
                raise ArtifactIntegrityError(
                    f"incomplete upload: no {MANIFEST_NAME} under {self.uri(prefix)}: files were "
                    "stored but the upload never finished. Upload the artifact again "
                    "(put_directory removes the leftovers) or delete the prefix."
                ) from None
            raise ArtifactNotFoundError(
                f"no artifact at {self.uri(prefix)}: nothing is stored under this prefix"
            ) from None
        return Manifest.from_json(body, source=self._key_uri(key))

    def put_directory(
        self, local: Path, prefix: str, meta: dict[str, Any] | None = None
    ) -> StoredArtifact:
        """Upload every file under ``local``, then its manifest, to ``prefix``.

        Refuses a prefix that already holds a complete artifact, lies inside one, or contains
        one; removes the leftovers of an incomplete upload first. On a failure before the
        manifest is written, the files sent so far are removed again (best effort), so the
        prefix reads as empty or, at worst, as an incomplete upload.
        """
        prefix = normalise_prefix(prefix)
        local = Path(local)
        started = time.monotonic()
        leftovers = self._check_writable(prefix)
        # Hashed (and meta checked) before anything is removed or sent.
        manifest = Manifest.for_directory(local, meta)
        body = manifest.to_json().encode()
        if leftovers:
            log.warning(
                "removing %d objects of an incomplete upload under %s before storing again",
                len(leftovers),
                self.uri(prefix),
            )
            self._delete_keys(leftovers)
        sent: list[str] = []
        try:
            for rel, entry in manifest.files.items():
                key = f"{prefix}/{rel}"
                sent.append(key)
                self._put_file(key, local / rel, entry)
        except BaseException:
            with contextlib.suppress(Exception):
                self._delete_keys(sent)
            raise
        # Not cleaned up on failure: an ArtifactExistsError here means another writer committed
        # the same prefix, and the objects are now theirs.
        self._put_manifest(f"{prefix}/{MANIFEST_NAME}", body)
        log.info(
            "stored artifact %s: %d files, %s in %.1f s",
            self.uri(prefix),
            len(manifest.files),
            _human_size(manifest.total_size),
            time.monotonic() - started,
        )
        return StoredArtifact(uri=self.uri(prefix), prefix=prefix, manifest=manifest)

    def get_directory(
        self,
        prefix: str,
        dest: Path,
        expected: Mapping[str, str] | None = None,
        owner: str = "",
        remedy: str = "train it again",
    ) -> Manifest:
        """Download the artifact into ``dest`` (which must not exist), verifying every file.

        ``expected`` (relative path -> sha256, from the registry row named by ``owner``) is what
        the artifact must hold: a stored manifest that lists other files or other digests is
        refused before anything is downloaded, so the manifest beside the files is never the
        only authority. The files land in a temporary sibling of ``dest`` that is renamed into
        place only when all of them match, so ``dest`` is either complete and verified or absent.
        ``dest/manifest.json`` holds the manifest, so the directory can be verified again later.
        """
        prefix = normalise_prefix(prefix)
        dest = Path(dest)
        if dest.exists() or dest.is_symlink():
            raise FileExistsError(
                f"{dest} already exists; fetch into a new directory (or remove it first)"
            )
        manifest = self.read_manifest(prefix)
        if expected is not None:
            check_registered(
                manifest,
                expected,
                where=self._key_uri(f"{prefix}/{MANIFEST_NAME}"),
                owner=owner,
                hint="the stored artifact was changed after it was registered; nothing of it "
                "was downloaded",
                remedy=remedy,
            )
        started = time.monotonic()
        dest.parent.mkdir(parents=True, exist_ok=True)
        # A sibling, so the final rename stays on one filesystem and is atomic.
        partial = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:12]}"
        partial.mkdir()
        try:
            problems: list[str] = []
            for rel, entry in manifest.files.items():
                key = f"{prefix}/{rel}"
                target = partial / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with self._open_key(key) as src, open(target, "wb") as out:
                        actual = copy_hashing(src, out)
                except FileNotFoundError:
                    problems.append(f"{rel}: missing (no object {self._key_uri(key)})")
                    continue
                problem = describe_mismatch(rel, entry, actual)
                if problem:
                    problems.append(problem)
            if problems:
                raise integrity_error(
                    self.uri(prefix),
                    problems,
                    hint="the stored copy is damaged: nothing was written to "
                    f"{dest}; store the artifact again under a new prefix",
                )
            (partial / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
            try:
                os.rename(partial, dest)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    # Someone else (another fetch of the same cache entry) got there first.
                    raise FileExistsError(f"{dest} appeared during the fetch") from exc
                raise
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        log.info(
            "fetched artifact %s into %s: %d files, %s verified in %.1f s",
            self.uri(prefix),
            dest,
            len(manifest.files),
            _human_size(manifest.total_size),
            time.monotonic() - started,
        )
        return manifest

    def delete(self, prefix: str) -> None:
        """Remove the artifact (or the leftovers of an incomplete upload); nothing there is fine.

        The manifest goes first, so a delete cut short leaves an incomplete upload, never an
        artifact that claims files it no longer has.
        """
        prefix = normalise_prefix(prefix)
        keys = self._list_keys(f"{prefix}/")
        manifest_key = f"{prefix}/{MANIFEST_NAME}"
        nested = [k for k in keys if k.endswith(f"/{MANIFEST_NAME}") and k != manifest_key]
        if nested and manifest_key not in keys:
            raise ArtifactExistsError(
                f"{self.uri(prefix)} is not an artifact but holds {len(nested)} "
                f"(e.g. {self._key_uri(nested[0].rsplit('/', 1)[0])}); delete each by its prefix"
            )
        if manifest_key in keys:
            self._delete_keys([manifest_key])
        rest = [k for k in keys if k != manifest_key]
        self._delete_keys(rest)
        log.info("deleted %s (%d objects)", self.uri(prefix), len(keys))

    # -- shared checks

    def _check_writable(self, prefix: str) -> list[str]:
        """Refuse a prefix that cannot take a new artifact; return an incomplete upload's keys."""
        if self.exists(prefix):
            raise ArtifactExistsError(
                f"{self.uri(prefix)} already holds a complete artifact; artifacts are immutable: "
                "store the new version under a new prefix"
            )
        # Nesting is refused both ways: deleting the outer artifact would take the inner one
        # with it, and the outer manifest would not describe the inner files.
        parts = prefix.split("/")
        for depth in range(1, len(parts)):
            outer = "/".join(parts[:depth])
            if self._has_key(f"{outer}/{MANIFEST_NAME}"):
                raise ArtifactExistsError(
                    f"{self.uri(prefix)} lies inside the artifact {self.uri(outer)}; "
                    "artifacts cannot nest: choose a prefix beside it"
                )
        leftovers = self._list_keys(f"{prefix}/")
        nested = [k for k in leftovers if k.endswith(f"/{MANIFEST_NAME}")]
        if nested:
            raise ArtifactExistsError(
                f"{self.uri(prefix)} contains the artifact "
                f"{self._key_uri(nested[0].rsplit('/', 1)[0])}; artifacts cannot nest: "
                "choose another prefix"
            )
        return leftovers


def check_registered(
    manifest: Manifest,
    expected: Mapping[str, str],
    *,
    where: str,
    owner: str,
    hint: str,
    remedy: str = "train it again",
) -> None:
    """ArtifactIntegrityError unless ``manifest`` lists exactly the registered files with the
    registered digests (the manifest lives beside the files, so it can be rewritten with them)."""
    problems: list[str] = []
    for rel in sorted(expected.keys() - manifest.files.keys()):
        problems.append(f"{rel}: registered, missing from the manifest")
    for rel in sorted(manifest.files.keys() - expected.keys()):
        problems.append(f"{rel}: in the manifest, not registered")
    for rel in sorted(expected.keys() & manifest.files.keys()):
        found = manifest.files[rel].sha256
        if found != expected[rel]:
            problems.append(
                f"{rel}: sha256 {found[:DIGEST_SHOWN]}... where the registry has "
                f"{expected[rel][:DIGEST_SHOWN]}..."
            )
    if problems:
        shown = "; ".join(problems[:PROBLEMS_SHOWN])
        more = (
            f"; and {len(problems) - PROBLEMS_SHOWN} more" if len(problems) > PROBLEMS_SHOWN else ""
        )
        raise ArtifactIntegrityError(
            f"{where} disagrees with the registry ({owner or 'the registered digests'}): "
            f"{shown}{more}. {hint[:1].upper() + hint[1:]}; restore the original files or "
            f"{remedy}"
        )


def _changed_while_storing(path: Path) -> ArtifactIntegrityError:
    return ArtifactIntegrityError(
        f"{path} changed while it was being stored (its bytes no longer match the sha256 taken "
        "moments before); nothing was committed. Store the artifact again once it is written."
    )


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable; keeps mypy sure of the return
