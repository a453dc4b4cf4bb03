"""Training of the base models on the protocol's split: one plain loop per loss family (BPR for
MF and LightGCN, next-item cross-entropy for SASRec, MSE for BiasedMF), early stopping on the
validation items, and the final evaluation on validation and test."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from recranker_core.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

    from recranker_core.base.models import BaseRecommender
    from recranker_core.base.split import SplitData
    from recranker_core.config import BaseTrainSettings

log = logging.getLogger(__name__)

KINDS = ("mostpop", "mf", "lightgcn", "sasrec", "biasedmf")


@dataclass
class TrainResult:
    """A trained model with how it got there. `history` has one row per evaluation (epoch,
    mean training loss, validation NDCG@10 or held-out RMSE); `model` holds the best epoch's
    state. `metrics` = evaluate_scores(model) {"valid": {...}, "test": {...}}; for BiasedMF
    `metrics["valid"]["rmse"]` is the RMSE on the held-out train-period ratings."""

    kind: str
    model: BaseRecommender
    best_epoch: int
    history: list[dict[str, float]]
    metrics: dict[str, dict[str, float]]
    seconds: float
    hyperparameters: dict[str, Any] = field(default_factory=dict)


def train_model(
    kind: str, data: SplitData, settings: BaseTrainSettings, *, rank_evaluation: bool = True
) -> TrainResult:
    """Fit a base model of `kind` (one of KINDS) on the train period of `data` and evaluate it.
    `rank_evaluation=False` skips the full-ranking evaluation on validation and test (a model
    used only for its predictions, like the hint regressor: `metrics` then holds its held-out
    RMSE only)."""
    import torch

    from recranker_core.base.evaluate import evaluate_scores

    check_trainable(kind, data, settings)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    eval_users = evaluation_users(data, settings)

    start = time.perf_counter()
    model: Any
    history: list[dict[str, float]]
    if kind == "mostpop":
        from recranker_core.base.models import MostPop

        model, best_epoch, history = MostPop.from_split(data), 0, []
    elif kind in ("mf", "lightgcn"):
        model, best_epoch, history = fit_bpr(kind, data, settings, rng, eval_users)
    elif kind == "sasrec":
        model, best_epoch, history = fit_sasrec(data, settings, rng, eval_users)
    else:
        model, best_epoch, history = fit_biasedmf(data, settings, rng)
    seconds = time.perf_counter() - start
    hyper: dict[str, Any] = {"seed": settings.seed}
    if kind != "mostpop":
        hyper |= {"embedding_dim": settings.embedding_dim, **getattr(settings, kind).model_dump()}
    if settings.eval_max_users is not None:
        hyper["eval_max_users"] = settings.eval_max_users

    test_fn = None
    if kind == "sasrec" and data.test_sequences is not None:
        # docs/METHOD.md section 1: the validation item may be in the history when scoring test.
        test_sequences = data.test_sequences

        def test_fn(users: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
            return model.sequence_scores(users, test_sequences)

    metrics = (
        evaluate_scores(model.full_scores, data, test_score_fn=test_fn, users=eval_users)
        if rank_evaluation
        else {"valid": {}, "test": {}}
    )
    if kind == "biasedmf":
        metrics["valid"]["rmse"] = min(row["rmse"] for row in history)
    log.info(
        "%s: best epoch %d, valid NDCG@10 %.4f, %.1f s",
        kind,
        best_epoch,
        metrics["valid"].get("ndcg@10", float("nan")),
        seconds,
    )
    return TrainResult(kind, model, best_epoch, history, metrics, seconds, hyper)


def check_trainable(kind: str, data: SplitData, settings: BaseTrainSettings) -> None:
    """Refuse, with a message that says what to do, data or settings that no model can use."""
    if kind not in KINDS:
        raise ConfigError(f"unknown base model {kind!r}; choose one of {', '.join(KINDS)}")
    if data.n_items < 2:
        raise DataError(
            f"the split has {data.n_items} item(s): a recommender needs at least 2 to rank; "
            "ingest more interactions"
        )
    if data.evaluable_users().size == 0:
        raise DataError(
            f"no user of the split ({data.n_users} users) has the 3 likes (rating >= "
            f"{data.like_threshold:g}) that validation and test need; ingest more interactions "
            "or lower the like threshold"
        )
    if kind == "biasedmf":
        if data.rating_values.size == 0:
            raise DataError("the split has no train-period ratings to fit the rating model on")
    elif data.train_indices.size == 0:
        raise DataError("the split has no train-period likes to fit a ranking model on")
    if kind == "sasrec":
        if max(seq.size for seq in data.train_sequences) < 2:
            raise DataError(
                "no user has 2 train-period likes in a row: SASRec has no next item to learn"
            )
        if settings.embedding_dim % settings.sasrec.heads:
            raise ConfigError(
                f"base.sasrec.heads ({settings.sasrec.heads}) must divide base.embedding_dim "
                f"({settings.embedding_dim})"
            )


def evaluation_users(data: SplitData, settings: BaseTrainSettings) -> npt.NDArray[np.int64] | None:
    """The users early stopping and the reported metrics read: all evaluable users, or the
    seeded sample of `base.eval_max_users` (the same sample for every model of a run)."""
    from recranker_core.base.evaluate import sample_evaluable_users

    return sample_evaluable_users(data, settings.eval_max_users, settings.seed)


def valid_ndcg10(
    model: BaseRecommender, data: SplitData, users: npt.NDArray[np.int64] | None = None
) -> float:
    """NDCG@10 of the validation items: the early-stopping criterion."""
    from recranker_core.base.evaluate import target_ranks
    from recranker_core.metrics import ndcg

    return ndcg(target_ranks(model.full_scores, data, "valid", users), 10)


class EarlyStopping:
    """Remembers the best evaluation and a copy of the model's state at that point."""

    def __init__(self, patience: int, higher_is_better: bool = True) -> None:
        self.patience = patience
        self.sign = 1.0 if higher_is_better else -1.0
        self.best = -np.inf
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_evals = 0

    def update(self, epoch: int, value: float, model: torch.nn.Module) -> None:
        if self.sign * value > self.best:
            self.best, self.best_epoch, self.bad_evals = self.sign * value, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_evals += 1

    @property
    def should_stop(self) -> bool:
        return self.bad_evals >= self.patience

    def restore(self, model: torch.nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def adam_optimizers(model: torch.nn.Module, lr: float) -> list[torch.optim.Optimizer]:
    """Adam for a model whose embedding tables may be sparse: SparseAdam for the weights of
    `sparse=True` embeddings (lazy Adam: only the rows a batch read move, and only their moments
    decay, so a step costs the batch and not the table), plain Adam for every other parameter.
    The first step agrees with dense Adam's but for where eps enters (SparseAdam adds it before
    the bias correction); after that, rows a batch did not read keep still where dense Adam
    would move them by momentum (tests/unit/base/test_sparse_training.py)."""
    import torch

    sparse = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse]
    dense = [p for p in model.parameters() if all(p is not w for w in sparse)]
    optimizers: list[torch.optim.Optimizer] = []
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=lr))
    if dense:
        optimizers.append(torch.optim.Adam(dense, lr=lr))
    return optimizers


