"""The loss math of the ALRO and DMPO tuning objectives (docs/METHOD.md section 5): smooth expected
positions, the Soft Lambda Loss, the permutation-sensitive loss, the DMPO loss, and the one-pass
read of single-token answers' log-probabilities that feeds them.

Conventions: `n` candidates per list, `m` answer slots, a *position* is 1-based and lower is
better, a *score* or *logit* is higher-is-better. Lists in one call have the same length (the
listwise training prompts all show `PromptSettings.listwise_candidates` items)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from recranker_core.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

RankWeights = Literal["target", "predicted"]
PairWeights = Literal["paper", "lambdarank"]
PslKind = Literal["kl", "position"]
RANK_WEIGHTS: tuple[str, ...] = ("target", "predicted")
PAIR_WEIGHTS: tuple[str, ...] = ("paper", "lambdarank")
PSL_KINDS: tuple[str, ...] = ("kl", "position")


# --- expected positions -----------------------------------------------------------------------


def slot_expected_positions(slot_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """ALRO's soft-argmax expected position of each candidate, from the identifier logits at
    each answer slot (Chao et al., "Make Large Language Model a Better Ranker", arXiv 2403.19181,
    section on the Soft Lambda Loss).

    `slot_logits` is [B, m, n]: at slot t (the t-th identifier of the answer, read with the gold
    answer before it, i.e. teacher forcing) the logits or log-probabilities of the n candidates'
    identifier tokens. With y[t, i] = softmax_i(slot_logits[t])  (renormalised over the
    candidates),

        E[pos_i] = sum_t t * exp(gamma * y[t, i]) / sum_u exp(gamma * y[u, i])

    a softmax over slots per item, sharpened by `gamma` (> 0; y lies in [0, 1], so gamma of about
    10 or more is needed for a sharp position). Returns [B, n].

    When the answer lists fewer slots than candidates (m < n: our listwise label is the top
    `listwise_top` of `listwise_candidates`), an item the model never names would get the middle
    of the slots, ahead of the items named last. So one extra slot collects each item's leftover
    mass y[m+1, i] = max(0, 1 - sum_t y[t, i]) at position (m + 1 + n) / 2, the mean position of
    the unlisted items. This slot is ours: the paper ranks the whole list.
    """
    import torch

    _check_gamma(gamma)
    if slot_logits.ndim != 3 or slot_logits.shape[1] < 1 or slot_logits.shape[2] < 1:
        raise DataError(
            f"slot logits must be [batch, slots, candidates] with at least one of each, not "
            f"{list(slot_logits.shape)}"
        )
    _, m, n = slot_logits.shape
    y = torch.softmax(_wide(slot_logits), dim=-1)  # [B, m, n]
    slots = torch.arange(1, m + 1, dtype=y.dtype, device=y.device)
    if m < n:
        leftover = (1.0 - y.sum(dim=1, keepdim=True)).clamp(min=0.0)
        y = torch.cat([y, leftover], dim=1)
        tail = torch.tensor([(m + 1 + n) / 2], dtype=y.dtype, device=y.device)
        slots = torch.cat([slots, tail])
    weights = torch.softmax(gamma * y, dim=1)  # over slots, per item
    return (weights * slots[None, :, None]).sum(dim=1)


def soft_ranks(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """A smooth rank of each candidate from one score per candidate (e.g. the first-slot
    identifier log-probabilities that the scorer reads at inference), [B, n] -> [B, n]:

        rank_i = 1 + sum_{j != i} sigmoid(gamma * (s_j - s_i))

    the sigmoid relaxation of rank_i = 1 + #{j : s_j > s_i} (as in ApproxNDCG, Qin et al. 2010);
    `gamma` (> 0) is a sharpness, as in `slot_expected_positions`. Equal scores share a rank."""
    import torch

    _check_gamma(gamma)
    if scores.ndim != 2:
        raise DataError(f"scores must be [batch, candidates], not {list(scores.shape)}")
    s = _wide(scores)
    beats = torch.sigmoid(gamma * (s[:, None, :] - s[:, :, None]))  # [B, i, j]: j above i
    # The diagonal adds sigmoid(0) = 0.5 to every row; 0.5 instead of 1 takes it back out.
    return 0.5 + beats.sum(dim=-1)


def expected_positions(logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """[B, n] scores -> `soft_ranks`; [B, m, n] slot logits -> `slot_expected_positions`."""
    if logits.ndim == 2:
        return soft_ranks(logits, gamma)
    if logits.ndim == 3:
        return slot_expected_positions(logits, gamma)
    raise DataError(
        f"expected [batch, candidates] scores or [batch, slots, candidates] slot logits, not a "
        f"tensor of shape {list(logits.shape)}"
    )


# --- ALRO: Soft Lambda Loss and the permutation-sensitive loss ---------------------------------


def rating_gains(ratings: torch.Tensor) -> torch.Tensor:
    """NDCG's graded gain 2^r - 1 per candidate; an unrated candidate has r = 0 (gain 0)."""
    return 2.0 ** _wide(ratings) - 1.0


