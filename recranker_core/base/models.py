"""The conventional recommenders of docs/METHOD.md section 2 (MostPop, MF-BPR, LightGCN, SASRec
and the BiasedMF rating regressor), each behind the one `BaseRecommender` interface that the
trainer, the evaluator, the hint builders and the ONNX exporter are written against.

This module imports torch at the top (the models are `torch.nn.Module`s): import it inside the
functions that need it, not at the top of CLI or flow modules.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from recranker_core.base.split import SplitData

Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]


@runtime_checkable
class BaseRecommender(Protocol):
    """What every base model offers once trained; nothing here depends on how it was fitted.

    - `full_scores(users)`: scores of every item for a batch of user indices, float32 of shape
      (len(users), n_items); higher is better. Seen items are NOT masked (the evaluator and the
      exporter do that).
    - `scoring_module()`: a `torch.nn.Module` in eval mode whose forward takes exactly
      `scoring_inputs(users)` and returns the same scores as a tensor [B, n_items]. Its forward
      has no sparse ops and no Python control flow on tensor values, so that it exports to ONNX.
      Inputs: user indices (int64 [B]); SASRec also takes its item sequences (int64
      [B, max_len]: item index + 1, left-padded with 0, most recent item last, as RecBole).
    - `user_embeddings()` / `item_embeddings()`: float32 [n_users, d] / [n_items, d], or None
      where the model has none (MostPop).
    - `state()` / `from_state(state)`: a dict of plain values and tensors (hyperparameters and
      the state_dict) that `write_state` stores as JSON + safetensors and `from_state` turns
      back into the model.
    """

    kind: str
    n_users: int
    n_items: int

    def full_scores(self, users: Int64Array) -> Float32Array: ...

    def scoring_inputs(self, users: Int64Array) -> tuple[torch.Tensor, ...]: ...

    def scoring_module(self) -> nn.Module: ...

    def user_embeddings(self) -> Float32Array | None: ...

    def item_embeddings(self) -> Float32Array | None: ...

    def state(self) -> dict[str, Any]: ...

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BaseRecommender: ...


class UserScoring(nn.Module):
    """Export wrapper: forward(users [B] int64) -> scores [B, n_items]."""

    def __init__(self, model: _Recommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, users: torch.Tensor) -> torch.Tensor:
        return self.model.score(users)


class SequenceScoring(nn.Module):
    """Export wrapper: forward(users [B] int64, sequences [B, L] int64) -> scores [B, n_items]."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, users: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        return self.model.score(users, sequences)


