"""Position bias of the listwise task: how much a user's listwise scores change when the same
candidates are shown in another order (ALRO's motivation, docs/METHOD.md section 5).

For each listwise prompt, `shuffles` seeded permutations of its candidates are scored with the
same verbalizer read as serving (`listwise_scores`), each shuffled prompt's scores are mapped back
to the items, and compared with the original order's scores: Spearman rank correlation (1 = the
order shown does not matter) and whether the top-scored item stays the same. A ranker free of
position bias scores 1.0 on both."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from recranker_core.errors import ConfigError
from recranker_core.llm.builders import reorder_listwise
from recranker_core.llm.prompts import Catalog, Prompt


@dataclass(frozen=True)
class PositionBias:
    prompts: int
    shuffles: int
    mean_spearman: float  # mean over prompts and shuffles; 1.0 = no position bias
    top1_agreement: float  # share of (prompt, shuffle) whose top item is unchanged

    def as_json(self) -> dict[str, float | int]:
        return {
            "prompts": self.prompts,
            "shuffles": self.shuffles,
            "mean_spearman": round(self.mean_spearman, 4),
            "top1_agreement": round(self.top1_agreement, 4),
        }


def spearman(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Spearman rank correlation with average ranks for ties; two constant vectors agree (1.0),
    a constant against a varying one does not (0.0)."""
    from scipy.stats import rankdata

    x = rankdata(np.asarray(a, dtype=np.float64))
    y = rankdata(np.asarray(b, dtype=np.float64))
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"two 1-d score vectors of one length needed, not {x.shape}, {y.shape}")
    sx, sy = x.std(), y.std()
    if sx == 0 or sy == 0:
        return 1.0 if sx == sy else 0.0
    return float(np.mean((x - x.mean()) * (y - y.mean())) / (sx * sy))


def back_to_items(shuffled: npt.ArrayLike, permutation: Sequence[int]) -> npt.NDArray[np.float64]:
    """Scores of a reordered prompt (position j shows the original position `permutation[j]`)
    put back in the original prompt's order."""
    values = np.asarray(shuffled, dtype=np.float64)
    out = np.empty_like(values)
    out[np.asarray(permutation, dtype=np.int64)] = values
    return out


def agreement(
    original: npt.ArrayLike, shuffled: npt.ArrayLike, permutation: Sequence[int]
) -> tuple[float, bool]:
    """(Spearman correlation, same top item) of one prompt's original and reordered scores."""
    orig = np.asarray(original, dtype=np.float64)
    back = back_to_items(shuffled, permutation)
    return spearman(orig, back), int(np.argmax(orig)) == int(np.argmax(back))


def position_bias(
    model: Any,
    tokenizer: Any,
    catalog: Catalog,
    prompts: Sequence[Prompt],
    *,
    shuffles: int = 3,
    seed: int = 0,
    batch_size: int = 8,
) -> PositionBias:
    """Score each listwise prompt in its own order and in `shuffles` seeded permutations."""
    from recranker_core.llm.score import listwise_scores

    if shuffles < 1:
        raise ConfigError(f"shuffles must be at least 1, not {shuffles}")
    rng = np.random.default_rng(seed)
    rhos: list[float] = []
    tops: list[bool] = []
    for prompt in prompts:
        if prompt.task != "listwise":
            raise ConfigError(f"position bias reads listwise prompts, not {prompt.task} prompts")
        perms = [rng.permutation(len(prompt.items)).tolist() for _ in range(shuffles)]
        variants = [prompt] + [reorder_listwise(prompt, catalog, p) for p in perms]
        scores = listwise_scores(model, tokenizer, variants, batch_size=batch_size)
        for perm, shuffled in zip(perms, scores[1:], strict=True):
            rho, same = agreement(scores[0], shuffled, perm)
            rhos.append(rho)
            tops.append(same)
    return PositionBias(
        prompts=len(prompts),
        shuffles=shuffles,
        mean_spearman=float(np.mean(rhos)) if rhos else float("nan"),
        top1_agreement=float(np.mean(tops)) if tops else float("nan"),
    )
