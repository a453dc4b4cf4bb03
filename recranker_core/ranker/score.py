"""Scoring without generation (METHOD.md section 6): read each answer as the next-token
log-probabilities at the answer position, one forward pass per prompt, batched with left padding
and position ids that ignore the padding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from recranker_core.ranker.prompts import Prompt, render, verbalizer_ids


def answer_logprobs(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    token_ids: Sequence[int],
    *,
    batch_size: int = 8,
) -> npt.NDArray[np.float32]:
    """log p(token | text) for each text and each of `token_ids`: shape [len(texts), len(ids)].

    Texts are tokenized without special tokens added (the chat template already holds them),
    left-padded so that every answer position is the last column, with position ids counted
    over the real tokens only, so padding changes nothing.
    """
    import torch

    device = next(model.parameters()).device
    wanted = torch.tensor(list(token_ids), device=device)
    out = np.empty((len(texts), len(token_ids)), dtype=np.float32)
    # Longest first: batches of similar lengths waste less on padding.
    order = sorted(range(len(texts)), key=lambda n: -len(texts[n]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            encoded = [tokenizer(texts[n], add_special_tokens=False)["input_ids"] for n in rows]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, ids in enumerate(encoded):
                input_ids[r, width - len(ids) :] = torch.tensor(ids)
                mask[r, width - len(ids) :] = 1
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits = model(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=1,
            ).logits[:, -1, :]
            logp = torch.log_softmax(logits.float(), dim=-1)[:, wanted]
            out[rows] = logp.cpu().numpy()
    return out


def listwise_scores(
    model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, batch_size: int = 8
) -> list[npt.NDArray[np.float32]]:
    """Per listwise prompt, the log-probability of each candidate's identifier as the first
    answer token, in the order of `prompt.items` (higher = ranked higher)."""
    if not prompts:
        return []
    width = max(len(p.items) for p in prompts)
    ids = verbalizer_ids(tokenizer, width)["identifiers"]
    texts = ["".join(render(p, tokenizer)[:2]) for p in prompts]
    logp = answer_logprobs(model, tokenizer, texts, ids, batch_size=batch_size)
    return [logp[n, : len(p.items)] for n, p in enumerate(prompts)]
