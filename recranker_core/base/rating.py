"""The rating model behind the pointwise hint (a biased MF on the split's train-period ratings):
trained once by the base retrain and stored with every model of that run, reused by tuning, and
resolved for an adapter (the one it was tuned with) at serving and evaluation."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from recranker_core.errors import ArtifactIntegrityError

if TYPE_CHECKING:
    from recranker_core.base.split import SplitData
    from recranker_core.base.train import TrainResult
    from recranker_core.config import BaseTrainSettings
    from recranker_core.registry import AdapterRecord, ModelRecord
    from recranker_core.store import ArtifactStore

log = logging.getLogger(__name__)

# In a base model's artifact (written by the retrain beside model.*).
RATING_STEM = "rating_model"
RATING_WEIGHTS = f"{RATING_STEM}.safetensors"
RATING_FILES = (f"{RATING_STEM}.json", RATING_WEIGHTS)
# In an adapter's artifact: the rating model its own tuning run trained (adapters tuned before the
# retrain stored one, or on a champion stored without one).
ADAPTER_STEM = "hint_regressor"


def train_rating_model(data: SplitData, settings: BaseTrainSettings) -> TrainResult:
    """Fit the rating model on `data`'s train-period ratings (no full-ranking evaluation: only
    its predictions are used); `metrics["valid"]["rmse"]` is its held-out RMSE."""
    from recranker_core.base.train import train_model

    result = train_model("biasedmf", data, settings, rank_evaluation=False)
    log.info(
        "rating model (biasedmf) for the pointwise hint: held-out RMSE %.4f, best epoch %d, %.1f s",
        result.metrics["valid"].get("rmse", float("nan")),
        result.best_epoch,
        result.seconds,
    )
    return result


def rating_lineage(result: TrainResult) -> dict[str, Any]:
    """What a base model's lineage says of the rating model stored with it."""
    return {
        "kind": result.kind,
        "files": list(RATING_FILES),
        "rmse": result.metrics["valid"].get("rmse"),
        "best_epoch": result.best_epoch,
        "seconds": round(result.seconds, 2),
        "hyperparameters": result.hyperparameters,
    }


def stored_rating_model(record: ModelRecord) -> dict[str, Any] | None:
    """The reference to the rating model stored with registered base model `record`: its model
    id and the registered sha256 of the weights (what an adapter's lineage records). None for a
    model stored without one (trained before the retrain stored it, or its fit failed)."""
    if not all(name in record.files for name in RATING_FILES):
        return None
    info = record.lineage.get("rating_model") or {}
    return {
        "source": "base_model",
        "model_id": record.model_id,
        "file": RATING_WEIGHTS,
        "sha256": record.files[RATING_WEIGHTS],
        "rmse": info.get("rmse"),
    }


@dataclass
class RatingModel:
    """A loaded rating model with the ids it indexes (those of the split it was fitted on) and
    where it came from (`source`: the base model and digest, or the adapter that carries it)."""

    model: Any  # BiasedMF
    user_index: dict[str, int]
    item_index: dict[str, int]
    source: dict[str, Any]

    @property
    def mean(self) -> float:
        """The prediction for a user or item the model never saw."""
        return float(self.model.hparams.get("global_mean", 3.0))

    def describe(self) -> str:
        if "model_id" in self.source:
            return (
                f"base model {self.source['model_id']}'s rating model (sha256 "
                f"{str(self.source.get('sha256', ''))[:12]})"
            )
        return f"adapter {self.source.get('adapter_id')}'s own rating model"


def read_rating_model(directory: Path, stem: str, source: dict[str, Any]) -> RatingModel:
    """The rating model `stem` in a verified artifact directory (safetensors, or an older
    artifact's .pt read with weights_only), with the directory's id maps."""
    from recranker_core.base.models import read_state

    model = read_state(directory, stem)
    users = json.loads((directory / "user_ids.json").read_text())
    items = json.loads((directory / "item_ids.json").read_text())
    return RatingModel(
        model,
        {u: n for n, u in enumerate(users)},
        {i: n for n, i in enumerate(items)},
        source,
    )


