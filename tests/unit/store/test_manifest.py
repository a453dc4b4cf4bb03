"""Manifest: built from a directory, deterministic JSON, every kind of mismatch named, and manifests
from outside refused when their paths would leave the directory."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from recranker_core.errors import ArtifactIntegrityError, DataError
from recranker_core.store.manifest import MANIFEST_NAME, FileEntry, Manifest

CREATED = "2025-01-02T03:04:05+00:00"
BLOB = bytes(range(256)) * 64 + b"\x00\xff"


def make_tree(root: Path, order: list[str] | None = None) -> Path:
    files = {
        "model.onnx": BLOB,
        "ids/items.json": b'["i1", "i2"]',
        "ids/users.json": b'["u1"]',
        "adapter/deep/weights.bin": b"\x01\x02\x03" * 1000,
        "empty.txt": b"",
        ".hidden": b"dot files are files too",
    }
    for rel in order or list(files):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[rel])
    return root


def test_for_directory_hashes_every_file_sorted(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    (root / "ids" / MANIFEST_NAME).write_text("a nested manifest.json is just a file")
    (root / MANIFEST_NAME).write_text("the top-level one is the artifact's own and is left out")

    manifest = Manifest.for_directory(root, {"kind": "onnx"}, created_at=CREATED)

    assert list(manifest.files) == sorted(manifest.files)
    assert set(manifest.files) == {
        ".hidden",
        "adapter/deep/weights.bin",
        "empty.txt",
        "ids/items.json",
        f"ids/{MANIFEST_NAME}",
        "ids/users.json",
        "model.onnx",
    }
    assert manifest.files["model.onnx"] == FileEntry(hashlib.sha256(BLOB).hexdigest(), len(BLOB))
    assert manifest.files["empty.txt"] == FileEntry(hashlib.sha256(b"").hexdigest(), 0)
    assert manifest.total_size == sum((root / rel).stat().st_size for rel in manifest.files)
    assert manifest.meta == {"kind": "onnx"}
    assert manifest.format_version == 1


def test_json_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    names = ["model.onnx", "ids/items.json", "ids/users.json", "adapter/deep/weights.bin"]
    names += ["empty.txt", ".hidden"]
    first = make_tree(tmp_path / "first", names)
    second = make_tree(tmp_path / "second", list(reversed(names)))
    meta = {"metrics": {"ndcg@10": 0.31, "hr@10": 0.52}, "kind": "lora", "layers": (1, 2)}

    one = Manifest.for_directory(first, meta, created_at=CREATED)
    two = Manifest.for_directory(second, dict(reversed(list(meta.items()))), created_at=CREATED)

    assert one.to_json() == two.to_json()
    text = one.to_json()
    document = json.loads(text)
    assert list(document) == sorted(document)
    assert list(document["files"]) == sorted(document["files"])
    assert list(document["meta"]["metrics"]) == ["hr@10", "ndcg@10"]
    assert Manifest.from_json(text) == one
    assert Manifest.from_json(text.encode()).to_json() == text
    # Tuples are stored as lists up front, so a manifest equals its own round trip.
    assert one.meta["layers"] == [1, 2]


def test_created_at_is_utc_iso(tmp_path: Path) -> None:
    manifest = Manifest.for_directory(make_tree(tmp_path / "a"))
    assert manifest.created_at.endswith("+00:00")


@pytest.mark.parametrize("meta", [{"x": float("nan")}, {"x": object()}, {"x": {1, 2}}])
def test_meta_must_be_plain_json(tmp_path: Path, meta: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="plain JSON"):
        Manifest.for_directory(make_tree(tmp_path / "a"), meta)


def test_verify_accepts_the_same_tree(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    manifest = Manifest.for_directory(root)
    (root / MANIFEST_NAME).write_text(manifest.to_json())  # a fetched copy carries it
    manifest.verify_directory(root)
    assert Manifest.load(root) == manifest


def test_verify_names_a_flipped_byte_with_both_digests(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    manifest = Manifest.for_directory(root)
    target = root / "adapter" / "deep" / "weights.bin"
    data = bytearray(target.read_bytes())
    data[1234] ^= 0x01
    target.write_bytes(bytes(data))

    with pytest.raises(ArtifactIntegrityError) as caught:
        manifest.verify_directory(root)

    message = str(caught.value)
    expected = manifest.files["adapter/deep/weights.bin"].sha256
    actual = hashlib.sha256(bytes(data)).hexdigest()
    assert "adapter/deep/weights.bin: checksum mismatch" in message
    assert expected[:12] in message and actual[:12] in message
    assert str(root) in message and "1 problem)" in message


def test_verify_names_missing_extra_and_resized_files(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "a")
    manifest = Manifest.for_directory(root)
    (root / "ids" / "users.json").unlink()
    (root / "ids" / "stray.tmp").write_text("left behind")
    with (root / "model.onnx").open("ab") as fh:
        fh.write(b"tail")

    with pytest.raises(ArtifactIntegrityError) as caught:
        manifest.verify_directory(root)

    message = str(caught.value)
    assert "ids/users.json: missing" in message
    assert "ids/stray.tmp: unexpected file, not in the manifest" in message
    assert f"model.onnx: size mismatch (expected {len(BLOB)} bytes, found {len(BLOB) + 4})" in (
        message
    )
    assert "3 problems" in message


def test_verify_of_a_missing_directory(tmp_path: Path) -> None:
    manifest = Manifest.for_directory(make_tree(tmp_path / "a"))
    with pytest.raises(ArtifactIntegrityError, match="no such directory"):
        manifest.verify_directory(tmp_path / "nowhere")


def test_many_problems_are_counted_not_all_listed(tmp_path: Path) -> None:
    root = tmp_path / "a"
    root.mkdir()
    for i in range(25):
        (root / f"f{i:02d}").write_text(str(i))
    manifest = Manifest.for_directory(root)
    for i in range(25):
        (root / f"f{i:02d}").unlink()
    with pytest.raises(ArtifactIntegrityError, match=r"25 problems.*and 15 more"):
        manifest.verify_directory(root)


def test_file_symlinks_are_read_as_their_targets_and_dir_symlinks_refused(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "abc").write_bytes(BLOB)
    root = tmp_path / "snapshot"
    root.mkdir()
    (root / "model.safetensors").symlink_to(blobs / "abc")
    manifest = Manifest.for_directory(root)
    assert manifest.files["model.safetensors"].sha256 == hashlib.sha256(BLOB).hexdigest()

    (root / "more").symlink_to(blobs, target_is_directory=True)
    with pytest.raises(DataError, match="more: a symlinked directory"):
        Manifest.for_directory(root)


def test_for_directory_refuses_what_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        Manifest.for_directory(tmp_path / "file")


def test_for_directory_refuses_names_a_manifest_could_not_hold(tmp_path: Path) -> None:
    root = tmp_path / "a"
    root.mkdir()
    (root / "back\\slash").write_text("x")
    with pytest.raises(DataError, match="backslash"):
        Manifest.for_directory(root)


def _manifest_with_path(rel: str) -> str:
    return json.dumps(
        {
            "format_version": 1,
            "created_at": CREATED,
            "meta": {},
            "files": {rel: {"sha256": "0" * 64, "size": 1}},
        }
    )


@pytest.mark.parametrize(
    "rel",
    [
        "../outside",
        "a/../../outside",
        "a/..",
        "/etc/passwd",
        "./a",
        "a//b",
        "a/",
        "",
        "a\\..\\b",
        "nul\x00byte",
        MANIFEST_NAME,
    ],
)
def test_from_json_refuses_paths_that_escape(rel: str) -> None:
    with pytest.raises(ArtifactIntegrityError, match=r"s3://b/p/manifest.json: invalid manifest"):
        Manifest.from_json(_manifest_with_path(rel), source="s3://b/p/manifest.json")


@pytest.mark.parametrize(
    ("document", "what"),
    [
        ("not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ("[]", "not a JSON object"),
        ('{"format_version": "1"}', "format_version must be a positive integer"),
        ('{"format_version": true}', "format_version must be a positive integer"),
        ('{"format_version": 1, "created_at": 5}', "created_at must be a string"),
        ('{"format_version": 1, "created_at": "x", "meta": []}', "meta must be a JSON object"),
        ('{"format_version": 1, "created_at": "x", "meta": {}}', "files must be a JSON object"),
    ],
)
def test_from_json_refuses_malformed_documents(document: str | bytes, what: str) -> None:
    with pytest.raises(ArtifactIntegrityError, match=what):
        Manifest.from_json(document)


@pytest.mark.parametrize(
    ("entry", "what"),
    [
        ({"sha256": "ABC", "size": 1}, "sha256 must be 64 lowercase hex"),
        ({"sha256": "A" * 64, "size": 1}, "sha256 must be 64 lowercase hex"),
        ({"sha256": "0" * 64, "size": -1}, "size must be a non-negative integer"),
        ({"sha256": "0" * 64, "size": True}, "size must be a non-negative integer"),
        ({"sha256": "0" * 64, "size": 1.5}, "size must be a non-negative integer"),
        ("0" * 64, "entry must be an object"),
    ],
)
def test_from_json_refuses_bad_entries(entry: object, what: str) -> None:
    document = {"format_version": 1, "created_at": CREATED, "meta": {}, "files": {"a": entry}}
    with pytest.raises(ArtifactIntegrityError, match=what):
        Manifest.from_json(json.dumps(document))


def test_from_json_refuses_a_path_that_is_file_and_directory() -> None:
    entry = {"sha256": "0" * 64, "size": 1}
    document = {
        "format_version": 1,
        "created_at": CREATED,
        "meta": {},
        "files": {"a": entry, "a/b": entry},
    }
    with pytest.raises(ArtifactIntegrityError, match="'a' is listed both as a file and as a dir"):
        Manifest.from_json(json.dumps(document))


def test_from_json_says_when_a_newer_recranker_wrote_it() -> None:
    document = {"format_version": 2, "created_at": CREATED, "meta": {}, "files": {}}
    with pytest.raises(ArtifactIntegrityError, match="newer recranker"):
        Manifest.from_json(json.dumps(document))
