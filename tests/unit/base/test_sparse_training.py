"""Sparse updates of the embedding base models (MF, BiasedMF): SparseAdam on the rows a batch
reads. On a row's first update it must agree with the dense Adam the defaults were tuned with,
and a row no batch has read must not move (dense Adam moves it by momentum)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from recranker_core.base.models import MF, BiasedMF, LightGCN
from recranker_core.base.train import adam_optimizers, gradient_step

N_USERS, N_ITEMS, DIM = 12, 9, 4


def as_dense(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` (same weights) whose embeddings give dense gradients, as before."""
    dense = copy.deepcopy(model)
    for module in dense.modules():
        if isinstance(module, torch.nn.Embedding):
            module.sparse = False
    return dense


def mf_loss(l2: float) -> Callable[[torch.nn.Module, int], torch.Tensor]:
    batches = [
        (torch.tensor([0, 1, 1, 4]), torch.tensor([2, 3, 5, 2]), torch.tensor([0, 6, 7, 3])),
        (torch.tensor([2, 4, 7]), torch.tensor([1, 2, 8]), torch.tensor([3, 4, 0])),
    ]
    return lambda model, step: model.bpr_loss(*batches[step], l2)  # type: ignore[operator]


def biasedmf_loss(l2: float) -> Callable[[torch.nn.Module, int], torch.Tensor]:
    batches = [
        (torch.tensor([0, 1, 1, 4]), torch.tensor([2, 3, 5, 2]), torch.tensor([4.0, 3, 5, 1])),
        (torch.tensor([2, 4, 7]), torch.tensor([1, 2, 8]), torch.tensor([2.0, 5, 4])),
    ]
    return lambda model, step: model.mse_loss(*batches[step], l2)  # type: ignore[operator]


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "mf":
        return MF(N_USERS, N_ITEMS, DIM)
    model = BiasedMF(N_USERS, N_ITEMS, DIM, global_mean=3.5)
    with torch.no_grad():  # non-zero biases, so that their update is compared too
        for p in (model.user_bias.weight, model.item_bias.weight):
            p.normal_(std=0.1)
    return model


LOSSES = {"mf": mf_loss, "biasedmf": biasedmf_loss}


@pytest.mark.parametrize("l2", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["mf", "biasedmf"])
def test_first_step_matches_dense_adam(kind: str, l2: float) -> None:
    loss_of = LOSSES[kind](l2)
    sparse = build(kind)
    dense = as_dense(sparse)
    sparse_opts = adam_optimizers(sparse, lr=0.05)
    assert [type(o) for o in sparse_opts] == [torch.optim.SparseAdam]
    # SparseAdam adds eps before the bias correction of the second moment, Adam after it: on
    # step 1 SparseAdam's eps of 1e-8 is Adam's 1e-8 / sqrt(1 - 0.999). That is the only
    # difference (it matters only for gradients near eps, and fades as the step count grows).
    dense_opt = torch.optim.Adam(dense.parameters(), lr=0.05, eps=1e-8 / (1 - 0.999) ** 0.5)

    first_sparse, first_dense = loss_of(sparse, 0), loss_of(dense, 0)
    assert first_sparse.item() == pytest.approx(first_dense.item(), abs=1e-7)
    gradient_step(first_sparse, sparse_opts)
    gradient_step(first_dense, [dense_opt])
    assert all(p.grad is None or p.grad.is_sparse for p in sparse.parameters())

    # Adam's first step on a row with zero gradient is zero, so after one step every row agrees,
    # the rows the batch read (moved by lr) and the others (unmoved).
    moved = False
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
        moved |= not torch.equal(p, build(kind).state_dict()[name])
    assert moved
    # ... and so does the loss the next step starts from.
    assert loss_of(sparse, 1).item() == pytest.approx(loss_of(dense, 1).item(), abs=1e-6)


@pytest.mark.parametrize("kind", ["mf", "biasedmf"])
def test_a_row_no_batch_read_does_not_move(kind: str) -> None:
    loss_of = LOSSES[kind](0.1)
    model = build(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizers = adam_optimizers(model, lr=0.05)
    gradient_step(loss_of(model, 0), optimizers)  # users 0, 1, 4; items 0, 2, 3, 5, 6, 7
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    gradient_step(loss_of(model, 1), optimizers)  # users 2, 4, 7; items 0..4 or 1, 2, 8
    after = model.state_dict()

    for name in ("user_emb.weight", "item_emb.weight"):
        assert not torch.equal(after[name], before[name])
    # User 9 is in no batch: never moved. User 1 was read only by the first step: the second
    # moves it not (dense Adam would, by its momentum). User 4 is in both: moved by both.
    for name in after:
        if not name.startswith("user_"):
            continue
        assert torch.equal(after[name][9], before[name][9]), name
        assert torch.equal(after[name][1], after_first[name][1]), name
        assert not torch.equal(after[name][1], before[name][1]), name
        assert not torch.equal(after[name][4], after_first[name][4]), name


def test_lightgcn_keeps_dense_adam() -> None:
    # LightGCN's propagation reads every row of the tables at every step: dense gradients.
    model = LightGCN(N_USERS, N_ITEMS, DIM)
    assert [type(o) for o in adam_optimizers(model, lr=0.01)] == [torch.optim.Adam]


@pytest.mark.parametrize("kind", ["mf", "biasedmf"])
def test_sparse_tables_export_the_same_onnx_graph(kind: str, tmp_path: Path) -> None:
    import numpy as np
    import onnx

    from recranker_core.base.onnx_export import OnnxScorer, export_topk, pad_exclusions

    sparse = build(kind)
    users = np.arange(N_USERS, dtype=np.int64)
    exclude = pad_exclusions([np.arange(u % 3) for u in range(N_USERS)])
    graphs, outputs = [], []
    for name, model in (("sparse", sparse), ("dense", as_dense(sparse))):
        path = tmp_path / f"{name}.onnx"
        export_topk(
            model.scoring_module(),  # type: ignore[operator]
            N_ITEMS,
            path,
            k=4,
            parity_users=users,
            parity_exclude=exclude,
        )
        graphs.append([node.op_type for node in onnx.load(str(path)).graph.node])
        outputs.append(OnnxScorer(path).run(users, exclude))
    assert graphs[0] == graphs[1]
    for a, b in zip(outputs[0], outputs[1], strict=True):
        np.testing.assert_array_equal(a, b)
