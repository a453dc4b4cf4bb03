"""Artifact stores against a real SeaweedFS (and the local directory store, which must behave the
same): round trips, damaged and missing objects, incomplete uploads, immutability, the verified
cache, and manifests from outside that try to leave the directory."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from recranker_core.errors import ArtifactIntegrityError
from recranker_core.store import (
    ArtifactExistsError,
    ArtifactNotFoundError,
    ArtifactStore,
    LocalArtifactStore,
    Manifest,
    S3ArtifactStore,
    fetch_cached,
)
from recranker_core.store.manifest import MANIFEST_NAME, FileEntry

BINARY = hashlib.sha256(b"seed").digest() * 8192 + bytes(range(256))  # 256 KiB + every byte
FILES = {
    "model.onnx": BINARY,
    "ids/items.json": b'["i1", "i2", "i3"]',
    "adapter/lora/adapter_model.bin": os.urandom(70_000),
    "adapter/lora/adapter_config.json": b'{"r": 8}',
    "dir with space/\u00fcnicode.txt": "h\u00e9llo".encode(),
    "empty": b"",
}


@dataclass
class Backend:
    """A store plus raw access to its objects, to damage them the way a bad disk or a stray
    script would."""

    store: ArtifactStore
    read: Callable[[str], bytes]
    write: Callable[[str, bytes], None]
    remove: Callable[[str], None]
    keys: Callable[[str], list[str]]
    uri_root: str


@pytest.fixture(params=["s3", "local"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "s3":
        from recranker_core.stack import s3_config

        cfg = s3_config(request.getfixturevalue("s3_settings"))
        client = cfg.client()

        def s3_keys(prefix: str) -> list[str]:
            response = client.list_objects_v2(Bucket=cfg.bucket, Prefix=prefix + "/")
            return sorted(o["Key"] for o in response.get("Contents", []))

        def s3_write(key: str, data: bytes) -> None:
            client.put_object(Bucket=cfg.bucket, Key=key, Body=data)

        def s3_remove(key: str) -> None:
            client.delete_object(Bucket=cfg.bucket, Key=key)

        return Backend(
            store=S3ArtifactStore(cfg),
            read=lambda k: client.get_object(Bucket=cfg.bucket, Key=k)["Body"].read(),
            write=s3_write,
            remove=s3_remove,
            keys=s3_keys,
            uri_root=f"s3://{cfg.bucket}/",
        )
    root = tmp_path / "store"

    def local_write(key: str, data: bytes) -> None:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)

    def local_keys(prefix: str) -> list[str]:
        base = root / prefix
        found = [p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file()]
        return sorted(found)

    return Backend(
        store=LocalArtifactStore(root),
        read=lambda k: (root / k).read_bytes(),
        write=local_write,
        remove=lambda k: (root / k).unlink(),
        keys=local_keys,
        uri_root=root.resolve().as_uri() + "/",
    )


def new_prefix() -> str:
    return f"tests/{uuid.uuid4().hex}/model-v1"


def make_dir(root: Path, files: dict[str, bytes] = FILES) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def siblings(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir()) if dest.parent.exists() else []


META: dict[str, Any] = {"kind": "lora", "backbone": "tiny-llama", "metrics": {"ndcg@10": 0.3}}


# ---------------------------------------------------------------------------------------------


def test_round_trip_nested_and_binary_files(backend: Backend, tmp_path: Path) -> None:
    prefix = new_prefix()
    src = make_dir(tmp_path / "src")

    stored = backend.store.put_directory(src, prefix, META)

    assert isinstance(backend.store, ArtifactStore)
    assert stored.prefix == prefix
    assert stored.uri == backend.store.uri(prefix) == backend.uri_root + prefix
    assert backend.store.exists(prefix)
    # Every file at <prefix>/<rel>, and the manifest beside them.
    assert backend.keys(prefix) == sorted(
        [f"{prefix}/{rel}" for rel in FILES] + [f"{prefix}/{MANIFEST_NAME}"]
    )
    assert backend.store.read_manifest(prefix) == stored.manifest
    assert stored.manifest.meta == META

    dest = tmp_path / "fetched" / "model"
    manifest = backend.store.get_directory(prefix, dest)

    assert manifest == stored.manifest
    got = tree(dest)
    assert got.pop(MANIFEST_NAME) == stored.manifest.to_json().encode()
    assert got == FILES
    assert siblings(dest) == ["model"]  # no temporary directory left beside it
    Manifest.load(dest).verify_directory(dest)


def test_prefix_slashes_are_normalised(backend: Backend, tmp_path: Path) -> None:
    prefix = new_prefix()
    backend.store.put_directory(make_dir(tmp_path / "src", {"a": b"1"}), f"/{prefix}/", {})
    assert backend.store.exists(prefix)
    assert backend.store.uri(f"{prefix}/") == backend.store.uri(prefix)


@pytest.mark.parametrize("bad", ["", "/", "../x", "a/../../x", "a//b", "./a", "a\\b"])
def test_prefixes_that_could_escape_are_refused(backend: Backend, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid artifact prefix"):
        backend.store.exists(bad)


def test_flipped_byte_is_caught_and_nothing_is_written(backend: Backend, tmp_path: Path) -> None:
    prefix = new_prefix()
    stored = backend.store.put_directory(make_dir(tmp_path / "src"), prefix, META)
    key = f"{prefix}/model.onnx"
    data = bytearray(backend.read(key))
    data[100_000] ^= 0x40
    backend.write(key, bytes(data))

    dest = tmp_path / "fetched" / "model"
    with pytest.raises(ArtifactIntegrityError) as caught:
        backend.store.get_directory(prefix, dest)

    message = str(caught.value)
    assert "model.onnx: checksum mismatch" in message
    assert stored.manifest.files["model.onnx"].sha256[:12] in message
    assert hashlib.sha256(bytes(data)).hexdigest()[:12] in message
    assert backend.store.uri(prefix) in message
    assert "1 problem)" in message  # the other files were fine
    assert not dest.exists()
    assert siblings(dest) == []


def test_missing_object_is_named(backend: Backend, tmp_path: Path) -> None:
    prefix = new_prefix()
    backend.store.put_directory(make_dir(tmp_path / "src"), prefix, META)
    backend.remove(f"{prefix}/adapter/lora/adapter_config.json")

    dest = tmp_path / "fetched"
    with pytest.raises(ArtifactIntegrityError, match=r"adapter/lora/adapter_config.json: missing"):
        backend.store.get_directory(prefix, dest)
    assert not dest.exists()


def test_prefix_without_manifest_is_an_incomplete_upload(backend: Backend, tmp_path: Path) -> None:
    prefix = new_prefix()
    backend.write(f"{prefix}/model.onnx", b"half of an upload")
    expected = f"incomplete upload: no manifest.json under {backend.store.uri(prefix)}"

    assert not backend.store.exists(prefix)
    with pytest.raises(ArtifactIntegrityError, match=expected):
        backend.store.read_manifest(prefix)
    with pytest.raises(ArtifactIntegrityError, match=expected):
        backend.store.get_directory(prefix, tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists()

    # Storing again replaces the leftovers entirely.
    backend.write(f"{prefix}/stale/extra.bin", b"not part of the new upload")
    backend.store.put_directory(make_dir(tmp_path / "src", {"model.onnx": b"whole"}), prefix, {})
    assert backend.keys(prefix) == [f"{prefix}/{MANIFEST_NAME}", f"{prefix}/model.onnx"]
    assert backend.read(f"{prefix}/model.onnx") == b"whole"


def test_nothing_stored_is_not_found(backend: Backend, tmp_path: Path) -> None:
    prefix = new_prefix()
    with pytest.raises(ArtifactNotFoundError, match="nothing is stored under this prefix"):
        backend.store.read_manifest(prefix)
    with pytest.raises(ArtifactNotFoundError):
        backend.store.get_directory(prefix, tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists()


def test_complete_artifacts_are_immutable(backend: Backend, tmp_path: Path) -> None:
    prefix = new_prefix()
    first = backend.store.put_directory(make_dir(tmp_path / "one", {"w": b"v1"}), prefix, {})

    with pytest.raises(ArtifactExistsError, match="already holds a complete artifact"):
        backend.store.put_directory(make_dir(tmp_path / "two", {"w": b"v2"}), prefix, {})

    assert backend.read(f"{prefix}/w") == b"v1"
    assert backend.store.read_manifest(prefix) == first.manifest


def test_artifacts_do_not_nest(backend: Backend, tmp_path: Path) -> None:
    prefix = new_prefix()
    src = make_dir(tmp_path / "src", {"w": b"1"})
    backend.store.put_directory(src, prefix, {})

    with pytest.raises(ArtifactExistsError, match="lies inside the artifact"):
        backend.store.put_directory(src, f"{prefix}/inner", {})
    parent = prefix.rsplit("/", 1)[0]
    with pytest.raises(ArtifactExistsError, match="artifacts cannot nest"):
        backend.store.put_directory(src, parent, {})
    with pytest.raises(ArtifactExistsError, match="is not an artifact but holds 1"):
        backend.store.delete(parent)
    assert backend.store.exists(prefix)


def test_delete_removes_everything_and_is_idempotent(backend: Backend, tmp_path: Path) -> None:
    prefix = new_prefix()
    backend.store.put_directory(make_dir(tmp_path / "src"), prefix, META)
    backend.store.delete(prefix)
    assert backend.keys(prefix) == []
    assert not backend.store.exists(prefix)
    backend.store.delete(prefix)


def test_get_directory_refuses_an_existing_destination(backend: Backend, tmp_path: Path) -> None:
    prefix = new_prefix()
    backend.store.put_directory(make_dir(tmp_path / "src", {"a": b"1"}), prefix, {})
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        backend.store.get_directory(prefix, dest)
    assert tree(dest) == {"mine": b"keep me"}


def test_bytes_that_differ_from_the_manifest_are_refused_on_upload(
    backend: Backend, tmp_path: Path
) -> None:
    # What happens when a file changes between hashing and sending: S3 checks the sha256 sent
    # with the PUT, the local store checks the bytes it copied.
    path = make_dir(tmp_path / "src", {"w": b"written later"}) / "w"
    claimed = FileEntry(hashlib.sha256(b"hashed first").hexdigest(), path.stat().st_size)
    with pytest.raises(ArtifactIntegrityError, match="changed while it was being stored"):
        backend.store._put_file(f"{new_prefix()}/w", path, claimed)  # type: ignore[attr-defined]


def test_manifest_paths_that_escape_are_refused(backend: Backend, tmp_path: Path) -> None:
    prefix = new_prefix()
    evil = tmp_path / "fetched" / "evil.txt"
    document = {
        "format_version": 1,
        "created_at": "2025-01-01T00:00:00+00:00",
        "meta": {},
        "files": {"../evil.txt": {"sha256": hashlib.sha256(b"x").hexdigest(), "size": 1}},
    }
    backend.write(f"{prefix}/evil.txt", b"x")
    backend.write(f"{prefix}/{MANIFEST_NAME}", json.dumps(document).encode())

    with pytest.raises(ArtifactIntegrityError, match=r"invalid manifest: path '\.\./evil\.txt'"):
        backend.store.read_manifest(prefix)
    with pytest.raises(ArtifactIntegrityError, match="invalid manifest"):
        backend.store.get_directory(prefix, tmp_path / "fetched" / "model")
    assert not evil.exists()
    assert not (tmp_path / "fetched" / "model").exists()


# --- the verified cache


def test_fetch_cached_reuses_a_valid_copy_and_replaces_a_tampered_one(
    backend: Backend, tmp_path: Path
) -> None:
    prefix = new_prefix()
    backend.store.put_directory(make_dir(tmp_path / "src"), prefix, META)
    cache = tmp_path / "cache"

    path = fetch_cached(backend.store, prefix, cache)
    assert path.parent == cache
    assert path.name.startswith(prefix.replace("/", "_"))
    assert {k: v for k, v in tree(path).items() if k != MANIFEST_NAME} == FILES

    # Tampered (same size, one byte): fetched again, and the good bytes are back.
    weights = path / "adapter" / "lora" / "adapter_model.bin"
    damaged = bytearray(weights.read_bytes())
    damaged[0] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    (path / "stray").write_text("x")
    assert fetch_cached(backend.store, prefix, cache) == path
    assert weights.read_bytes() == FILES["adapter/lora/adapter_model.bin"]
    assert not (path / "stray").exists()

    # With the store emptied, a valid cached copy is still served: no download happened.
    backend.store.delete(prefix)
    assert fetch_cached(backend.store, prefix, cache) == path
    assert tree(path)["model.onnx"] == BINARY

    # ... and once the copy is broken, the fetch has to go to the store (which is empty now).
    (path / "model.onnx").unlink()
    with pytest.raises(ArtifactNotFoundError):
        fetch_cached(backend.store, prefix, cache)
    assert not path.exists()


def test_fetch_cached_refetches_a_copy_without_its_manifest(
    backend: Backend, tmp_path: Path
) -> None:
    prefix = new_prefix()
    backend.store.put_directory(make_dir(tmp_path / "src", {"a": b"1"}), prefix, {})
    path = fetch_cached(backend.store, prefix, tmp_path / "cache")
    (path / MANIFEST_NAME).unlink()
    assert fetch_cached(backend.store, prefix, tmp_path / "cache") == path
    assert (path / MANIFEST_NAME).is_file()


def test_concurrent_fetches_share_one_verified_copy(backend: Backend, tmp_path: Path) -> None:
    prefix = new_prefix()
    backend.store.put_directory(make_dir(tmp_path / "src"), prefix, META)
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda _: fetch_cached(backend.store, prefix, cache), range(8)))
    assert len(set(paths)) == 1
    Manifest.load(paths[0]).verify_directory(paths[0])
    assert sorted(p.name for p in cache.iterdir()) == [paths[0].name]  # no partial left


def test_cache_entries_of_similar_prefixes_do_not_collide(backend: Backend, tmp_path: Path) -> None:
    base = new_prefix()
    one, two = f"{base}/a/b", f"{base}/a_b"
    backend.store.put_directory(make_dir(tmp_path / "one", {"x": b"1"}), one, {})
    backend.store.put_directory(make_dir(tmp_path / "two", {"x": b"2"}), two, {})
    path_one = fetch_cached(backend.store, one, tmp_path / "cache")
    path_two = fetch_cached(backend.store, two, tmp_path / "cache")
    assert path_one != path_two
    assert (path_one / "x").read_bytes() == b"1" and (path_two / "x").read_bytes() == b"2"


# --- S3 only


@pytest.fixture()
def s3_store(s3_settings: Any) -> S3ArtifactStore:
    from recranker_core.stack import s3_config

    return S3ArtifactStore(s3_config(s3_settings))


def test_s3_objects_carry_their_sha256_as_metadata(
    s3_store: S3ArtifactStore, tmp_path: Path
) -> None:
    prefix = new_prefix()
    stored = s3_store.put_directory(make_dir(tmp_path / "src"), prefix, META)
    client = s3_store.s3.client()
    for rel, entry in stored.manifest.files.items():
        head = client.head_object(Bucket=s3_store.s3.bucket, Key=f"{prefix}/{rel}")
        assert head["Metadata"] == {"sha256": entry.sha256}
        assert head["ContentLength"] == entry.size
    head = client.head_object(Bucket=s3_store.s3.bucket, Key=f"{prefix}/{MANIFEST_NAME}")
    assert head["ContentType"] == "application/json"


def test_s3_large_files_go_up_in_parts(s3_settings: Any, tmp_path: Path) -> None:
    from recranker_core.stack import s3_config

    store = S3ArtifactStore(s3_config(s3_settings), multipart_threshold=5 * 1024 * 1024)
    big = os.urandom(11 * 1024 * 1024)
    prefix = new_prefix()
    stored = store.put_directory(make_dir(tmp_path / "src", {"big.bin": big, "s": b"1"}), prefix)
    head = store.s3.client().head_object(Bucket=store.s3.bucket, Key=f"{prefix}/big.bin")
    assert "-" in head["ETag"]  # a multipart ETag: "<md5 of part md5s>-<parts>"
    assert head["Metadata"] == {"sha256": stored.manifest.files["big.bin"].sha256}
    dest = tmp_path / "fetched"
    store.get_directory(prefix, dest)
    assert (dest / "big.bin").read_bytes() == big


def test_s3_credentials_never_reach_the_log(
    s3_store: S3ArtifactStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = new_prefix()
    with caplog.at_level("DEBUG", logger="recranker_core.store"):
        s3_store.put_directory(make_dir(tmp_path / "src"), prefix, META)
        fetch_cached(s3_store, prefix, tmp_path / "cache")
        fetch_cached(s3_store, prefix, tmp_path / "cache")
    text = caplog.text
    assert "stored artifact" in text and "fetched artifact" in text and "using cached" in text
    assert s3_store.s3.secret_key not in text and s3_store.s3.access_key not in text
    assert s3_store.s3.secret_key not in repr(s3_store)