class _Recommender(nn.Module):
    """The shared half of the interface: scoring in batches, state, export wrapper. Subclasses
    define `kind`, `score(users)` and their hyperparameters (`self.hparams`, the constructor's
    keyword arguments)."""

    kind: str = ""
    hparams: dict[str, Any]

    def __init__(self, n_users: int, n_items: int) -> None:
        super().__init__()
        self.n_users = n_users
        self.n_items = n_items

    def score(self, users: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scoring_inputs(self, users: Int64Array) -> tuple[torch.Tensor, ...]:
        return (torch.as_tensor(np.asarray(users, dtype=np.int64)),)

    def scoring_module(self) -> nn.Module:
        self.eval()
        return UserScoring(self)

    def full_scores(self, users: Int64Array) -> Float32Array:
        self.eval()
        with torch.no_grad():
            scores = self.scoring_module()(*self.scoring_inputs(users))
        return scores.numpy().astype(np.float32, copy=False)

    def user_embeddings(self) -> Float32Array | None:
        return None

    def item_embeddings(self) -> Float32Array | None:
        return None

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "hparams": dict(self.hparams),
            "state_dict": {k: v.detach().clone() for k, v in self.state_dict().items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BaseRecommender:
        if state.get("kind") != cls.kind:
            raise ValueError(f"state holds a {state.get('kind')!r} model, not {cls.kind!r}")
        model = cls(**state["hparams"])
        model.load_state_dict(state["state_dict"])
        model.eval()
        return model


def _numpy(t: torch.Tensor) -> Float32Array:
    return t.detach().cpu().numpy().astype(np.float32, copy=True)


class MostPop(_Recommender):
    """Every user gets the same scores: the number of train-period likes of each item."""

    kind = "mostpop"
    counts: torch.Tensor

    def __init__(self, n_users: int, n_items: int) -> None:
        super().__init__(n_users, n_items)
        self.hparams = {"n_users": n_users, "n_items": n_items}
        self.register_buffer("counts", torch.zeros(n_items))

    @classmethod
    def from_split(cls, data: SplitData) -> MostPop:
        model = cls(data.n_users, data.n_items)
        counts = np.bincount(data.train_indices, minlength=data.n_items)
        model.counts.copy_(torch.as_tensor(counts, dtype=torch.float32))
        return model

    def score(self, users: torch.Tensor) -> torch.Tensor:
        return self.counts.unsqueeze(0).expand(users.shape[0], -1)


def _bpr(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(pos - neg).mean()


class MF(_Recommender):
    """Matrix factorisation trained with BPR: score(u, i) = <p_u, q_i>.

    The tables are sparse embeddings: a batch's gradient holds only the rows it read, so the
    trainer's SparseAdam step costs the batch, not the table (`sparse` changes only the
    gradient; scoring and the exported graph read the weights as before)."""

    kind = "mf"

    def __init__(self, n_users: int, n_items: int, dim: int = 64) -> None:
        super().__init__(n_users, n_items)
        self.hparams = {"n_users": n_users, "n_items": n_items, "dim": dim}
        self.user_emb = nn.Embedding(n_users, dim, sparse=True)
        self.item_emb = nn.Embedding(n_items, dim, sparse=True)
        nn.init.normal_(self.user_emb.weight, std=0.1)
        nn.init.normal_(self.item_emb.weight, std=0.1)

    def bpr_loss(
        self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, l2: float
    ) -> torch.Tensor:
        u, p, n = self.user_emb(users), self.item_emb(pos), self.item_emb(neg)
        loss = _bpr((u * p).sum(1), (u * n).sum(1))
        # L2 on the rows in the batch only (as in the BPR and LightGCN papers), not Adam's
        # weight decay, which would shrink every row at every step (and which SparseAdam,
        # the trainer's optimizer for these tables, does not have).
        reg = (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / (2 * users.shape[0])
        return loss + l2 * reg

    def score(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_emb.weight[users] @ self.item_emb.weight.T

    def user_embeddings(self) -> Float32Array:
        return _numpy(self.user_emb.weight)

    def item_embeddings(self) -> Float32Array:
        return _numpy(self.item_emb.weight)


def normalized_adjacency(data: SplitData) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the user-item graph of train likes (users first, then items), as a
    sparse COO tensor: LightGCN's propagation matrix."""
    n_users, n_items = data.n_users, data.n_items
    users = np.repeat(np.arange(n_users), np.diff(data.train_indptr))
    items = data.train_indices.astype(np.int64) + n_users
    rows = np.concatenate([users, items])
    cols = np.concatenate([items, users])
    degree = np.bincount(rows, minlength=n_users + n_items).astype(np.float64)
    inv_sqrt = np.zeros_like(degree)
    inv_sqrt[degree > 0] = degree[degree > 0] ** -0.5
    values = inv_sqrt[rows] * inv_sqrt[cols]
    n = n_users + n_items
    return torch.sparse_coo_tensor(
        torch.as_tensor(np.stack([rows, cols])),
        torch.as_tensor(values, dtype=torch.float32),
        (n, n),
        check_invariants=False,  # built from valid indices above; the check would only warn
    ).coalesce()


class LightGCN(_Recommender):
    """LightGCN: embeddings smoothed over the user-item graph by `layers` parameter-free
    propagation steps, averaged over layers 0..K, scored by a dot product.

    Training propagates through the sparse adjacency (`set_graph`); `finalize()` stores the
    propagated embeddings as buffers, and scoring is a plain matmul on them (no sparse op in
    the exported graph)."""

    kind = "lightgcn"
    user_final: torch.Tensor
    item_final: torch.Tensor

    def __init__(self, n_users: int, n_items: int, dim: int = 64, layers: int = 2) -> None:
        super().__init__(n_users, n_items)
        self.hparams = {"n_users": n_users, "n_items": n_items, "dim": dim, "layers": layers}
        self.layers = layers
        self.user_emb = nn.Embedding(n_users, dim)
        self.item_emb = nn.Embedding(n_items, dim)
        nn.init.normal_(self.user_emb.weight, std=0.1)
        nn.init.normal_(self.item_emb.weight, std=0.1)
        self.register_buffer("user_final", torch.zeros(n_users, dim))
        self.register_buffer("item_final", torch.zeros(n_items, dim))
        self._graph: torch.Tensor | None = None

    def set_graph(self, adjacency: torch.Tensor | None) -> None:
        """The normalised adjacency used while training; None drops it after training."""
        self._graph = adjacency

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._graph is None:
            raise RuntimeError("LightGCN.propagate needs set_graph(normalized_adjacency(data))")
        x = torch.cat([self.user_emb.weight, self.item_emb.weight])
        total = x
        for _ in range(self.layers):
            x = torch.sparse.mm(self._graph, x)
            total = total + x
        mean = total / (self.layers + 1)
        return mean[: self.n_users], mean[self.n_users :]

    def bpr_loss(
        self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, l2: float
    ) -> torch.Tensor:
        user_all, item_all = self.propagate()
        u, p, n = user_all[users], item_all[pos], item_all[neg]
        loss = _bpr((u * p).sum(1), (u * n).sum(1))
        # The regulariser is on the layer-0 (free) embeddings, as in the LightGCN paper.
        u0, p0, n0 = self.user_emb(users), self.item_emb(pos), self.item_emb(neg)
        reg = (u0.pow(2).sum() + p0.pow(2).sum() + n0.pow(2).sum()) / (2 * users.shape[0])
        return loss + l2 * reg

    def finalize(self) -> None:
        """Store the propagated embeddings that scoring uses; call after every change of the
        free embeddings (the trainer does, before each evaluation)."""
        with torch.no_grad():
            user_all, item_all = self.propagate()
            self.user_final.copy_(user_all)
            self.item_final.copy_(item_all)

    def score(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_final[users] @ self.item_final.T

    def user_embeddings(self) -> Float32Array:
        return _numpy(self.user_final)

    def item_embeddings(self) -> Float32Array:
        return _numpy(self.item_final)


class _Block(nn.Module):
    """Pre-norm transformer block with causal, padding-aware attention written out in matmuls
    (no fused kernel, no data-dependent branches: it exports to ONNX as is)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(dim, dim=2)
        q = q.reshape(b, length, self.heads, -1).transpose(1, 2)
        k = k.reshape(b, length, self.heads, -1).transpose(1, 2)
        v = v.reshape(b, length, self.heads, -1).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        # A finite fill, not -inf: a padding row with nothing to attend to gets a uniform
        # (ignored) distribution instead of NaN.
        att = att.masked_fill(~allowed, -1e9).softmax(dim=-1)
        y = (self.drop(att) @ v).transpose(1, 2).reshape(b, length, dim)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(_Recommender):
    """SASRec: causal self-attention over a user's train likes in time order; the hidden state
    at the last position, dotted with the (shared) item embeddings, scores the next item.

    Sequences hold item index + 1 for the last `max_len` items, left-padded with 0 (the padding
    row of the embedding table, as in RecBole), so the most recent item is always at position
    max_len - 1 and scores come out in plain item-index order. The
    model keeps every user's train sequence in the buffer `sequences`, which is what
    `full_scores` and `scoring_inputs` read."""

    kind = "sasrec"
    causal: torch.Tensor
    positions: torch.Tensor
    sequences: torch.Tensor

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int = 64,
        max_len: int = 50,
        layers: int = 2,
        heads: int = 1,
        dropout: float = 0.2,
    ) -> None:
        super().__init__(n_users, n_items)
        self.hparams = {
            "n_users": n_users,
            "n_items": n_items,
            "dim": dim,
            "max_len": max_len,
            "layers": layers,
            "heads": heads,
            "dropout": dropout,
        }
        self.max_len = max_len
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.register_buffer(
            "causal", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)), persistent=False
        )
        self.register_buffer("positions", torch.arange(max_len), persistent=False)
        self.register_buffer("sequences", torch.zeros((n_users, max_len), dtype=torch.int64))

    def set_sequences(self, sequences: list[npt.NDArray[np.int32]]) -> None:
        """Store every user's sequence (their train likes in time order) for scoring."""
        self.sequences.copy_(torch.as_tensor(pad_sequences(sequences, self.max_len)))

    def encode(self, sequences: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, d] of left-padded sequences [B, L]."""
        keep = (sequences != 0).unsqueeze(-1)
        x = self.item_emb(sequences) * math.sqrt(self.item_emb.embedding_dim)
        x = self.drop(x + self.pos_emb(self.positions).unsqueeze(0)) * keep
        # allowed[b, 1, i, j]: position i may attend to j (j <= i and j holds an item).
        allowed = self.causal.unsqueeze(0) & (sequences != 0).unsqueeze(1)
        allowed = allowed.unsqueeze(1)
        for block in self.blocks:
            x = block(x, allowed) * keep
        return self.ln(x)

    def sequence_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over all items of the next item at every position; `targets` holds
        0 where there is nothing to predict (both in the +1 encoding of `sequences`)."""
        # Logits only where there is a target: padding is a large share of short windows.
        has_target = targets != 0
        hidden = self.encode(inputs)[has_target]
        logits = hidden @ self.item_emb.weight[1:].T
        return F.cross_entropy(logits, targets[has_target] - 1)

    def score(self, users: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # `users` is unused: SASRec scores from the sequence alone. It stays an input so that
        # every scoring module takes the user batch first.
        last = self.encode(sequences)[:, -1, :]
        return last @ self.item_emb.weight[1:].T

    def scoring_inputs(self, users: Int64Array) -> tuple[torch.Tensor, ...]:
        u = torch.as_tensor(np.asarray(users, dtype=np.int64))
        return u, self.sequences[u]

    def scoring_module(self) -> nn.Module:
        self.eval()
        return SequenceScoring(self)

    def sequence_scores(
        self, users: Int64Array, sequences: list[npt.NDArray[np.int32]]
    ) -> Float32Array:
        """Scores of every item from the given like sequences (`sequences[u]` for each user),
        e.g. the train likes plus the validation like when ranking for the test item."""
        self.eval()
        padded = pad_sequences([sequences[int(u)] for u in np.asarray(users)], self.max_len)
        with torch.no_grad():
            scores = self.scoring_module()(
                torch.as_tensor(np.asarray(users, dtype=np.int64)), torch.as_tensor(padded)
            )
        return scores.numpy().astype(np.float32, copy=False)

    def user_embeddings(self) -> Float32Array:
        """The last hidden state of each user's train sequence (what scores their next item)."""
        self.eval()
        with torch.no_grad():
            last = [self.encode(chunk)[:, -1, :] for chunk in self.sequences.split(1024)]
        return _numpy(torch.cat(last))

    def item_embeddings(self) -> Float32Array:
        return _numpy(self.item_emb.weight[1:])


def pad_sequences(sequences: list[npt.NDArray[np.int32]], max_len: int) -> npt.NDArray[np.int64]:
    """SASRec's input encoding: the last `max_len` items of each sequence as item index + 1,
    left-padded with 0: [len(sequences), max_len]."""
    out = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = np.asarray(seq[-max_len:], dtype=np.int64)
        if tail.size:
            out[row, max_len - tail.size :] = tail + 1
    return out


class BiasedMF(_Recommender):
    """Rating regressor: r(u, i) = mu + b_u + b_i + <p_u, q_i>, fitted by MSE on train-period
    ratings. `predict` clips to the rating scale; `full_scores` gives the unclipped predictions
    (clipping would only add ties to a ranking)."""

    kind = "biasedmf"
    mean: torch.Tensor

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int = 64,
        rating_min: float = 1.0,
        rating_max: float = 5.0,
        global_mean: float = 3.0,
    ) -> None:
        super().__init__(n_users, n_items)
        self.hparams = {
            "n_users": n_users,
            "n_items": n_items,
            "dim": dim,
            "rating_min": rating_min,
            "rating_max": rating_max,
            "global_mean": global_mean,
        }
        self.rating_min = rating_min
        self.rating_max = rating_max
        self.register_buffer("mean", torch.tensor(float(global_mean)))
        # Sparse embeddings, as MF's: a step updates only the rows of the batch's ratings.
        self.user_bias = nn.Embedding(n_users, 1, sparse=True)
        self.item_bias = nn.Embedding(n_items, 1, sparse=True)
        self.user_emb = nn.Embedding(n_users, dim, sparse=True)
        self.item_emb = nn.Embedding(n_items, dim, sparse=True)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        nn.init.normal_(self.user_emb.weight, std=0.01)
        nn.init.normal_(self.item_emb.weight, std=0.01)

    def forward_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Unclipped predictions for (user, item) pairs."""
        return self._pairs(users, items)[0]

    def _pairs(
        self, users: torch.Tensor, items: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Predictions and the rows they read (for the loss's L2 term)."""
        bu, bi = self.user_bias(users), self.item_bias(items)
        p, q = self.user_emb(users), self.item_emb(items)
        pred = self.mean + bu.squeeze(-1) + bi.squeeze(-1) + (p * q).sum(-1)
        return pred, [bu, bi, p, q]

    def mse_loss(
        self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor, l2: float
    ) -> torch.Tensor:
        pred, rows = self._pairs(users, items)
        err = F.mse_loss(pred, ratings)
        # L2 on the rows in the batch only (SparseAdam has no weight decay, and decay would
        # shrink every row at every step).
        reg = torch.stack([r.pow(2).sum() for r in rows]).sum() / users.shape[0]
        return err + l2 * reg

    def predict(self, users: npt.ArrayLike, items: npt.ArrayLike) -> Float32Array:
        """Predicted ratings of (user, item) pairs, clipped to [rating_min, rating_max]."""
        self.eval()
        with torch.no_grad():
            pred = self.forward_pairs(
                torch.as_tensor(np.asarray(users, dtype=np.int64)),
                torch.as_tensor(np.asarray(items, dtype=np.int64)),
            )
        return _numpy(pred.clamp(self.rating_min, self.rating_max))

    def score(self, users: torch.Tensor) -> torch.Tensor:
        return (
            self.mean
            + self.user_bias.weight[users]
            + self.item_bias.weight.T
            + self.user_emb.weight[users] @ self.item_emb.weight.T
        )

    def user_embeddings(self) -> Float32Array:
        return _numpy(self.user_emb.weight)

    def item_embeddings(self) -> Float32Array:
        return _numpy(self.item_emb.weight)


MODELS: dict[str, type[_Recommender]] = {
    cls.kind: cls for cls in (MostPop, MF, LightGCN, SASRec, BiasedMF)
}


def model_from_state(state: dict[str, Any]) -> BaseRecommender:
    """The model a `state()` dict describes, whatever its kind."""
    kind = state.get("kind")
    if kind not in MODELS:
        raise ValueError(f"unknown base model kind {kind!r}; known: {sorted(MODELS)}")
    return MODELS[kind].from_state(state)


# ---------------------------------------------------------------------------------------------
# model files: what an artifact holds of a model, in formats that load without running code

# <stem>.json: {"format": STATE_FORMAT, "kind": ..., "hparams": {...}}; <stem>.safetensors: the
# state_dict. Written by `write_state`; artifacts of older versions hold <stem>.pt (torch.save of
# `state()`), read by `read_state` with weights_only=True.
STATE_FORMAT = 1
_PLAIN = (int, float, str, bool, type(None))


def write_state(model: BaseRecommender, directory: Path, stem: str = "model") -> list[Path]:
    """Write `model.state()` as `<stem>.json` (kind and hyperparameters) and
    `<stem>.safetensors` (the tensors); returns the two paths."""
    import json

    from safetensors.torch import save_file

    state = model.state()
    hparams = dict(state["hparams"])
    bad = {k: type(v).__name__ for k, v in hparams.items() if not isinstance(v, _PLAIN)}
    if bad:
        raise TypeError(f"{state['kind']} hyperparameters must be plain values, found {bad}")
    meta = directory / f"{stem}.json"
    weights = directory / f"{stem}.safetensors"
    meta.write_text(
        json.dumps({"format": STATE_FORMAT, "kind": state["kind"], "hparams": hparams}, indent=2)
    )
    # Separate, contiguous copies: safetensors refuses tensors that share memory.
    save_file({k: v.contiguous() for k, v in state["state_dict"].items()}, str(weights))
    return [meta, weights]


def read_state(directory: Path, stem: str = "model") -> BaseRecommender:
    """The model `write_state` wrote into `directory`, or, for an artifact of an older version,
    the one in `<stem>.pt`, read with `torch.load(weights_only=True)` (tensors and plain values
    only; a file holding anything else is refused, never run)."""
    import json

    from recranker_core.errors import ArtifactIntegrityError

    meta, weights, legacy = (
        directory / f"{stem}.json",
        directory / f"{stem}.safetensors",
        directory / f"{stem}.pt",
    )
    retrain = "train it again (`recranker train-base`, or `recranker tune` for a hint regressor)"
    if weights.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            header = json.loads(meta.read_text())
            weights_read = load_file(str(weights), device="cpu")
        except (OSError, ValueError, SafetensorError) as exc:
            raise ArtifactIntegrityError(
                f"{directory}: cannot read {meta.name} and {weights.name} ({exc}); {retrain}"
            ) from exc
        if not isinstance(header, dict) or header.get("format") != STATE_FORMAT:
            raise ArtifactIntegrityError(
                f"{meta}: not a model description of format {STATE_FORMAT}; {retrain}"
            )
        state = {
            "kind": header.get("kind"),
            "hparams": header.get("hparams"),
            "state_dict": weights_read,
        }
    elif legacy.is_file():
        import pickle

        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            raise ArtifactIntegrityError(
                f"{legacy}: refused: it holds more than tensors and plain values, which "
                f"recranker never unpickles ({str(exc).splitlines()[0][:200]}); {retrain}"
            ) from exc
    else:
        raise ArtifactIntegrityError(
            f"{directory}: no {weights.name} (nor an older {legacy.name}); {retrain}"
        )
    hparams = state.get("hparams") if isinstance(state, dict) else None
    tensors = state.get("state_dict") if isinstance(state, dict) else None
    if (
        not isinstance(hparams, dict)
        or not all(isinstance(k, str) and isinstance(v, _PLAIN) for k, v in hparams.items())
        or not isinstance(tensors, dict)
        or not all(isinstance(v, torch.Tensor) for v in tensors.values())
    ):
        raise ArtifactIntegrityError(
            f"{directory}: the {stem} files do not describe a model (kind, plain "
            f"hyperparameters, tensors); {retrain}"
        )
    try:
        return model_from_state(state)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ArtifactIntegrityError(
            f"{directory}: {stem} cannot be rebuilt ({exc}); {retrain}"
        ) from exc
