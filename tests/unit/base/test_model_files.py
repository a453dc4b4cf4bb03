"""Model files in artifacts: every kind round-trips through safetensors + JSON; an artifact of an
older version (torch.save) still loads with weights_only=True; a pickle that would run code is
refused without running it."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from recranker_core.base.models import MODELS, read_state, write_state
from recranker_core.errors import ArtifactIntegrityError

HPARAMS = {
    "mostpop": {"n_users": 5, "n_items": 7},
    "mf": {"n_users": 5, "n_items": 7, "dim": 4},
    "lightgcn": {"n_users": 5, "n_items": 7, "dim": 4, "layers": 2},
    "sasrec": {"n_users": 5, "n_items": 7, "dim": 8, "max_len": 6, "layers": 1, "heads": 2},
    "biasedmf": {"n_users": 5, "n_items": 7, "dim": 4, "global_mean": 3.25},
}


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind", sorted(HPARAMS))
def test_every_kind_round_trips_without_pickle(kind: str, tmp_path: Path) -> None:
    assert set(HPARAMS) == set(MODELS)
    torch.manual_seed(0)
    model = MODELS[kind](**HPARAMS[kind])
    written = write_state(model, tmp_path, "model")
    assert sorted(p.name for p in written) == ["model.json", "model.safetensors"]
    header = json.loads((tmp_path / "model.json").read_text())
    assert header == {"format": 1, "kind": kind, "hparams": model.hparams}
    loaded = read_state(tmp_path, "model")
    assert type(loaded) is type(model) and loaded.hparams == model.hparams
    assert _same(loaded, model)  # type: ignore[arg-type]


def test_an_older_artifact_loads_with_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = MODELS["biasedmf"](**HPARAMS["biasedmf"])
    torch.save(model.state(), tmp_path / "hint_regressor.pt")  # what older versions wrote
    loaded = read_state(tmp_path, "hint_regressor")
    assert _same(loaded, model)  # type: ignore[arg-type]


class _Planted:
    """What an attacker pickles: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    state = {"kind": "mf", "hparams": {"n_users": 1, "n_items": 1}, "state_dict": {}}
    torch.save({**state, "payload": _Planted(marker)}, artifact / "model.pt")
    # The same payload as a raw pickle (not torch's zip format).
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "model.pt").write_bytes(pickle.dumps(_Planted(marker)))
    for directory in (artifact, raw):
        with pytest.raises(ArtifactIntegrityError, match="never unpickles.*train it again"):
            read_state(directory, "model")
    assert not marker.exists()


def test_broken_or_foreign_model_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactIntegrityError, match="no model.safetensors"):
        read_state(tmp_path, "model")
    model = MODELS["mf"](**HPARAMS["mf"])
    write_state(model, tmp_path, "model")
    (tmp_path / "model.json").write_text(json.dumps({"format": 1, "kind": "nope", "hparams": {}}))
    with pytest.raises(ArtifactIntegrityError, match="cannot be rebuilt"):
        read_state(tmp_path, "model")
    (tmp_path / "model.json").write_text(
        json.dumps({"format": 1, "kind": "mf", "hparams": {"n_users": [1]}})
    )
    with pytest.raises(ArtifactIntegrityError, match="do not describe a model"):
        read_state(tmp_path, "model")
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ArtifactIntegrityError, match="cannot read"):
        read_state(tmp_path, "model")