def soft_lambda_loss(
    logits: torch.Tensor,
    gains: torch.Tensor,
    *,
    gamma: float,
    weights: RankWeights = "target",
    pair_weights: PairWeights = "paper",
) -> torch.Tensor:
    """ALRO's Soft Lambda Loss (arXiv 2403.19181), LambdaLoss (Wang et al., CIKM 2018) over the
    soft expected positions P of `expected_positions(logits, gamma)`; a scalar, the batch mean.

    `logits` is [B, n] scores or [B, m, n] slot logits, `gains` [B, n] (`rating_gains`). Per list,

        loss = sum_{i, j : G_i > G_j} w_ij * log2(1 + exp(P_i - P_j)) / IDCG

    i.e. -log2 sigmoid(P_j - P_i) for each pair the gains order, weighted by w_ij; IDCG =
    sum_r G_(r) / D(r) over the gains sorted best first normalises it to NDCG's scale, and a list
    without gains adds 0. D(r) = log2(1 + r) with 1-based ranks r. The pair weight:

    - "paper" (ALRO's delta_ij, LambdaLoss's NDCG-Loss2):
          w_ij = |1/D(|r_i - r_j|) - 1/D(|r_i - r_j| + 1)| * |G_i - G_j|
      which depends only on how far apart the two items are ranked;
    - "lambdarank" (LambdaRank's delta-NDCG, the NDCG change of swapping the two):
          w_ij = |1/D(r_i) - 1/D(r_j)| * |G_i - G_j|
      which also depends on where the pair sits (a pair near the top weighs more).

    The ranks r are:

    - "target": the ideal order by gains (the paper's tau); equal gains share their mean rank, so
      that relabelling the items changes nothing;
    - "predicted": the model's order, the detached positions sorted (as LambdaLoss sorts its
      scores); an exact tie is broken against the higher gain, so that a model which cannot tell
      items apart (all positions equal) earns no credit for it.

    Two items of different gains are always at least one rank apart (a tie group's mean rank is
    at least one from the next group's), so |r_i - r_j| >= 1 in every weighted pair. The weights
    carry no gradient; the positions do.
    """
    import torch

    if weights not in RANK_WEIGHTS:
        raise ConfigError(
            f"the Soft Lambda Loss rank weights must be one of {list(RANK_WEIGHTS)}, "
            f"not {weights!r}"
        )
    if pair_weights not in PAIR_WEIGHTS:
        raise ConfigError(
            f"the Soft Lambda Loss pair weights must be one of {list(PAIR_WEIGHTS)}, "
            f"not {pair_weights!r}"
        )
    positions = expected_positions(logits, gamma)
    g = gains.to(device=positions.device, dtype=positions.dtype)
    if g.shape != positions.shape:
        raise DataError(
            f"gains have shape {list(gains.shape)} but the logits give {list(positions.shape)} "
            "(batch, candidates); pass one gain per candidate, in the logits' candidate order"
        )
    if bool((g < 0).any()) or not bool(torch.isfinite(g).all()):
        raise DataError(
            "gains must be finite and 0 or more (2^rating - 1, 0 for an unrated candidate); "
            f"got {g.tolist()}"
        )
    with torch.no_grad():
        ranks = _target_ranks(g) if weights == "target" else _predicted_ranks(positions, g)
        if pair_weights == "lambdarank":
            inverse = 1.0 / torch.log2(1.0 + ranks)
            discount = (inverse[:, :, None] - inverse[:, None, :]).abs()
        else:
            # The diagonal and tied pairs (distance 0) carry no gain difference; clamping them
            # to 1 keeps their weight finite, so that 0 * weight stays 0 in the gradient.
            apart = (ranks[:, :, None] - ranks[:, None, :]).abs().clamp(min=1.0)
            discount = (1.0 / torch.log2(1.0 + apart) - 1.0 / torch.log2(2.0 + apart)).abs()
        w = discount * (g[:, :, None] - g[:, None, :]).abs()
        ordered = g[:, :, None] > g[:, None, :]  # [B, i, j]: i should be above j
        ideal = torch.sort(g, dim=-1, descending=True).values
        discounts = torch.log2(
            torch.arange(2, g.shape[-1] + 2, dtype=g.dtype, device=g.device)
        )  # D(1..n)
        idcg = (ideal / discounts).sum(dim=-1)
    penalty = torch.nn.functional.softplus(positions[:, :, None] - positions[:, None, :])
    pair_loss = torch.where(ordered, w * penalty, torch.zeros_like(penalty)) / math.log(2.0)
    per_list = pair_loss.sum(dim=(1, 2)) / idcg.clamp(min=torch.finfo(g.dtype).tiny)
    return torch.where(idcg > 0, per_list, torch.zeros_like(per_list)).mean()


