"""The registry is the trust anchor for artifacts (issue 16, item 1), tried as an attacker who can
write to the bucket, against real PostgreSQL, SeaweedFS and an MF champion trained by the
retrain-base flow: a planted pickle with a rewritten manifest never runs; a tampered cache is
never used; damage in the bucket is reported even while a valid cache serves; registered paths
that could leave the artifact, and files of kinds recranker does not load, are refused; object
keys with `..` or backslashes are refused by ingest; `recranker rank` on a damaged champion
prints one line and exits 3."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from recranker_core.errors import ArtifactIntegrityError, DataError
from recranker_core.store.manifest import MANIFEST_NAME, FileEntry, Manifest


class Planted:
    """The attacker's payload: unpickling it runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _planted_pickle(marker: Path) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save({"kind": "mf", "payload": Planted(marker)}, buffer)
    return buffer.getvalue()


def _rewrite(cfg: Any, prefix: str, put: dict[str, bytes], remove: tuple[str, ...] = ()) -> None:
    """Change files of a stored artifact and rewrite its manifest to match them, as an attacker
    with write access to the bucket would."""
    client = cfg.client()
    key = f"{prefix}/{MANIFEST_NAME}"
    manifest = Manifest.from_json(client.get_object(Bucket=cfg.bucket, Key=key)["Body"].read())
    files = {rel: e for rel, e in manifest.files.items() if rel not in remove}
    for rel in remove:
        client.delete_object(Bucket=cfg.bucket, Key=f"{prefix}/{rel}")
    for rel, body in put.items():
        client.put_object(Bucket=cfg.bucket, Key=f"{prefix}/{rel}", Body=body)
        files[rel] = FileEntry(hashlib.sha256(body).hexdigest(), len(body))
    forged = Manifest(files=files, meta=manifest.meta, created_at=manifest.created_at)
    client.put_object(Bucket=cfg.bucket, Key=key, Body=forged.to_json().encode())


@pytest.fixture()
def champion(tiny_pipeline: dict[str, object]) -> dict[str, Any]:
    from recranker_core import registry
    from recranker_core.config import load_settings
    from recranker_core.stack import s3_config
    from tasks.common import store_for

    url = str(tiny_pipeline["database_url"])
    settings = load_settings()
    record = registry.champion(url)
    assert record is not None
    return {
        "url": url,
        "settings": settings,
        "record": record,
        "prefix": record.lineage["prefix"],
        "cfg": s3_config(settings),
        "store": store_for(settings),
    }


def test_a_planted_pickle_with_a_rewritten_manifest_never_runs(
    champion: dict[str, Any], tmp_path: Path
) -> None:
    from recranker_core.base.candidates import load_champion
    from recranker_core.tune_ranker.context import load_base_context

    url, store, cache = champion["url"], champion["store"], tmp_path / "cache"
    record = champion["record"]
    assert {"model.json", "model.safetensors", "model.onnx"} <= set(record.files)
    assert not [f for f in record.files if f.endswith((".pt", ".bin", ".pkl"))]
    assert load_base_context(url, store, cache, 4.0).model_id == record.model_id  # it loads

    marker = tmp_path / "marker"
    _rewrite(
        champion["cfg"],
        champion["prefix"],
        {"model.pt": _planted_pickle(marker)},
        remove=("model.safetensors", "model.json"),
    )
    # The store's own check passes (the manifest was rewritten with the files) ...
    store.get_directory(champion["prefix"], tmp_path / "unanchored")
    assert (tmp_path / "unanchored" / "model.pt").is_file()
    # ... the registry's does not: refused before anything is downloaded or unpickled.
    for loader in (
        lambda: load_base_context(url, store, tmp_path / "fresh", 4.0),
        lambda: load_champion(url, store, tmp_path / "fresh"),
    ):
        with pytest.raises(ArtifactIntegrityError) as refused:
            loader()
        message = str(refused.value)
        assert "disagrees with the registry" in message
        assert f"model {record.model_id} (mf) in recranker.models" in message
        assert "model.pt: in the manifest, not registered" in message
        assert "model.safetensors: registered, missing from the manifest" in message
        assert "nothing of it was downloaded" in message
    assert not (tmp_path / "fresh").exists() or not any((tmp_path / "fresh").iterdir())
    assert not marker.exists()

    # A machine that fetched the artifact before the attack keeps serving its verified copy.
    assert load_base_context(url, store, cache, 4.0).model_id == record.model_id
    assert not marker.exists()


