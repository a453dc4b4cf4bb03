"""Adaptive user sampling (docs/METHOD.md section 3): which users' histories become training
prompts, drawn by importance, across k-means clusters of user embeddings, then thinned by a
repetition penalty; uniform sampling is the ablation baseline."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from recranker_core.config import SamplingSettings
from recranker_core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

METHODS = ("adaptive", "uniform")
# ln(1) = 0 gives such users no importance weight anyway, and a user needs at least one train
# like to show as history and one to hold out as a prompt's answer.
MIN_TRAIN_LIKES = 2


@dataclass(frozen=True)
class SampleResult:
    """The drawn users and what each stage contributed, for the run log."""

    users: npt.NDArray[np.int64]  # the N drawn user indices (with repeats), in draw order
    counts: dict[str, int]  # per-stage counts: eligible, importance, cluster, pool, ..., final
    method: str  # "adaptive" | "uniform"
    cluster_sizes: list[int] = field(default_factory=list)  # eligible users per cluster


def kmeans(
    x: npt.NDArray[np.floating], k: int, *, iterations: int, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Labels (one per row of `x`) and centroids (k x d) of k-means with k-means++ seeding and
    at most `iterations` Lloyd steps. Deterministic for a seed; a k larger than the number of
    distinct points is clamped to it, so every returned cluster starts from its own point."""
    data = np.asarray(x, dtype=np.float64)
    if data.ndim != 2 or data.shape[0] == 0:
        raise DataError(
            f"k-means needs a non-empty 2-D array of points, got shape {data.shape}; "
            "pass one embedding row per user."
        )
    if not np.isfinite(data).all():
        raise DataError(
            "k-means input holds NaN or infinite values; check the base model's user "
            "embeddings (a diverged training run produces them)."
        )
    if k < 1 or iterations < 1:
        raise ConfigError(
            f"k-means needs k >= 1 and iterations >= 1, got k={k}, iterations={iterations}; "
            "fix sampling.clusters / sampling.kmeans_iterations."
        )
    k = min(k, int(np.unique(data, axis=0).shape[0]))
    rng = np.random.default_rng(seed)
    centroids = _kmeans_plus_plus(data, k, rng)
    labels = _nearest(data, centroids)
    for _ in range(iterations):
        centroids = _means(data, labels, centroids)
        new_labels = _nearest(data, centroids)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return labels.astype(np.int64), centroids