def to_original_order(values: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Map per-candidate values of a permuted list back to the original candidate order.

    `permutation` is [n] or [B, n]: the permuted list shows original candidate permutation[j] at
    position j. `values` is [B, n] or [B, m, n] in the permuted order (the candidate axis last);
    the result has the same shape, with out[..., permutation[j]] = values[..., j]."""
    import torch

    n = values.shape[-1]
    perm = permutation.to(device=values.device, dtype=torch.long)
    if perm.ndim == 1 and perm.shape[0] == n:
        perm = perm.expand(values.shape[0], n)
    if perm.ndim != 2 or perm.shape != (values.shape[0], n) or values.ndim not in (2, 3):
        raise DataError(
            f"a permutation of shape {list(permutation.shape)} does not fit values of shape "
            f"{list(values.shape)}; pass [n] or [batch, n] with values [batch, (slots,) n]"
        )
    if not torch.equal(
        torch.sort(perm, dim=-1).values, torch.arange(n, device=perm.device).expand_as(perm)
    ):
        raise DataError("each row of the permutation must hold 0..n-1 exactly once")
    inverse = torch.argsort(perm, dim=-1)  # original candidate i sits at position inverse[i]
    if values.ndim == 3:
        inverse = inverse[:, None, :].expand_as(values)
    return torch.gather(values, -1, inverse)


def permutation_sensitive_loss(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    *,
    kind: PslKind = "kl",
    gamma: float = 1.0,
) -> torch.Tensor:
    """ALRO's permutation-sensitive loss (arXiv 2403.19181): the model's outputs for one list
    shown in two candidate orders, `logits_b` already mapped back to `logits_a`'s candidate order
    (`to_original_order`), should agree; a scalar, the batch mean.

    Both are [B, n] scores or [B, m, n] slot logits.
    - "kl": the symmetric KL between the candidate distributions p = softmax(a), q = softmax(b)
      (per slot for slot logits, then averaged): (KL(p || q) + KL(q || p)) / 2.
    - "position": the mean over candidates of (P_a - P_b)^2, P = `expected_positions(., gamma)`.

    Zero when the scorer does not depend on where a candidate is shown."""
    import torch

    if kind not in PSL_KINDS:
        raise ConfigError(
            f"the permutation-sensitive loss kind must be one of {list(PSL_KINDS)}, not {kind!r}"
        )
    if logits_a.shape != logits_b.shape:
        raise DataError(
            f"the two orders' logits differ in shape ({list(logits_a.shape)} vs "
            f"{list(logits_b.shape)}); pass the same list twice, the second mapped back"
        )
    if kind == "position":
        pa, pb = expected_positions(logits_a, gamma), expected_positions(logits_b, gamma)
        return ((pa - pb) ** 2).mean(dim=-1).mean()
    if logits_a.ndim not in (2, 3):
        raise DataError(
            f"expected [batch, candidates] or [batch, slots, candidates] logits, not "
            f"{list(logits_a.shape)}"
        )
    la = torch.log_softmax(_wide(logits_a), dim=-1)
    lb = torch.log_softmax(_wide(logits_b), dim=-1)
    # KL(p||q) + KL(q||p) = sum (p - q)(log p - log q)
    jeffreys = ((la.exp() - lb.exp()) * (la - lb)).sum(dim=-1)
    return 0.5 * jeffreys.mean()


# --- DMPO -------------------------------------------------------------------------------------


def dmpo_loss(
    policy_logp_pos: torch.Tensor,
    policy_logp_neg: torch.Tensor,
    ref_logp_pos: torch.Tensor,
    ref_logp_neg: torch.Tensor,
    beta: float,
    *,
    sft_weight: float = 0.0,
) -> torch.Tensor:
    """DMPO (Bai et al., "Finetuning Large Language Model for Personalized Ranking",
    arXiv 2405.16127): one positive answer against k negatives, relative to a frozen reference;
    a scalar, the batch mean.

        loss = -log sigmoid(beta * h(pos) - beta / k * sum_j h(neg_j)),  h = log pi - log pi_ref
             + sft_weight * (-log pi(pos))

    Shapes: positives [B], negatives [B, k]. With k = 1 it is DPO (Rafailov et al., 2023); by
    Jensen (-log sigmoid is convex) it is at most the mean of the k pairwise DPO losses. The
    optional anchor is the positive's NLL under the policy, which keeps its likelihood from
    falling while the margin grows. Compute the reference under `torch.no_grad()`."""
    import torch

    if not beta > 0:
        raise ConfigError(f"the DMPO beta must be positive, not {beta}")
    if not sft_weight >= 0:
        raise ConfigError(f"the DMPO SFT anchor weight must be 0 or more, not {sft_weight}")
    if policy_logp_pos.ndim != 1 or policy_logp_neg.ndim != 2:
        raise DataError(
            f"DMPO takes positives [batch] and negatives [batch, k], not "
            f"{list(policy_logp_pos.shape)} and {list(policy_logp_neg.shape)}"
        )
    b, k = policy_logp_neg.shape
    if k < 1 or policy_logp_pos.shape[0] != b:
        raise DataError(
            f"DMPO needs at least one negative per positive and as many rows of each: got "
            f"{list(policy_logp_pos.shape)} positives and {list(policy_logp_neg.shape)} negatives"
        )
    if ref_logp_pos.shape != policy_logp_pos.shape or ref_logp_neg.shape != policy_logp_neg.shape:
        raise DataError(
            f"the reference log-probabilities ({list(ref_logp_pos.shape)}, "
            f"{list(ref_logp_neg.shape)}) must have the policy's shapes "
            f"({list(policy_logp_pos.shape)}, {list(policy_logp_neg.shape)})"
        )
    h_pos = policy_logp_pos - ref_logp_pos
    h_neg = policy_logp_neg - ref_logp_neg
    margin = beta * (h_pos - h_neg.mean(dim=-1))
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    if sft_weight:
        loss = loss + sft_weight * (-policy_logp_pos).mean()
    return loss


# --- answer log-probabilities in one forward pass ---------------------------------------------


def gather_answer_logps(
    logits: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """log p(token | everything up to and including `positions`) from a forward pass's full
    logits [B, T, V]: `positions` [B, s] index the token whose next-token distribution is read
    (the last prompt token for the first answer slot), `token_ids` [B, s, c] the c answer tokens
    wanted there. Returns [B, s, c] in float32 (float64 logits stay float64). For an objective
    that already ran the full logits (ALRO's language-model term) and reads its slots from the
    same pass."""
    import torch

    if logits.ndim != 3 or positions.ndim != 2 or positions.shape[0] != logits.shape[0]:
        raise DataError(
            f"logits must be [batch, tokens, vocab] and positions [batch, slots], not "
            f"{list(logits.shape)} and {list(positions.shape)}"
        )
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= logits.shape[1]):
        raise DataError(
            f"answer positions {positions.tolist()} fall outside the {logits.shape[1]} tokens"
        )
    at = torch.take_along_dim(logits, positions.long()[..., None], dim=1)  # [B, s, V]
    return _token_logps(at, token_ids)


def answer_logps(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    token_ids: torch.Tensor,
) -> torch.Tensor:
    """One forward pass of `model`, reading [B, s, c] log-probabilities: at each of the s
    `positions` [B, s] of a row, log p(token) of the c `token_ids` [B, s, c] (float32).

    Only those positions are projected onto the vocabulary (`logits_to_keep`), so a long prompt
    costs no [B, T, V] logits. Rows may be right-padded (as `tune.collate` pads) or left-padded:
    position ids are counted over the real tokens. Runs with gradients unless the caller wraps it
    in `torch.no_grad()` (a reference model)."""
    _check_rows(input_ids, attention_mask, positions, token_ids)
    mask = attention_mask.long()
    position_ids = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        logits_to_keep=positions.long(),
        use_cache=False,
    ).logits
    if logits.shape[1] != positions.shape[1]:
        # A forward pass without per-row logits_to_keep returns every position.
        return gather_answer_logps(logits, positions, token_ids)
    return _token_logps(logits, token_ids)


def single_token_answer_logps(
    model: Any,
    batch_input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    answer_token_ids: torch.Tensor,
) -> torch.Tensor:
    """log p(answer | prompt) of m single-token answers per prompt [B, m], in ONE forward pass:
    each row of `batch_input_ids` is a prompt ending where the answer starts (after the
    generation prompt), padded on either side; the answer position is its last real token.

    For DMPO: the positive's and the k negatives' identifier ids as one [B, 1 + k] tensor, one
    pass for the policy and one (under `torch.no_grad()`) for the reference."""
    import torch

    if answer_token_ids.ndim != 2:
        raise DataError(
            f"answer token ids must be [batch, answers], not {list(answer_token_ids.shape)}"
        )
    if attention_mask.ndim != 2:
        raise DataError(f"the attention mask must be [batch, tokens], not {attention_mask.shape}")
    steps = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = torch.where(attention_mask.bool(), steps, -1).max(dim=-1).values
    return answer_logps(
        model, batch_input_ids, attention_mask, last[:, None], answer_token_ids[:, None, :]
    )[:, 0, :]


# --- helpers ----------------------------------------------------------------------------------


def _target_ranks(gains: torch.Tensor) -> torch.Tensor:
    """1-based ranks of the ideal order (best gain first), ties at their mean rank."""
    above = (gains[:, None, :] > gains[:, :, None]).sum(dim=-1)
    tied = (gains[:, None, :] == gains[:, :, None]).sum(dim=-1) - 1
    return (1.0 + above + 0.5 * tied).to(gains.dtype)


def _predicted_ranks(positions: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """1-based ranks of the predicted order (lowest position first); among equal positions the
    lower gain comes first, and items equal in both share their mean rank."""
    p = positions.detach()
    same_place = p[:, None, :] == p[:, :, None]  # [B, i, j]
    lower_gain = gains[:, None, :] < gains[:, :, None]
    before = (p[:, None, :] < p[:, :, None]) | (same_place & lower_gain)
    tied = (same_place & (gains[:, None, :] == gains[:, :, None])).sum(dim=-1) - 1
    return (1.0 + before.sum(dim=-1) + 0.5 * tied).to(p.dtype)


def _token_logps(logits_at: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    import torch

    ids = token_ids.to(device=logits_at.device, dtype=torch.long)
    if ids.ndim != 3 or ids.shape[:2] != logits_at.shape[:2]:
        raise DataError(
            f"token ids must be [batch, slots, answers] matching the read positions "
            f"{list(logits_at.shape[:2])}, not {list(token_ids.shape)}"
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= logits_at.shape[-1]):
        raise DataError(
            f"answer token ids {sorted(set(ids.flatten().tolist()))} fall outside the "
            f"vocabulary of {logits_at.shape[-1]} tokens; read them with the backbone's tokenizer"
        )
    return torch.log_softmax(_wide(logits_at), dim=-1).gather(-1, ids)


def _check_rows(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    token_ids: torch.Tensor,
) -> None:
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise DataError(
            f"input ids and attention mask must both be [batch, tokens], not "
            f"{list(input_ids.shape)} and {list(attention_mask.shape)}"
        )
    if positions.ndim != 2 or positions.shape[0] != input_ids.shape[0]:
        raise DataError(
            f"answer positions must be [batch, slots] with the input's {input_ids.shape[0]} rows, "
            f"not {list(positions.shape)}"
        )
    if token_ids.ndim != 3 or tuple(token_ids.shape[:2]) != tuple(positions.shape):
        raise DataError(
            f"answer token ids must be [batch, slots, answers] matching the positions "
            f"{list(positions.shape)}, not {list(token_ids.shape)}"
        )
    width = input_ids.shape[1]
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= width):
        raise DataError(
            f"answer positions {positions.tolist()} fall outside the {width} input tokens; an "
            "empty prompt (all padding) has no answer position"
        )
    if positions.numel() and not bool(attention_mask.gather(1, positions.long()).bool().all()):
        raise DataError(
            "an answer position points at a padding token; read the answer after a real token "
            "(an empty prompt, all padding, has no answer position)"
        )


def _wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in float64 when it is, else float32: half-precision logits lose the small differences
    between answers, and float64 callers (tests, analyses) keep their precision."""
    import torch

    return t if t.dtype == torch.float64 else t.float()


def _check_gamma(gamma: float) -> None:
    if not gamma > 0 or math.isinf(gamma):
        raise ConfigError(f"the soft-rank sharpness gamma must be positive and finite, not {gamma}")