def gradient_step(loss: torch.Tensor, optimizers: list[torch.optim.Optimizer]) -> None:
    """Backpropagate `loss` and step every optimizer (gradients cleared first)."""
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()


def sample_bpr_triples(
    data: SplitData, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """One (user, liked item, negative) triple per train like, shuffled; negatives are uniform
    over the items the user did not like in the train period."""
    counts = np.diff(data.train_indptr)
    users = np.repeat(np.arange(data.n_users), counts)
    pos = data.train_indices.astype(np.int64)
    # A user who liked every item has no negative to sample.
    keep = counts[users] < data.n_items
    order = rng.permutation(np.flatnonzero(keep))
    users, pos = users[order], pos[order]
    liked = np.repeat(np.arange(data.n_users), counts) * data.n_items + data.train_indices
    # CSR rows are sorted by user then item, so `liked` is sorted: membership by searchsorted.
    neg = rng.integers(0, data.n_items, size=users.size)
    todo = np.arange(users.size)
    while todo.size:
        keys = users[todo] * data.n_items + neg[todo]
        at = np.minimum(np.searchsorted(liked, keys), liked.size - 1)
        todo = todo[liked[at] == keys]
        neg[todo] = rng.integers(0, data.n_items, size=todo.size)
    return users, pos, neg


def fit_bpr(
    kind: str,
    data: SplitData,
    settings: BaseTrainSettings,
    rng: np.random.Generator,
    eval_users: npt.NDArray[np.int64] | None = None,
) -> tuple[Any, int, list[dict[str, float]]]:
    """MF or LightGCN with BPR: each epoch, one negative per train like; Adam (SparseAdam on
    MF's tables, see `adam_optimizers`).

    LightGCN stays on dense Adam: every step propagates the whole graph, so the gradient of its
    layer-0 tables reaches every row within `layers` hops of the batch, which on a connected
    graph is nearly all of them; a sparse step would skip almost nothing and the propagation
    (nnz x dim x layers per step) costs more than the Adam step anyway."""
    import torch
    from tqdm import tqdm

    from recranker_core.base.models import MF, LightGCN, normalized_adjacency

    cfg = settings.mf if kind == "mf" else settings.lightgcn
    model: MF | LightGCN
    if kind == "mf":
        model = MF(data.n_users, data.n_items, settings.embedding_dim)
    else:
        layers = settings.lightgcn.layers
        model = LightGCN(data.n_users, data.n_items, settings.embedding_dim, layers)
        model.set_graph(normalized_adjacency(data))
    optimizers = adam_optimizers(model, cfg.lr)
    stopper = EarlyStopping(cfg.patience)
    history: list[dict[str, float]] = []

    for epoch in tqdm(range(1, cfg.epochs + 1), desc=kind, unit="epoch", disable=None):
        # 1. sample this epoch's triples
        users, pos, neg = (torch.as_tensor(a) for a in sample_bpr_triples(data, rng))
        # 2. one pass of gradient steps
        model.train()
        losses = []
        for at in range(0, users.shape[0], cfg.batch_size):
            batch = slice(at, at + cfg.batch_size)
            loss = model.bpr_loss(users[batch], pos[batch], neg[batch], cfg.l2)
            gradient_step(loss, optimizers)
            losses.append(loss.item())
        # 3. evaluate on the validation items, keep the best state, maybe stop
        if epoch % settings.eval_every and epoch != cfg.epochs:
            continue
        if isinstance(model, LightGCN):
            model.finalize()
        score = valid_ndcg10(model, data, eval_users)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "valid_ndcg@10": score})
        log.info("%s epoch %d: loss %.4f, valid NDCG@10 %.4f", kind, epoch, np.mean(losses), score)
        stopper.update(epoch, score, model)
        if stopper.should_stop:
            break

    stopper.restore(model)  # LightGCN's propagated embeddings are buffers: restored with it
    if isinstance(model, LightGCN):
        model.set_graph(None)
    return model, stopper.best_epoch, history


