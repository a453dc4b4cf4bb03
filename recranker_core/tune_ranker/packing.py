"""Packed SFT rows in the scorer's layout (docs/METHOD.md section 5): one row per user and cut,
the shared prefix once and every question under the scorer's 4D mask (`encode_packed`,
`collate_packed`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from recranker_core.errors import DataError
from recranker_core.llm.prompts import IDENTIFIERS, Prompt
from recranker_core.llm.render import render, verbalizer_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackedExample:
    """One user's prompts at one cut in the inference layout (docs/METHOD.md section 5): the
    shared prefix once, then every question side by side, each seeing the prefix and itself
    (the scorer's mask); `answers[j]` is the token the scorer reads after question j."""

    prefix: tuple[int, ...]
    suffixes: tuple[tuple[int, ...], ...]
    answers: tuple[int, ...]
    tasks: tuple[str, ...]
    task: str = "packed"

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(len(s) for s in self.suffixes)


@dataclass(frozen=True)
class PackedBatch:
    """Right-padded packed rows with their 4D additive mask and the answers to read."""

    input_ids: Any  # [B, T]
    attention_mask: Any  # [B, 1, T, T] additive (0 = may attend, dtype min = may not)
    position_ids: Any  # [B, T]
    keep: Any  # [K] the columns whose logits are computed (union of answer columns)
    rows: Any  # [A] row of each answer
    columns: Any  # [A] index into `keep` of each answer
    targets: Any  # [A] answer token ids
    tokens: int  # real tokens in the batch
    tasks: list[str]


def encode_packed(
    prompts: Sequence[Prompt], tokenizer: Any, max_length: int
) -> tuple[list[PackedExample], int]:
    """The labelled prompts grouped by user and shared prefix (in first-seen order), one packed
    row each: the prefix tokens, each question's tokens, and the answer token the verbalizer
    scorer reads after it (a rating digit, Yes/No, or the first identifier of a listwise
    answer). A row longer than `max_length` keeps the questions that fit, in order. Returns
    the rows and the number of questions left out."""
    from recranker_core.llm.prompts import NO, YES

    groups: dict[tuple[int, str], list[tuple[str, str, int]]] = {}
    prefixes: dict[tuple[int, str], str] = {}
    ids_for: dict[int, dict[str, list[int]]] = {}
    for p in prompts:
        if not p.answer:
            continue
        prefix_text, suffix_text, _ = render(p, tokenizer)
        n = len(p.items) if p.task == "listwise" else 0
        if n not in ids_for:
            ids_for[n] = verbalizer_ids(tokenizer, n)
        ids = ids_for[n]
        if p.task == "pointwise":
            answer = ids["rating"][int(p.answer) - 1]
        elif p.task == "pairwise":
            answer = ids["pairwise"][0 if p.answer == YES else 1]
            if p.answer not in (YES, NO):
                raise DataError(f"a pairwise answer must be {YES} or {NO}, not {p.answer!r}")
        else:
            answer = ids["identifiers"][IDENTIFIERS.index(p.answer.split(",")[0].strip())]
        key = (p.user, prefix_text)
        prefixes[key] = prefix_text
        groups.setdefault(key, []).append((suffix_text, p.task, answer))
    rows: list[PackedExample] = []
    dropped = 0
    for key, questions in groups.items():
        prefix = list(tokenizer(prefixes[key], add_special_tokens=False)["input_ids"])
        suffixes = tokenizer([q[0] for q in questions], add_special_tokens=False)["input_ids"]
        kept: list[int] = []
        size = len(prefix)
        for j, suffix in enumerate(suffixes):
            if size + len(suffix) > max_length:
                continue
            kept.append(j)
            size += len(suffix)
        dropped += len(questions) - len(kept)
        if not kept:
            continue
        rows.append(
            PackedExample(
                tuple(prefix),
                tuple(tuple(suffixes[j]) for j in kept),
                tuple(questions[j][2] for j in kept),
                tuple(questions[j][1] for j in kept),
            )
        )
    if dropped:
        log.warning(
            "%d questions did not fit in %d tokens with their prefix and were left out "
            "(raise RECRANKER_TUNE__MAX_LENGTH or lower RECRANKER_PROMPTS__HISTORY_MAX)",
            dropped,
            max_length,
        )
    return rows, dropped


def collate_packed(examples: Sequence[PackedExample], pad_id: int, device: Any) -> PackedBatch:
    """Packed rows right-padded to one width, with the mask that lets each question see its
    prefix and itself only (padding sees itself), positions that restart after the prefix for
    every question, and where each answer is read."""
    import torch

    width = max(e.length for e in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    positions = np.zeros((len(examples), width), dtype=np.int64)
    segment = np.full((len(examples), width), -1, dtype=np.int64)
    reads: list[tuple[int, int, int]] = []
    for r, e in enumerate(examples):
        p = len(e.prefix)
        ids[r, :p] = e.prefix
        positions[r, :p] = np.arange(p)
        segment[r, :p] = 0
        at = p
        for j, (suffix, answer) in enumerate(zip(e.suffixes, e.answers, strict=True)):
            ids[r, at : at + len(suffix)] = suffix
            positions[r, at : at + len(suffix)] = p + np.arange(len(suffix))
            segment[r, at : at + len(suffix)] = j + 1
            at += len(suffix)
            reads.append((r, at - 1, answer))
    real = segment >= 0
    key_ok = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
    allowed = key_ok & real[:, None, :] & real[:, :, None] & np.tri(width, dtype=bool)[None]
    allowed |= np.eye(width, dtype=bool)[None] & ~real[:, :, None]  # padding sees itself
    dtype = torch.float32
    mask = torch.zeros((len(examples), 1, width, width), dtype=dtype)
    mask.masked_fill_(~torch.from_numpy(allowed)[:, None], torch.finfo(dtype).min)
    keep = sorted({c for _, c, _ in reads})
    index = {c: n for n, c in enumerate(keep)}
    return PackedBatch(
        input_ids=torch.from_numpy(ids).to(device),
        attention_mask=mask.to(device),
        position_ids=torch.from_numpy(positions).to(device),
        keep=torch.tensor(keep, dtype=torch.long, device=device),
        rows=torch.tensor([r for r, _, _ in reads], dtype=torch.long, device=device),
        columns=torch.tensor([index[c] for _, c, _ in reads], dtype=torch.long, device=device),
        targets=torch.tensor([a for _, _, a in reads], dtype=torch.long, device=device),
        tokens=int(real.sum()),
        tasks=[t for e in examples for t in e.tasks],
    )