def test_the_rankers_rating_model_from_the_champion_refuses_a_planted_pickle(
    champion: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ranker's path (batch_rank.serving.load_ranker): the tuned adapter loads, and the rating
    model of its pointwise hint is the one the retrain stored with the champion (safetensors,
    listed in the champion's registry row), not a copy in the adapter; the same attack on the
    champion's rating-model files is refused before anything runs."""
    from flows.tune_ranker import tune_ranker_flow
    from recranker_core import registry
    from recranker_core.batch_rank.serving import load_ranker

    url, store, record = champion["url"], champion["store"], champion["record"]
    assert {"rating_model.json", "rating_model.safetensors"} <= set(record.files)
    summary = tune_ranker_flow(max_steps=1)
    if not summary["promoted"]:  # a gate on a tiny random backbone decides by chance
        registry.promote_adapter(url, int(summary["adapter_id"]), "promoted by the test")
    adapter = registry.champion_adapter(url)
    assert adapter is not None
    assert "adapter_model.safetensors" in adapter.files
    assert not [f for f in adapter.files if f.startswith("hint_regressor")]
    settings = champion["settings"].model_copy(update={"home": tmp_path / "home"})
    ranker = load_ranker(url, store, settings)
    assert ranker is not None and ranker.adapter.adapter_id == adapter.adapter_id
    assert type(ranker.rating.model).__name__ == "BiasedMF"
    assert ranker.rating.source["model_id"] == record.model_id
    assert ranker.rating.source["sha256"] == record.files["rating_model.safetensors"]
    # Served in another dtype than it was tuned (and guarded) in: said, not refused.
    assert adapter.lineage["dtype"] == "float32"
    in_bf16 = settings.model_copy(
        update={"backbone": settings.backbone.model_copy(update={"dtype": "bfloat16"})}
    )
    with caplog.at_level("WARNING", logger="recranker_core.batch_rank.serving"):
        assert load_ranker(url, store, in_bf16) is not None
    assert "tuned and guarded in float32 and is scored here in bfloat16" in caplog.text

    marker = tmp_path / "marker"
    _rewrite(
        champion["cfg"],
        champion["prefix"],
        {"rating_model.pt": _planted_pickle(marker)},
        remove=("rating_model.safetensors", "rating_model.json"),
    )
    fresh = settings.model_copy(update={"home": tmp_path / "fresh-home"})
    with pytest.raises(ArtifactIntegrityError) as refused:
        load_ranker(url, store, fresh)
    assert f"model {record.model_id} (mf) in recranker.models" in str(refused.value)
    assert "rating_model.pt: in the manifest, not registered" in str(refused.value)
    assert "rating_model.safetensors: registered, missing from the manifest" in str(refused.value)
    assert not marker.exists()


def test_an_older_pickled_artifact_loads_with_weights_only_and_a_code_pickle_is_refused(
    champion: dict[str, Any], tmp_path: Path
) -> None:
    """Artifacts written before safetensors hold `model.pt`: it still loads, read with
    weights_only=True. Were the registry itself to vouch for a pickle that runs code (the
    database is the anchor, so this takes more than the bucket), it is refused all the same."""
    import torch

    from recranker_core import registry
    from recranker_core.base.candidates import fetch_model
    from recranker_core.base.models import read_state
    from recranker_core.tune_ranker.context import load_base_context

    url, store, record = champion["url"], champion["store"], champion["record"]
    current = fetch_model(record, store, tmp_path / "cache")
    marker = tmp_path / "marker"

    def register_legacy(model_pt: bytes) -> int:
        legacy = tmp_path / f"legacy-{len(model_pt)}"
        shutil.copytree(current, legacy, ignore=shutil.ignore_patterns(MANIFEST_NAME, "model.*"))
        shutil.copy(current / "model.onnx", legacy / "model.onnx")
        (legacy / "model.pt").write_bytes(model_pt)
        stored = store.put_directory(legacy, f"{champion['prefix']}-legacy-{len(model_pt)}")
        model_id = registry.register_model(
            url,
            kind="mf",
            hyperparameters=record.hyperparameters,
            metrics=record.metrics,
            data_watermark=record.data_watermark,
            artifact_uri=stored.uri,
            files={rel: e.sha256 for rel, e in stored.manifest.files.items()},
            lineage={**record.lineage, "prefix": stored.prefix},
        )
        registry.promote(url, model_id, "test: an artifact of an older version")
        return model_id

    import io

    buffer = io.BytesIO()
    torch.save(read_state(current, "model").state(), buffer)  # what older versions wrote
    older = register_legacy(buffer.getvalue())
    context = load_base_context(url, store, tmp_path / "cache", 4.0)
    assert context.model_id == older
    assert torch.equal(
        context.model.state_dict()["user_emb.weight"],
        read_state(current, "model").state_dict()["user_emb.weight"],  # type: ignore[attr-defined]
    )

    register_legacy(_planted_pickle(marker))
    with pytest.raises(ArtifactIntegrityError, match="never unpickles.*train it again"):
        load_base_context(url, store, tmp_path / "cache", 4.0)
    assert not marker.exists()


def test_a_tampered_cache_is_fetched_again_and_damage_in_the_store_is_reported(
    champion: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from recranker_core.base.candidates import load_champion

    url, store, cfg = champion["url"], champion["store"], champion["cfg"]
    cache = tmp_path / "cache"
    loaded = load_champion(url, store, cache)
    directory = loaded.directory
    original = (directory / "model.onnx").read_bytes()

    # The cached file and the cached manifest changed together: the cache agrees with itself,
    # not with the registry. It is fetched again, and the registered bytes are what is used.
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    (directory / "model.onnx").write_bytes(bytes(damaged))
    forged = Manifest.for_directory(directory, Manifest.load(directory).meta)
    (directory / MANIFEST_NAME).write_text(forged.to_json())
    with caplog.at_level(logging.WARNING, logger="recranker_core.store"):
        again = load_champion(url, store, cache)
    assert "cached copy" in caplog.text and "disagrees with the registry" in caplog.text
    assert again.directory == directory
    assert (directory / "model.onnx").read_bytes() == original

    # Damage in the bucket, while this machine's cache is valid: served from the cache, and said.
    _rewrite(cfg, champion["prefix"], {"model.onnx": bytes(damaged)})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="recranker_core.store"):
        served = load_champion(url, store, cache)
    assert (served.directory / "model.onnx").read_bytes() == original
    reported = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert reported and "disagrees with the registry" in reported[0].getMessage()
    assert "model.onnx: sha256" in reported[0].getMessage()

    # Without the cache, the damaged copy is refused.
    with pytest.raises(ArtifactIntegrityError, match="model.onnx: sha256"):
        load_champion(url, store, tmp_path / "other-cache")


def test_rank_on_a_damaged_champion_prints_one_line_and_exits_3(
    champion: dict[str, Any], prefect_api: str
) -> None:
    from recranker_core.batch_rank.serving import cache_root

    _rewrite(champion["cfg"], champion["prefix"], {"model.onnx": b"not an onnx model"})
    shutil.rmtree(cache_root(champion["settings"]), ignore_errors=True)
    done = subprocess.run(
        [sys.executable, "-m", "flows", "rank"],
        env={**os.environ, "PREFECT_API_URL": prefect_api},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "disagrees with the registry" in errors[0] and "model.onnx" in errors[0]
    assert "recranker train-base" in errors[0]


def test_registered_paths_that_leave_the_artifact_or_cannot_be_loaded_safely_are_refused(
    s3_settings: Any, tmp_path: Path
) -> None:
    from recranker_core.stack import s3_config
    from recranker_core.store import S3ArtifactStore, fetch_registered

    store = S3ArtifactStore(s3_config(s3_settings))
    digest = "0" * 64
    for files, why in (
        ({"../outside.json": digest}, "'..' component"),
        ({"/etc/passwd.json": digest}, "absolute"),
        ({"a\\..\\b.json": digest}, "backslash"),
        ({"model.pkl": digest}, "not a kind of file recranker loads"),
        ({"adapter_model.bin": digest}, "not a kind of file recranker loads"),
        ({"model.json": "not-a-digest"}, "not a sha256 digest"),
        ({}, "no file digests"),
    ):
        with pytest.raises(ArtifactIntegrityError, match=why):
            fetch_registered(store, "models/x/never-fetched", tmp_path / "cache", files, "model 9")
    assert not (tmp_path / "cache").exists()


def test_ingest_refuses_object_keys_that_would_leave_its_cache(
    s3_settings: Any, tmp_path: Path
) -> None:
    """SeaweedFS itself refuses keys with `.` or `..` components (InvalidRequest) and folds
    backslashes into slashes, so it cannot list such a key; AWS S3 and others store keys as
    given. The listing a permissive server returns is therefore passed to `cache_paths`, the
    step between the listing and the downloads, directly."""
    from botocore.exceptions import ClientError

    from recranker_core.datasets.sources import cache_paths, discover
    from recranker_core.stack import s3_config

    cfg = s3_config(s3_settings)
    client = cfg.client()
    with pytest.raises(ClientError, match="InvalidRequest"):
        client.put_object(Bucket=cfg.bucket, Key="inbox/../../escaped.csv", Body=b"x")

    cache = tmp_path / "cache"
    target = f"s3://{cfg.bucket}/inbox/"
    for evil in (
        "inbox/../../escaped.csv",
        "inbox/sub/../../../escaped.csv",
        "inbox/..\\..\\escaped.csv",
        "/etc/escaped.csv",
        "inbox/./escaped.csv",
    ):
        with pytest.raises(DataError, match="refusing object key.*nothing was downloaded"):
            cache_paths(target, cfg.bucket, ["inbox/day.csv", evil], cache)
    with pytest.raises(DataError, match="invalid bucket name"):
        cache_paths("s3://../inbox/", "..", ["inbox/day.csv"], cache)
    assert cache_paths(target, cfg.bucket, ["inbox/", "inbox/day.csv"], cache) == {
        "inbox/day.csv": cache / cfg.bucket / "inbox" / "day.csv"
    }

    # The real path end to end: a plain source downloads under the cache and nowhere else.
    body = b"user_id,item_id,rating,timestamp\nu1,i1,4,1000000000\n"
    client.put_object(Bucket=cfg.bucket, Key="inbox-ok/day.csv", Body=body)
    found = discover(f"s3://{cfg.bucket}/inbox-ok/", None, cache, cfg)
    assert [f.path for f in found] == [cache / cfg.bucket / "inbox-ok" / "day.csv"]
    assert not list(tmp_path.rglob("escaped.csv"))
