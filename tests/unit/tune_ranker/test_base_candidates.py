"""The base model's candidates the tuner and the evaluator re-rank: scored in blocks, they are
the same top-n, in the same order, as scoring one user at a time, with the protocol's
exclusions applied and the held-out item kept."""

from __future__ import annotations

import numpy as np
import pytest


def split():
    from recranker_core.base.split import build_split

    rng = np.random.default_rng(7)
    n = 4000
    users = rng.integers(0, 60, n).astype(str)
    items = rng.integers(0, 80, n).astype(str)
    return build_split(users, items, rng.integers(1, 6, n), np.arange(n))


def reference(model, data, users, target, n, sequential):
    """One user at a time, written plainly."""
    out = []
    held = data.valid_item if target == "valid" else data.test_item
    for u in users.tolist():
        if sequential:
            raw = model.sequence_scores(np.array([u]), data.sequences_for(target))[0]
        else:
            raw = model.full_scores(np.array([u]))[0]
        raw = np.asarray(raw, np.float64)
        scores = raw.copy()
        scores[data.seen(u, target)] = -np.inf
        scores[held[u]] = raw[held[u]]
        out.append(np.argsort(-scores, kind="stable")[:n])
    return np.array(out)


@pytest.mark.parametrize("kind", ["mf", "sasrec"])
@pytest.mark.parametrize("target", ["valid", "test"])
def test_blocked_candidates_equal_one_user_at_a_time(kind, target, monkeypatch):
    import torch

    import recranker_core.base.evaluate as evaluate
    from recranker_core.base.models import MF, SASRec
    from recranker_core.tune_ranker.context import BaseContext, base_candidates

    torch.manual_seed(0)
    data = split()
    if kind == "mf":
        model = MF(data.n_users, data.n_items, 16)
    else:
        model = SASRec(data.n_users, data.n_items, dim=16, max_len=8, layers=1, heads=2)
        model.set_sequences(data.train_sequences)
    model.eval()
    ctx = BaseContext(1, kind, model, data)
    users = data.evaluable_users().astype(np.int64)
    assert users.size > 20
    # Blocks of 7 users: several blocks and a partial last one.
    monkeypatch.setattr(evaluate, "SCORE_BLOCK_ELEMENTS", 7 * data.n_items)
    got = base_candidates(ctx, users, target, 10)
    expected = reference(model, data, users, target, 10, kind == "sasrec")
    np.testing.assert_array_equal(got, expected)
    held = data.valid_item if target == "valid" else data.test_item
    for row, u in zip(got, users.tolist(), strict=True):
        excluded = set(data.seen(u, target).tolist()) - {int(held[u])}
        assert not excluded.intersection(row.tolist())