class RatingHints:
    """`rating`'s predictions for the users and items of `data` (indices of `data`, mapped to
    the rating model's own through the ids): the pointwise hint's predicted ratings."""

    def __init__(self, rating: RatingModel, data: SplitData) -> None:
        self.rating = rating
        self.data = data

    def predict_ratings(self, user: int, items: npt.NDArray[np.int64]) -> npt.NDArray[np.floating]:
        return predict_by_id(
            self.rating, self.data.user_ids[user], [self.data.item_ids[int(i)] for i in items]
        )


def predict_by_id(
    rating: RatingModel, user_id: str, item_ids: Sequence[str]
) -> npt.NDArray[np.floating]:
    """Predicted ratings of `user_id` for `item_ids`; the global mean for a user or an item the
    model never saw."""
    out = np.full(len(item_ids), rating.mean)
    u = rating.user_index.get(user_id)
    if u is None:
        return out
    index = rating.item_index
    known = [(n, j) for n, item in enumerate(item_ids) if (j := index.get(item)) is not None]
    if known:
        rows, cols = zip(*known, strict=True)
        out[list(rows)] = rating.model.predict(np.full(len(cols), u), np.array(cols))
    return out


def adapter_rating_model(
    record: AdapterRecord,
    directory: Path,
    database_url: str,
    store: ArtifactStore,
    cache_root: Path,
) -> RatingModel:
    """The rating model whose predictions adapter `record`'s pointwise prompts show: always the
    one it was tuned with, since an adapter learns to read the hint's distribution.

    Decision (issue 17): the base retrain trains the rating model and stores it with every
    model of the run; tuning reuses the champion's and records it in the adapter's lineage
    (`rating_model`: base model id and the registered sha256 of its weights), and the adapter
    keeps no copy: the rating model (a vector per user and per item) outweighs a LoRA adapter
    at scale, and the champion's verified copy is already on every machine that ranks. So:

    - an adapter that carries its own (`hint_regressor.*`: tuned before the retrain stored one,
      or on a champion stored without one) reads it, whatever the champion has now;
    - otherwise it reads the rating model of the base model its lineage names: in the usual
      case the current champion, whose copy batch ranking has already fetched (no download);
      after a new base champion the earlier model, fetched through its registry row like any
      model (the registry keeps every model's artifact). Reading the new champion's instead
      would change the hint distribution under the adapter. The base model's registered digest
      must equal the one in the lineage.

    Every file is checked against its registry row (`fetch_registered`), as the model files
    are; refusals are ArtifactIntegrityError."""
    from recranker_core import registry
    from recranker_core.base.candidates import fetch_model

    own = {f"{ADAPTER_STEM}.safetensors", f"{ADAPTER_STEM}.pt"} & set(record.files)
    if own:
        rating = read_rating_model(directory, ADAPTER_STEM, {"adapter_id": record.adapter_id})
        log.info("%s: hint rating model: its own (trained by its tuning run)", record.label)
        return rating
    ref = record.lineage.get("rating_model") or {}
    model_id = ref.get("model_id")
    if model_id is None:
        raise ArtifactIntegrityError(
            f"{record.label} carries no rating model and its lineage names none, so its "
            "pointwise hint cannot be served: tune a new adapter (`recranker tune`)"
        )
    base = registry.get_model(database_url, int(model_id))
    registered = base.files.get(str(ref.get("file", RATING_WEIGHTS)))
    if registered is None or registered != ref.get("sha256"):
        raise ArtifactIntegrityError(
            f"{record.label} was tuned with the rating model of base model {model_id} (sha256 "
            f"{str(ref.get('sha256'))[:12]}...), but that model's registry row lists "
            f"{'none' if registered is None else registered[:12] + '...'}: tune a new adapter "
            "(`recranker tune`)"
        )
    directory = fetch_model(base, store, cache_root)
    rating = read_rating_model(directory, RATING_STEM, dict(ref))
    champion = registry.champion(database_url)
    log.info(
        "%s: hint rating model: %s, the one it was tuned with (%s)",
        record.label,
        rating.describe(),
        "the champion's"
        if champion is not None and champion.model_id == base.model_id
        else "base model "
        f"{base.model_id} is not the champion any more; its rating model still serves this adapter",
    )
    return rating