def sequence_windows(
    data: SplitData, max_len: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """SASRec's training examples: each train sequence cut from its end into windows of
    max_len + 1 items; input = window[:-1], target = window[1:], both in SASRec's encoding
    (item index + 1, left-padded with 0).
    Cutting (rather than keeping only the last max_len items) lets long histories train too."""
    inputs, targets = [], []
    for seq in data.train_sequences:
        seq = seq.astype(np.int64)
        end = seq.size
        while end >= 2:
            window = seq[max(0, end - max_len - 1) : end]
            inputs.append(window[:-1])
            targets.append(window[1:])
            end -= max_len
    from recranker_core.base.models import pad_sequences

    return pad_sequences(inputs, max_len), pad_sequences(targets, max_len)


def fit_sasrec(
    data: SplitData,
    settings: BaseTrainSettings,
    rng: np.random.Generator,
    eval_users: npt.NDArray[np.int64] | None = None,
) -> tuple[Any, int, list[dict[str, float]]]:
    """SASRec with next-item cross-entropy over all items at every position; AdamW."""
    import torch
    from tqdm import tqdm

    from recranker_core.base.models import SASRec

    cfg = settings.sasrec
    model = SASRec(
        data.n_users,
        data.n_items,
        dim=settings.embedding_dim,
        max_len=cfg.max_len,
        layers=cfg.layers,
        heads=cfg.heads,
        dropout=cfg.dropout,
    )
    model.set_sequences(data.train_sequences)
    inputs, targets = (torch.as_tensor(a) for a in sequence_windows(data, cfg.max_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stopper = EarlyStopping(cfg.patience)
    history: list[dict[str, float]] = []

    for epoch in tqdm(range(1, cfg.epochs + 1), desc="sasrec", unit="epoch", disable=None):
        # 1. one pass over the windows in a fresh order
        model.train()
        order = torch.as_tensor(rng.permutation(inputs.shape[0]))
        losses = []
        for at in range(0, order.shape[0], cfg.batch_size):
            rows = order[at : at + cfg.batch_size]
            loss = model.sequence_loss(inputs[rows], targets[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        # 2. evaluate on the validation items, keep the best state, maybe stop
        if epoch % settings.eval_every and epoch != cfg.epochs:
            continue
        score = valid_ndcg10(model, data, eval_users)
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "valid_ndcg@10": score})
        log.info("sasrec epoch %d: loss %.4f, valid NDCG@10 %.4f", epoch, np.mean(losses), score)
        stopper.update(epoch, score, model)
        if stopper.should_stop:
            break

    stopper.restore(model)
    return model, stopper.best_epoch, history


def fit_biasedmf(
    data: SplitData, settings: BaseTrainSettings, rng: np.random.Generator
) -> tuple[Any, int, list[dict[str, float]]]:
    """BiasedMF by MSE on train-period ratings (SparseAdam on its tables); a random share of
    them is held out for early stopping and the reported RMSE (validation and test items are
    never touched)."""
    import torch
    from tqdm import tqdm

    from recranker_core.base.models import BiasedMF

    cfg = settings.biasedmf
    n = data.rating_values.size
    order = rng.permutation(n)
    n_held = int(round(cfg.holdout * n)) if n >= 10 else 0
    held, fit = order[:n_held], order[n_held:]
    # With nothing held out (tiny data) the fit set stands in: early stopping on training RMSE.
    held = held if held.size else fit
    users = torch.as_tensor(data.rating_users.astype(np.int64))
    items = torch.as_tensor(data.rating_items.astype(np.int64))
    ratings = torch.as_tensor(data.rating_values.astype(np.float32))
    model = BiasedMF(
        data.n_users,
        data.n_items,
        dim=settings.embedding_dim,
        rating_min=float(data.rating_values.min()),
        rating_max=float(data.rating_values.max()),
        global_mean=float(data.rating_values[fit].mean()),
    )
    optimizers = adam_optimizers(model, cfg.lr)
    stopper = EarlyStopping(cfg.patience, higher_is_better=False)
    history: list[dict[str, float]] = []

    for epoch in tqdm(range(1, cfg.epochs + 1), desc="biasedmf", unit="epoch", disable=None):
        # 1. one pass over the fitted ratings in a fresh order
        model.train()
        rows = torch.as_tensor(rng.permutation(fit))
        losses = []
        for at in range(0, rows.shape[0], cfg.batch_size):
            b = rows[at : at + cfg.batch_size]
            loss = model.mse_loss(users[b], items[b], ratings[b], cfg.l2)
            gradient_step(loss, optimizers)
            losses.append(loss.item())
        # 2. RMSE of the clipped predictions on the held-out ratings
        if epoch % settings.eval_every and epoch != cfg.epochs:
            continue
        pred = model.predict(data.rating_users[held], data.rating_items[held])
        rmse = float(np.sqrt(np.mean((pred - data.rating_values[held]) ** 2)))
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "rmse": rmse})
        log.info("biasedmf epoch %d: loss %.4f, held-out RMSE %.4f", epoch, np.mean(losses), rmse)
        stopper.update(epoch, rmse, model)
        if stopper.should_stop:
            break

    stopper.restore(model)
    return model, stopper.best_epoch, history