def _kmeans_plus_plus(
    data: npt.NDArray[np.float64], k: int, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    n = data.shape[0]
    chosen = [int(rng.integers(n))]
    # Differences, not the expanded dot-product form: a point equal to a chosen centroid must get
    # exactly 0, so it is never chosen twice.
    d2 = ((data - data[chosen[0]]) ** 2).sum(axis=1)
    while len(chosen) < k:
        total = d2.sum()
        if total <= 0.0:  # only reachable through underflow between nearly equal points
            break
        nxt = int(rng.choice(n, p=d2 / total))
        chosen.append(nxt)
        d2 = np.minimum(d2, ((data - data[nxt]) ** 2).sum(axis=1))
    return data[chosen].copy()


def _nearest(
    data: npt.NDArray[np.float64], centroids: npt.NDArray[np.float64]
) -> npt.NDArray[np.int64]:
    # ||x||^2 is the same for every centroid of a row, so the argmin does without it.
    d2 = (centroids**2).sum(axis=1)[None, :] - 2.0 * (data @ centroids.T)
    return np.argmin(d2, axis=1).astype(np.int64)


def _means(
    data: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    centroids: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    out = centroids.copy()
    empty: list[int] = []
    for j in range(centroids.shape[0]):
        members = labels == j
        if members.any():
            out[j] = data[members].mean(axis=0)
        else:
            empty.append(j)
    if empty:
        # An empty cluster restarts at the point worst served by its centroid, so K stays K.
        far = ((data - centroids[labels]) ** 2).sum(axis=1)
        for j in empty:
            i = int(np.argmax(far))
            out[j] = data[i]
            far[i] = -1.0
    return out


def importance_draws(
    like_counts: npt.NDArray[np.integer], n: int, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """`n` positions into `like_counts`, drawn with replacement with probability proportional to
    ln(like count) (the importance-aware stage)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    counts = np.asarray(like_counts, dtype=np.float64)
    if counts.size == 0 or (counts < 1).any():
        raise DataError(
            "importance sampling needs every candidate user to have at least 1 train like; "
            "filter users with sample_users' eligibility rule first."
        )
    weights = np.log(counts)
    total = weights.sum()
    if total <= 0.0:
        raise DataError(
            "importance sampling found no user with more than 1 train like (ln(1) = 0 for all); "
            "nothing to weigh. Check the train split."
        )
    return rng.choice(counts.size, size=n, p=weights / total).astype(np.int64)


def allocate_draws(sizes: npt.NDArray[np.integer], total: int) -> npt.NDArray[np.int64]:
    """Split `total` draws across groups in proportion to their sizes, by largest remainder, so
    the allocation sums to `total` exactly (ties go to the lower group index)."""
    s = np.asarray(sizes, dtype=np.int64)
    whole = int(s.sum())
    if total == 0:
        return np.zeros(s.size, dtype=np.int64)
    if s.size == 0 or whole <= 0 or (s < 0).any():
        raise DataError(f"cannot allocate {total} draws over group sizes {s.tolist()}.")
    # Integer arithmetic: float quotas can lose the exact remainders that decide the rounding.
    quota = total * s
    alloc = quota // whole
    remainder = quota % whole
    short = total - int(alloc.sum())
    order = np.lexsort((np.arange(s.size), -remainder))
    alloc[order[:short]] += 1
    return alloc


def cluster_draws(
    labels: npt.NDArray[np.integer], n: int, rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """`n` positions into `labels` (the clustering-based stage): draws allocated to clusters in
    proportion to cluster size, uniform with replacement within a cluster. Returns the positions
    (cluster by cluster) and the per-cluster allocation."""
    lab = np.asarray(labels, dtype=np.int64)
    n_clusters = int(lab.max()) + 1 if lab.size else 0
    sizes = np.bincount(lab, minlength=n_clusters)
    alloc = allocate_draws(sizes, n)
    parts = []
    for j, take in enumerate(alloc.tolist()):
        if take:
            members = np.flatnonzero(lab == j)
            parts.append(members[rng.integers(members.size, size=take)])
    drawn = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return drawn.astype(np.int64), alloc


def penalty_weights(pool: npt.NDArray[np.integer], penalty: float) -> npt.NDArray[np.float64]:
    """Weight of each pool entry: penalty^(c_u - 1), c_u being its user's count in the pool, so a
    user seen c times weighs c * penalty^(c - 1) in total.

    That total grows with c only up to c ~ 1/ln(1/penalty) (about 19.5 at 0.95) and falls after
    it: a pool much larger than ~20 entries per eligible user thins out its most drawn users."""
    p = np.asarray(pool)
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    return np.power(float(penalty), counts[inverse.reshape(-1)] - 1).astype(np.float64)


def penalty_draws(
    pool: npt.NDArray[np.integer], n: int, penalty: float, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """`n` users drawn with replacement from the pool's entries, weighted by `penalty_weights`."""
    p = np.asarray(pool, dtype=np.int64)
    if p.size == 0:
        raise DataError("the repetition-penalty stage got an empty pool; nothing to draw from.")
    w = penalty_weights(p, penalty)
    return p[rng.choice(p.size, size=n, p=w / w.sum())]


def sample_users(
    train_like_counts: npt.NDArray[np.integer],
    embeddings: npt.NDArray[np.floating] | None,
    settings: SamplingSettings,
    *,
    eligible: npt.NDArray[np.bool_] | None = None,
) -> SampleResult:
    """Draw `settings.users` user indices (with replacement) whose histories become training
    prompts: adaptive (importance + clusters + repetition penalty) or uniform.

    `train_like_counts[u]` is user u's number of train-period likes; `embeddings[u]` the champion
    base model's user embedding, or None (e.g. MostPop), in which case the cluster stage treats
    all eligible users as one cluster. Only users with at least 2 train likes, and in `eligible`
    when given, are drawn."""
    if settings.method not in METHODS:
        raise ConfigError(
            f"sampling.method is {settings.method!r}; use one of {', '.join(METHODS)} "
            "(RECRANKER_SAMPLING__METHOD)."
        )
    counts_arr = np.asarray(train_like_counts)
    if counts_arr.ndim != 1:
        raise DataError(
            f"train_like_counts must be 1-D (one count per user), got shape {counts_arr.shape}."
        )
    mask = counts_arr >= MIN_TRAIN_LIKES
    if eligible is not None:
        elig = np.asarray(eligible, dtype=np.bool_)
        if elig.shape != counts_arr.shape:
            raise DataError(
                f"the eligible mask has shape {elig.shape} but there are {counts_arr.size} users "
                "in train_like_counts; pass one flag per model user index."
            )
        mask &= elig
    users = np.flatnonzero(mask).astype(np.int64)
    if users.size == 0:
        raise DataError(
            f"no user is eligible for sampling: none of {counts_arr.size} users has at least "
            f"{MIN_TRAIN_LIKES} train likes"
            + (" and is in the eligible mask" if eligible is not None else "")
            + ". Check the split's train period and the ingest of likes."
        )
    n = settings.users
    rng = np.random.default_rng(settings.seed)
    counts: dict[str, int] = {"eligible": int(users.size)}

    if settings.method == "uniform":
        final = users[rng.integers(users.size, size=n)]
        counts.update(
            importance=0, cluster=0, pool=0, pool_distinct=0, clusters_requested=0, clusters=0
        )
        return _finish(final, counts, "uniform", [])

    n_importance = round(settings.importance_ratio * n)
    n_cluster = round(settings.cluster_ratio * n)
    if n_importance + n_cluster == 0:
        raise ConfigError(
            f"sampling.importance_ratio={settings.importance_ratio} and "
            f"sampling.cluster_ratio={settings.cluster_ratio} draw no user at all for "
            f"sampling.users={n}; raise one of them."
        )

    drawn_importance = users[importance_draws(counts_arr[users], n_importance, rng)]

    cluster_sizes: list[int] = []
    if n_cluster == 0:
        drawn_cluster = np.zeros(0, dtype=np.int64)
    else:
        labels, k = _cluster_labels(embeddings, users, counts_arr.size, settings)
        positions, _ = cluster_draws(labels, n_cluster, rng)
        drawn_cluster = users[positions]
        cluster_sizes = np.bincount(labels, minlength=k).tolist()

    pool = np.concatenate([drawn_importance, drawn_cluster])
    final = penalty_draws(pool, n, settings.penalty, rng)
    counts.update(
        importance=int(drawn_importance.size),
        cluster=int(drawn_cluster.size),
        pool=int(pool.size),
        pool_distinct=int(np.unique(pool).size),
        clusters_requested=settings.clusters if n_cluster else 0,
        clusters=len(cluster_sizes),
    )
    return _finish(final, counts, "adaptive", cluster_sizes)


def _cluster_labels(
    embeddings: npt.NDArray[np.floating] | None,
    users: npt.NDArray[np.int64],
    n_users: int,
    settings: SamplingSettings,
) -> tuple[npt.NDArray[np.int64], int]:
    """Cluster label per eligible user and the number of clusters."""
    if embeddings is None:
        log.warning(
            "no user embeddings (the champion base model has none, e.g. MostPop): the cluster "
            "stage draws uniformly from all %d eligible users as one cluster",
            users.size,
        )
        return np.zeros(users.size, dtype=np.int64), 1
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != n_users:
        raise DataError(
            f"user embeddings have shape {emb.shape} but there are {n_users} users in "
            "train_like_counts; pass the champion model's embedding matrix (one row per user)."
        )
    x = emb[users]
    # BPR-style embedding norms grow with a user's activity, so raw Euclidean k-means splits users
    # by how much they rate (which the importance stage already covers) rather than by taste;
    # on the unit sphere the clusters follow direction, i.e. preference.
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0.0, norms, 1.0)
    labels, centroids = kmeans(
        x, settings.clusters, iterations=settings.kmeans_iterations, seed=settings.seed
    )
    return labels, int(centroids.shape[0])


def _finish(
    final: npt.NDArray[np.int64], counts: dict[str, int], method: str, cluster_sizes: list[int]
) -> SampleResult:
    counts.update(final=int(final.size), final_distinct=int(np.unique(final).size))
    log.info("user sampling (%s): %s", method, " ".join(f"{k}={v}" for k, v in counts.items()))
    return SampleResult(
        users=final.astype(np.int64), counts=counts, method=method, cluster_sizes=cluster_sizes
    )
