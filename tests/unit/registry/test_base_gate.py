"""The base-model promotion gate knows the users both sides were measured on: a champion measured
on the candidate's users is compared as registered, one measured on other users (another sample
size or seed, an earlier split, or unrecorded) only once re-measured on the candidate's users, and
the decision says both sample sizes and whether it was. A model scores another split's users and
items as it would serve them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from recranker_core.base.evaluate import (
    EvalSample,
    evaluate_scores,
    scores_across_splits,
    target_ranks,
    user_ids_hash,
)
from recranker_core.base.split import build_split
from recranker_core.errors import ConfigError
from recranker_core.registry import gate

WATERMARK = "2024-01-01T00:00:00+00:00"


def sample(n: int, users: str = "a", watermark: str | None = WATERMARK) -> EvalSample:
    return EvalSample(n, user_ids_hash([f"{users}{k}" for k in range(n)]), watermark, 4.0)


def metrics(ndcg10: float, on: EvalSample | None) -> dict[str, Any]:
    out: dict[str, Any] = {"valid": {"ndcg@10": ndcg10}, "test": {"ndcg@10": 0.0}}
    if on is not None:
        out["sample"] = on.as_json()
    return out


@dataclass
class Champion:
    metrics: dict[str, Any]
    model_id: int = 3
    kind: str = "mf"

    @property
    def label(self) -> str:
        return f"{self.model_id} ({self.kind})"


def test_no_champion_promotes_and_the_record_has_the_candidates_sample():
    decision = gate(metrics(0.05, sample(200)), None, 0.0)
    assert (
        decision.promote and "no champion yet" in decision.reason and "200 users" in decision.reason
    )
    assert decision.record["candidate"]["sample"]["n_users"] == 200
    assert decision.record["champion"] is None


def test_a_champion_measured_on_the_same_users_is_compared_as_registered():
    on = sample(200)
    better = gate(metrics(0.051, on), Champion(metrics(0.050, on)), 0.0)
    assert better.promote and "on the same 200 users" in better.reason
    champion = better.record["champion"]
    assert champion["remeasured"] is False and champion["value"] == 0.050
    assert champion["sample"]["n_users"] == champion["registered_sample"]["n_users"] == 200
    worse = gate(metrics(0.040, on), Champion(metrics(0.050, on)), 0.002)
    assert not worse.promote and "below champion 3 (mf) 0.0500" in worse.reason


@pytest.mark.parametrize(
    "theirs",
    [
        sample(50),  # another sample size
        sample(200, users="b"),  # the same size, other users (another seed)
        sample(200, watermark="2023-06-01T00:00:00+00:00"),  # an earlier split
        replace(sample(200), like_threshold=3.5),  # other held-out items
        None,  # registered before samples were recorded
    ],
    ids=["size", "users", "watermark", "threshold", "unrecorded"],
)
def test_a_champion_measured_on_other_users_is_not_compared_as_registered(theirs):
    with pytest.raises(ConfigError, match="re-measure the champion on the candidate's users"):
        gate(metrics(0.05, sample(200)), Champion(metrics(0.04, theirs)), 0.0)


def test_the_re_measured_champion_decides_and_the_record_says_so():
    mine, theirs = sample(200), sample(50)
    # Registered on 50 users the champion looks better (0.060) than the candidate (0.055); on
    # the candidate's 200 users it scores 0.052: the candidate is promoted.
    champion = Champion(metrics(0.060, theirs))
    again = {"valid": {"ndcg@10": 0.052}, "sample": mine.as_json()}
    decision = gate(metrics(0.055, mine), champion, 0.0, remeasured=again)
    assert decision.promote
    assert "0.0520 re-measured on the same 200 users" in decision.reason
    assert "its registered 0.0600 was measured on 50 users" in decision.reason
    record = decision.record["champion"]
    assert record["remeasured"] is True and record["value"] == 0.052
    assert record["sample"]["n_users"] == 200 and record["registered_sample"]["n_users"] == 50
    assert record["registered_value"] == 0.060
    assert decision.record["candidate"]["sample"]["n_users"] == 200
    assert decision.record["promote"] is True and decision.record["reason"] == decision.reason

    # And the other way: on the candidate's users the champion is better than registered.
    again["valid"]["ndcg@10"] = 0.070
    rejected = gate(metrics(0.065, mine), champion, 0.002, remeasured=again)
    assert not rejected.promote and "below champion 3 (mf) 0.0700 re-measured" in rejected.reason


def test_an_unrecorded_champion_re_measured_says_so():
    again = {"valid": {"ndcg@10": 0.04}, "sample": sample(200).as_json()}
    decision = gate(
        metrics(0.05, sample(200)), Champion(metrics(0.09, None)), 0.0, remeasured=again
    )
    assert decision.promote and "measured on users that were not recorded" in decision.reason
    assert decision.record["champion"]["registered_sample"] is None


def test_a_re_measurement_on_other_users_than_the_candidates_is_refused():
    again = {"valid": {"ndcg@10": 0.04}, "sample": sample(199).as_json()}
    with pytest.raises(ConfigError, match="not the candidate's"):
        gate(metrics(0.05, sample(200)), Champion(metrics(0.04, None)), 0.0, remeasured=again)


def test_a_candidate_without_its_sample_cannot_be_gated():
    with pytest.raises(ConfigError, match="which users"):
        gate(metrics(0.05, None), None, 0.0)


# ---------------------------------------------------------------------------------------------
# the champion scored on another split


def interactions(n: int, seed: int, users: int, items: int) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, n).astype(str)
    i = rng.integers(0, items, n).astype(str)
    return u, i, rng.integers(1, 6, n), np.arange(n, dtype=np.float64)


def mf(n_users: int, n_items: int, seed: int = 0) -> Any:
    import torch

    from recranker_core.base.models import MF

    torch.manual_seed(seed)
    return MF(n_users, n_items, dim=8)


def test_on_its_own_split_the_mapping_changes_nothing():
    data = build_split(*interactions(3000, 1, 50, 40))
    model = mf(data.n_users, data.n_items)
    mapped = scores_across_splits(model, data.user_ids, data.item_ids, data)
    users = data.evaluable_users()
    np.testing.assert_array_equal(mapped(users), model.full_scores(users))
    assert evaluate_scores(mapped, data) == evaluate_scores(model.full_scores, data)


def test_on_a_later_split_new_users_tie_everything_and_new_items_rank_last():
    u, i, r, t = interactions(3000, 2, 50, 40)
    early = build_split(u[:2000], i[:2000], r[:2000], t[:2000])
    # Later data brings a new user and a new item.
    later = build_split(
        np.concatenate([u, ["new-user"] * 6, ["0"] * 2]),
        np.concatenate([i, ["1", "2", "3", "4", "5", "new-item"], ["new-item", "7"]]),
        np.concatenate([r, [5, 5, 5, 5, 5, 5], [5, 5]]),
        np.concatenate([t, np.arange(3000, 3006), [3006, 3007]]),
    )
    assert "new-user" not in early.user_ids and "new-item" not in early.item_ids
    model = mf(early.n_users, early.n_items)
    mapped = scores_across_splits(model, early.user_ids, early.item_ids, later)

    new_user = later.user_ids.index("new-user")
    new_item = later.item_ids.index("new-item")
    old_user = later.user_ids.index("0")
    scores = mapped(np.array([new_user, old_user]))
    assert np.all(scores[0] == scores[0, 0])  # a user it never saw: no preference at all
    theirs = model.full_scores(np.array([early.user_ids.index("0")]))[0]
    known = [n for n, item in enumerate(later.item_ids) if item in early.item_ids]
    expected = [theirs[early.item_ids.index(later.item_ids[n])] for n in known]
    np.testing.assert_array_equal(scores[1, known], expected)
    assert scores[1, new_item] < scores[1, known].min()

    # The new user's held-out item ranks below every item it could have been (ties count
    # against it): a user the champion cannot score adds nothing to its NDCG.
    assert later.valid_item[new_user] >= 0
    rank = target_ranks(mapped, later, "valid", np.array([new_user]))[0]
    assert rank == later.n_items - 1 - later.seen(new_user, "valid").size


def test_a_sequence_model_reads_the_later_splits_likes_of_items_it_knows():
    import torch

    from recranker_core.base.models import SASRec

    u, i, r, t = interactions(3000, 3, 40, 30)
    early = build_split(u[:2000], i[:2000], r[:2000], t[:2000])
    later = build_split(u, i, r, t)
    torch.manual_seed(0)
    model = SASRec(early.n_users, early.n_items, dim=8, max_len=6, layers=1, heads=1)
    mapped = scores_across_splits(model, early.user_ids, early.item_ids, later)
    user = later.user_ids.index(early.user_ids[0])
    to_early = {
        n: early.item_ids.index(x) for n, x in enumerate(later.item_ids) if x in early.item_ids
    }
    sequence = [to_early[int(x)] for x in later.train_sequences[user] if int(x) in to_early]
    direct = model.sequence_scores(np.array([0]), [np.array(sequence, dtype=np.int32)])[0]
    got = mapped(np.array([user]))[0]
    known = sorted(to_early)
    np.testing.assert_allclose(got[known], direct[[to_early[n] for n in known]], rtol=1e-6)


def test_the_sample_is_the_users_ids_not_their_indices():
    data = build_split(*interactions(3000, 4, 50, 40), watermark=datetime(2024, 1, 1, tzinfo=UTC))
    users = data.evaluable_users()[:10]
    on = EvalSample.of(data, users)
    assert on.n_users == 10 and on.data_watermark == WATERMARK and on.like_threshold == 4.0
    assert on.users_hash == user_ids_hash([data.user_ids[int(u)] for u in users])
    assert EvalSample.of(data, None).n_users == data.evaluable_users().size
    assert EvalSample.from_metrics({"sample": on.as_json()}) == on
    assert EvalSample.from_metrics({"valid": {}}) is None
