"""The base models on a small generated split with planted structure: two user groups that like
two disjoint item groups. Each model trains for a second or two on 2 cores."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from recranker_core.base.split import SplitData, build_split
from recranker_core.config import BaseTrainSettings
from recranker_core.errors import DataError

N_USERS, N_ITEMS = 80, 40  # users 0..39 like items 0..19; users 40..79 like items 20..39


def planted_split(seed: int = 0) -> SplitData:
    """Each user likes 12 items of their own group (in random time order) and dislikes 2 of the
    other group. Item popularity is the same across groups, so MostPop cannot tell them apart."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str, float, int]] = []
    for u in range(N_USERS):
        own = 0 if u < N_USERS // 2 else N_ITEMS // 2
        other = N_ITEMS // 2 - own
        liked = own + rng.choice(N_ITEMS // 2, size=12, replace=False)
        disliked = other + rng.choice(N_ITEMS // 2, size=2, replace=False)
        items = np.concatenate([liked, disliked])
        ratings = np.concatenate([rng.choice([4.0, 5.0], size=12), [1.0, 2.0]])
        times = rng.permutation(items.size)
        rows += [
            (f"u{u:03d}", f"i{i:03d}", float(r), int(t))
            for i, r, t in zip(items, ratings, times, strict=True)
        ]
    users, items, ratings, ts = zip(*rows, strict=True)
    return build_split(users, items, ratings, ts)


def quick_settings(**overrides: Any) -> BaseTrainSettings:
    """Small, fast settings for the planted split (dimension 16, few epochs), spelled out so
    that the tests do not move with the MovieLens defaults."""
    s = BaseTrainSettings(embedding_dim=16)
    bpr = {"lr": 0.05, "l2": 1e-3, "epochs": 40, "patience": 5, "batch_size": 256}
    s.mf = s.mf.model_copy(update=bpr)
    s.lightgcn = s.lightgcn.model_copy(update={**bpr, "layers": 2})
    s.sasrec = s.sasrec.model_copy(
        update={
            "lr": 0.01,
            "epochs": 40,
            "patience": 8,
            "batch_size": 32,
            "max_len": 12,
            "layers": 1,
            "heads": 1,
            "dropout": 0.1,
            "weight_decay": 0.0,
        }
    )
    s.biasedmf = s.biasedmf.model_copy(
        update={"lr": 0.05, "l2": 1e-3, "epochs": 60, "patience": 5, "batch_size": 256}
    )
    return s.model_copy(update=overrides)


@pytest.fixture(scope="module")
def data() -> SplitData:
    return planted_split()


@pytest.fixture(scope="module")
def trained(data: SplitData) -> dict[str, Any]:
    from recranker_core.base.train import train_model

    settings = quick_settings()
    return {
        kind: train_model(kind, data, settings)
        for kind in ("mostpop", "mf", "lightgcn", "sasrec", "biasedmf")
    }


@pytest.mark.parametrize("kind", ["mf", "lightgcn", "sasrec"])
def test_learned_models_beat_mostpop_on_planted_groups(trained: dict[str, Any], kind: str):
    floor = trained["mostpop"].metrics["valid"]["ndcg@10"]
    got = trained[kind].metrics["valid"]["ndcg@10"]
    assert got > floor + 0.1, f"{kind}: valid NDCG@10 {got:.3f} vs MostPop {floor:.3f}"


@pytest.mark.parametrize("kind", ["mostpop", "mf", "lightgcn", "sasrec", "biasedmf"])
def test_scores_shape_export_module_and_state_round_trip(
    trained: dict[str, Any], data: SplitData, kind: str
):
    import torch

    from recranker_core.base.models import BaseRecommender, model_from_state

    model = trained[kind].model
    assert isinstance(model, BaseRecommender) and model.kind == kind
    users = np.array([0, 5, N_USERS - 1], dtype=np.int64)
    scores = model.full_scores(users)
    assert scores.shape == (3, data.n_items) and scores.dtype == np.float32
    assert np.isfinite(scores).all()

    inputs = model.scoring_inputs(users)
    assert len(inputs) == (2 if kind == "sasrec" else 1)
    if kind == "sasrec":  # the padded train sequence, most recent item last
        seq = inputs[1][0].numpy()
        assert seq.shape == (12,) and seq[-1] == data.train_sequences[0][-1] + 1
    with torch.no_grad():
        exported = model.scoring_module()(*inputs).numpy()
    np.testing.assert_allclose(exported, scores, atol=1e-5)

    reloaded = model_from_state(model.state())
    np.testing.assert_allclose(reloaded.full_scores(users), scores, atol=1e-6)
    emb = model.item_embeddings()
    assert (emb is None) == (kind == "mostpop")
    if emb is not None:
        assert emb.shape == (data.n_items, 16)
        assert model.user_embeddings().shape == (data.n_users, 16)


@pytest.mark.parametrize("kind", ["mf", "lightgcn", "sasrec"])
def test_same_seed_same_scores(trained: dict[str, Any], data: SplitData, kind: str):
    from recranker_core.base.train import train_model

    users = data.evaluable_users()
    again = train_model(kind, data, quick_settings())
    np.testing.assert_array_equal(
        again.model.full_scores(users), trained[kind].model.full_scores(users)
    )
    other = train_model(kind, data, quick_settings(seed=1))
    assert not np.array_equal(other.model.full_scores(users), again.model.full_scores(users))


def test_biased_mf_learns_a_planted_bias():
    from recranker_core.base.train import train_model

    # Ratings are item bias + user bias + noise: items 0..9 are rated about 4.5, 10..19 about
    # 2; users 0..19 rate everything about 0.5 higher than users 20..39.
    rng = np.random.default_rng(3)
    rows = []
    for u in range(40):
        for t, i in enumerate(rng.choice(20, size=14, replace=False)):
            r = (4.5 if i < 10 else 2.0) + (0.25 if u < 20 else -0.25) + rng.normal(0, 0.3)
            rows.append((f"u{u}", f"i{i:02d}", float(np.clip(np.round(r), 1, 5)), t))
    users, items, ratings, ts = zip(*rows, strict=True)
    split = build_split(users, items, ratings, ts)

    result = train_model("biasedmf", split, quick_settings())
    model = result.model
    high = [split.item_ids.index(f"i{i:02d}") for i in range(10)]
    low = [split.item_ids.index(f"i{i:02d}") for i in range(10, 20)]
    generous = [split.user_ids.index(f"u{u}") for u in range(20)]
    strict = [split.user_ids.index(f"u{u}") for u in range(20, 40)]
    pred = model.full_scores(np.arange(split.n_users))
    # The item gap (2.5 planted) and the user gap (0.5 planted, less after rounding to stars):
    # the factors may carry part of them, so the predictions are what is checked ...
    assert 2.0 < pred[:, high].mean() - pred[:, low].mean() < 3.0
    assert 0.1 < pred[generous].mean() - pred[strict].mean() < 0.6
    # ... and the biases point the planted way.
    item_bias = model.item_bias.weight.detach().numpy().ravel()
    user_bias = model.user_bias.weight.detach().numpy().ravel()
    assert item_bias[high].min() > item_bias[low].max()
    assert user_bias[generous].mean() > user_bias[strict].mean()
    clipped = model.predict(np.zeros(20, np.int64), np.arange(20))
    assert clipped.min() >= 1.0 and clipped.max() <= 5.0

    # As the hint regressor: the same fit, its RMSE, no full-ranking evaluation.
    hint = train_model("biasedmf", split, quick_settings(), rank_evaluation=False)
    assert hint.metrics == {"valid": {"rmse": result.metrics["valid"]["rmse"]}, "test": {}}
    assert "ndcg@10" in result.metrics["valid"] and "ndcg@10" in result.metrics["test"]
    assert 0 < result.metrics["valid"]["rmse"] < 0.8  # noise alone gives ~0.45 after rounding


def test_no_evaluable_users_is_a_data_error():
    from recranker_core.base.train import train_model

    # Nobody has the 3 likes validation and test need.
    split = build_split(["a", "a", "b"], ["x", "y", "x"], [5, 5, 4], [1, 2, 3])
    for kind in ("mostpop", "mf", "sasrec", "biasedmf"):
        with pytest.raises(DataError, match="3 likes"):
            train_model(kind, split, quick_settings())


def test_single_item_is_a_data_error(data: SplitData):
    from dataclasses import replace

    from recranker_core.base.train import train_model

    one_item = replace(data, item_ids=data.item_ids[:1])
    with pytest.raises(DataError, match="at least 2"):
        train_model("mf", one_item, quick_settings())


def test_early_stopping_restores_the_best_epoch(data: SplitData):
    from recranker_core.base.train import train_model, valid_ndcg10

    # A learning rate this high overfits the tiny split quickly; patience 3 then stops it.
    settings = quick_settings()
    settings.mf = settings.mf.model_copy(update={"lr": 0.2, "epochs": 100, "patience": 3})
    result = train_model("mf", data, settings)
    scores = [row["valid_ndcg@10"] for row in result.history]
    best = int(np.argmax(scores))
    assert result.best_epoch == result.history[best]["epoch"]
    # It stopped early, after `patience` evaluations no better than the best ...
    assert len(result.history) < 100 and len(result.history) - 1 - best == 3
    assert max(scores[best + 1 :]) <= scores[best]
    # ... and the returned model is the best epoch's, not the last one's.
    assert valid_ndcg10(result.model, data) == pytest.approx(scores[best], abs=1e-12)
    assert result.metrics["valid"]["ndcg@10"] == pytest.approx(scores[best], abs=1e-12)


def test_eval_max_users_measures_a_seeded_sample_of_the_evaluable_users(data: SplitData) -> None:
    from recranker_core.base.evaluate import (
        evaluate_scores,
        sample_evaluable_users,
        target_ranks,
    )
    from recranker_core.base.train import train_model
    from recranker_core.metrics import rank_metrics

    n = 7
    sample = sample_evaluable_users(data, n, seed=0)
    assert sample is not None and sample.size == n and np.all(np.diff(sample) > 0)
    assert set(sample.tolist()) <= set(data.evaluable_users().tolist())
    np.testing.assert_array_equal(sample, sample_evaluable_users(data, n, seed=0))
    assert sample_evaluable_users(data, data.evaluable_users().size, seed=0) is None

    result = train_model("mf", data, quick_settings(eval_max_users=n, seed=0))
    assert result.hyperparameters["eval_max_users"] == n
    # The registered metrics are those of the sample: the same model measured on it by hand.
    by_hand = evaluate_scores(result.model.full_scores, data, users=sample)
    assert result.metrics == by_hand
    ranks = target_ranks(result.model.full_scores, data, "test", sample)
    assert by_hand["test"] == rank_metrics(ranks)
    assert result.metrics["valid"]["hr@10"] * n == pytest.approx(
        round(result.metrics["valid"]["hr@10"] * n)
    )
