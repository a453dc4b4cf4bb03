"""The two artifact stores: S3 (AWS, SeaweedFS, MinIO, ...) and, only when asked, a local
directory; both built on `artifacts._ObjectStore`."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from recranker_core.errors import (
    ArtifactExistsError,
    RecrankerError,
)
from recranker_core.store.artifacts import (
    LOCAL_TMP_DIR,
    _changed_while_storing,
    _ObjectStore,
)
from recranker_core.store.manifest import (
    FileEntry,
    copy_hashing,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from recranker_core.stack import S3Config

# Below this a file goes up in one PutObject carrying its sha256, which the server checks against
# the bytes it receives; above it (PutObject's limit is 5 GiB) boto3's parallel multipart upload.
DEFAULT_MULTIPART_THRESHOLD = 512 * 1024 * 1024
# S3's DeleteObjects takes at most this many keys per call.
DELETE_BATCH = 1000


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


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))
