"""Artifact stores: a directory of files (model, adapter) kept under a prefix with its manifest,
in S3 or (only when asked) a local directory, downloaded with every checksum verified; and a local
verified cache in front of them.

Layout under a prefix: the artifact's files at ``<prefix>/<relative path>``, and
``<prefix>/manifest.json`` written last. The manifest is the commit: a prefix with files but no
manifest is an incomplete upload, and an artifact with a manifest is never overwritten (a new
version gets a new prefix). One writer per prefix: the registry hands out fresh prefixes.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

from recranker_core.errors import (
    ArtifactExistsError,
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    RecrankerError,
)
from recranker_core.store.manifest import (
    DIGEST_SHOWN,
    MANIFEST_NAME,
    PROBLEMS_SHOWN,
    SHA256_HEX,
    FileEntry,
    Manifest,
    check_relative_path,
    copy_hashing,
    describe_mismatch,
    integrity_error,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from recranker_core.stack import S3Config

log = logging.getLogger(__name__)

# Below this a file goes up in one PutObject carrying its sha256, which the server checks against
# the bytes it receives; above it (PutObject's limit is 5 GiB) boto3's parallel multipart upload.
DEFAULT_MULTIPART_THRESHOLD = 512 * 1024 * 1024
# S3's DeleteObjects takes at most this many keys per call.
DELETE_BATCH = 1000
# Where the local store writes an object before renaming it into place; never a valid prefix.
LOCAL_TMP_DIR = ".recranker-tmp"
# The only kinds of file a registered artifact may hold: each is read without running code from
# it (JSON, safetensors, ONNX, text), or, `.pt`, by `torch.load(weights_only=True)`, which builds
# tensors and plain containers only. Anything else is refused before it is downloaded.
LOADABLE_SUFFIXES = (".json", ".jsonl", ".safetensors", ".onnx", ".md", ".pt")


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


class S3ArtifactStore(_ObjectStore):
    """Artifacts in an S3 bucket (AWS, SeaweedFS, MinIO, ...). Each object also carries its
    sha256 as user metadata (``x-amz-meta-sha256``) for people browsing the bucket."""

    def __init__(
        self, s3: S3Config, *, multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    ) -> None:
        self.s3 = s3
        self.multipart_threshold = multipart_threshold
        self._client_: S3Client | None = None

    def __repr__(self) -> str:
        return f"S3ArtifactStore(s3://{self.s3.bucket}, endpoint={self.s3.endpoint})"

    @property
    def _client(self) -> S3Client:
        # Made on first use: boto3 takes a noticeable time to import and to build a client.
        if self._client_ is None:
            self._client_ = self.s3.client()
        return self._client_

    def _key_uri(self, key: str) -> str:
        return f"s3://{self.s3.bucket}/{key}"

    def _list_keys(self, under: str, limit: int | None = None) -> list[str]:
        keys: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.s3.bucket, Prefix=under):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
            if limit and len(keys) >= limit:
                return keys[:limit]
        return keys

    def _has_key(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.s3.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    @contextlib.contextmanager
    def _open_key(self, key: str) -> Iterator[IO[bytes]]:
        from botocore.exceptions import ClientError

        try:
            response = self._client.get_object(Bucket=self.s3.bucket, Key=key)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(self._key_uri(key)) from exc
            raise
        body = response["Body"]
        try:
            yield body  # type: ignore[misc]  # StreamingBody reads like a binary file
        finally:
            body.close()

    def _put_file(self, key: str, path: Path, entry: FileEntry) -> None:
        from botocore.exceptions import ClientError

        metadata = {"sha256": entry.sha256}
        if entry.size <= self.multipart_threshold:
            checksum = base64.b64encode(bytes.fromhex(entry.sha256)).decode()
            try:
                with open(path, "rb") as body:
                    self._client.put_object(
                        Bucket=self.s3.bucket,
                        Key=key,
                        Body=body,
                        ChecksumSHA256=checksum,
                        Metadata=metadata,
                    )
            except ClientError as exc:
                if _error_code(exc) == "BadDigest":
                    raise _changed_while_storing(path) from exc
                raise
            return
        from boto3.s3.transfer import TransferConfig

        self._client.upload_file(
            str(path),
            self.s3.bucket,
            key,
            ExtraArgs={"Metadata": metadata},
            Config=TransferConfig(multipart_threshold=self.multipart_threshold),
        )
        # Multipart parts carry their own checksums but not the whole file's sha256, so a file
        # that changed since it was hashed shows here only if its length changed, and otherwise
        # at the first download.
        stored = self._client.head_object(Bucket=self.s3.bucket, Key=key)["ContentLength"]
        if stored != entry.size:
            raise _changed_while_storing(path)

    def _put_manifest(self, key: str, body: bytes) -> None:
        from botocore.exceptions import ClientError

        args: dict[str, Any] = {
            "Bucket": self.s3.bucket,
            "Key": key,
            "Body": body,
            "ContentType": "application/json",
            "Metadata": {"sha256": hashlib.sha256(body).hexdigest()},
        }
        try:
            # A conditional write: of two writers racing to commit one prefix, one loses here.
            self._client.put_object(IfNoneMatch="*", **args)
        except ClientError as exc:
            code = _error_code(exc)
            if code == "PreconditionFailed":
                raise ArtifactExistsError(
                    f"{self._key_uri(key)} was written by someone else during this upload; "
                    "artifacts are immutable: store the new version under a new prefix"
                ) from exc
            if code != "NotImplemented":
                raise
            # Servers without conditional writes: the existence check before the upload stands.
            self._client.put_object(**args)

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            response = self._client.delete_objects(
                Bucket=self.s3.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise RecrankerError(
                    f"could not delete {len(errors)} objects, e.g. "
                    f"{self._key_uri(first.get('Key', '?'))}: {first.get('Code')} "
                    f"{first.get('Message', '')}"
                )


class LocalArtifactStore(_ObjectStore):
    """Artifacts in a local directory, laid out as the bucket would be (``root/<prefix>/...``);
    for tests without S3 and single-machine setups. Each object is written to a temporary file
    and renamed into place, as an S3 PUT appears all at once."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalArtifactStore({self.root})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _key_uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def _list_keys(self, under: str, limit: int | None = None) -> list[str]:
        base = self._path(under.rstrip("/"))
        if not base.is_dir():
            return []
        keys: list[str] = []
        for dirpath, _dirnames, filenames in os.walk(base):
            for name in sorted(filenames):
                keys.append((Path(dirpath) / name).relative_to(self.root).as_posix())
                if limit and len(keys) >= limit:
                    return keys
        return sorted(keys)

    def _has_key(self, key: str) -> bool:
        return self._path(key).is_file()

    def _open_key(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(self._key_uri(key))
        return open(path, "rb")

    def _staging_file(self) -> Path:
        tmp = self.root / LOCAL_TMP_DIR
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp / uuid.uuid4().hex

    def _put_file(self, key: str, path: Path, entry: FileEntry) -> None:
        staged = self._staging_file()
        try:
            with open(path, "rb") as src, open(staged, "wb") as out:
                written = copy_hashing(src, out)
            # The same guarantee S3 gives with ChecksumSHA256: the stored bytes are the hashed ones.
            if written != entry:
                raise _changed_while_storing(path)
            target = self._path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
        finally:
            staged.unlink(missing_ok=True)

    def _put_manifest(self, key: str, body: bytes) -> None:
        staged = self._staging_file()
        try:
            staged.write_bytes(body)
            target = self._path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                # link() fails if the target exists: the local form of a conditional PUT.
                os.link(staged, target)
            except FileExistsError:
                raise ArtifactExistsError(
                    f"{self._key_uri(key)} was written by someone else during this upload; "
                    "artifacts are immutable: store the new version under a new prefix"
                ) from None
        finally:
            staged.unlink(missing_ok=True)

    def _delete_keys(self, keys: list[str]) -> None:
        parents: set[Path] = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            parents.update(p for p in path.parents if p != self.root and self.root in p.parents)
        # Empty directories are not objects; drop them, deepest first, as a bucket would show.
        for directory in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()


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


def _changed_while_storing(path: Path) -> ArtifactIntegrityError:
    return ArtifactIntegrityError(
        f"{path} changed while it was being stored (its bytes no longer match the sha256 taken "
        "moments before); nothing was committed. Store the artifact again once it is written."
    )


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable; keeps mypy sure of the return
