"""LoRA instruction tuning of the ranker (docs/METHOD.md section 5): a plain loop over the task
mixture, gradient accumulation, periodic validation on fixed users, early stopping, and a
checkpoint after every validation so a crashed run resumes.

The loss is a function argument (`LossFn`), made per objective by `OBJECTIVES` (SFT, ALRO, DMPO)
from examples that `encode_for` tokenizes for it; the loop is the same for all three."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from recranker_core.config import TuneSettings
from recranker_core.errors import ConfigError, DataError
from recranker_core.ranker.objectives import (
    dmpo_loss,
    gather_answer_logps,
    permutation_sensitive_loss,
    single_token_answer_logps,
    soft_lambda_loss,
    to_original_order,
)
from recranker_core.ranker.prompts import (
    IDENTIFIERS,
    Catalog,
    Prompt,
    render,
    reorder_listwise,
    verbalizer_ids,
)

log = logging.getLogger(__name__)

IGNORE = -100  # label of prompt and padding tokens: no loss


@dataclass(frozen=True)
class Example:
    """One tokenized prompt + answer; `labels` is IGNORE outside the answer. The optional fields
    feed the ALRO and DMPO objectives and are empty for SFT."""

    input_ids: list[int]
    labels: list[int]
    task: str
    # ALRO, labelled listwise prompts: per answer slot, the index of the token whose next-token
    # distribution names that slot's candidate, and the ids of all shown identifiers there.
    slot_positions: tuple[int, ...] = ()
    slot_token_ids: tuple[tuple[int, ...], ...] = ()
    gains: tuple[float, ...] = ()  # 2^r - 1 per shown candidate, 0 for an unrated one
    # The same prompt with its candidates permuted (labels all IGNORE): it shows this example's
    # candidate permutation[j] at position j.
    twin: Example | None = None
    permutation: tuple[int, ...] = ()
    # DMPO: `input_ids` end at the answer position; the positive's identifier id, then the k
    # negatives', and their log-probabilities under the frozen reference.
    answer_ids: tuple[int, ...] = ()
    ref_logps: tuple[float, ...] = ()


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


@dataclass(frozen=True)
class SlotBatch:
    """ALRO's listwise rows of a batch: the rows of the L examples, then of their twins."""

    rows: Any  # torch.LongTensor [L] or [2L]: batch rows, the examples' first
    positions: Any  # [L or 2L, m] read positions (`Example.slot_positions`)
    token_ids: Any  # [L or 2L, m, n] identifier ids per slot
    gains: Any  # [L, n] float
    permutations: Any  # [L, n] the twins' permutations; [0, n] when there are no twins


@dataclass(frozen=True)
class Batch:
    input_ids: Any  # torch.LongTensor [B, T], right-padded; ALRO twins are extra rows at the end
    attention_mask: Any
    labels: Any
    tasks: list[str]
    slots: SlotBatch | None = None
    answer_ids: Any = None  # DMPO: [B, 1 + k]
    ref_logps: Any = None  # DMPO: [B, 1 + k] float, when every row has them


# A loss maps (model, batch) to a scalar tensor. SFT is the default; others share the loop.
LossFn = Callable[[Any, Batch], Any]
# Validation maps the model (LoRA applied) to metrics; "ndcg@10" decides early stopping.
ValidateFn = Callable[[Any], dict[str, float]]


def sft_loss(model: Any, batch: Batch | PackedBatch) -> Any:
    """Next-token cross-entropy on the answer tokens (the model shifts the labels); on packed
    rows, the cross-entropy of each answer token at the position the scorer reads it."""
    if isinstance(batch, PackedBatch):
        return packed_loss(model, batch)
    return model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
    ).loss


def packed_loss(model: Any, batch: PackedBatch) -> Any:
    """Mean cross-entropy of the answers of packed rows: one forward pass per batch, logits
    only at the answer columns."""
    import torch

    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.keep,
    ).logits
    read = logits[batch.rows, batch.columns].float()
    return torch.nn.functional.cross_entropy(read, batch.targets)


def sft_objective(settings: TuneSettings) -> LossFn:
    """RecRanker's default: the next-token loss on the answer."""
    return sft_loss


def alro_objective(settings: TuneSettings) -> LossFn:
    """ALRO (arXiv 2403.19181): lm + alro_sll_weight * Soft Lambda Loss over the listwise rows'
    answer slots + alro_psl_weight * the permutation-sensitive loss between each listwise row
    and its permuted twin. One forward pass gives the language-model loss and every slot."""

    def alro_loss(model: Any, batch: Batch) -> Any:
        import torch

        out = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        )
        slots = batch.slots
        if slots is None:
            return out.loss
        # Only the slot positions are read, so no [rows, tokens, vocab] copy of the logits.
        at = out.logits[slots.rows[:, None], slots.positions]
        reads = torch.arange(at.shape[1], device=at.device).expand(at.shape[0], -1)
        logps = gather_answer_logps(at, reads, slots.token_ids)
        lists = slots.gains.shape[0]
        loss = out.loss + settings.alro_sll_weight * soft_lambda_loss(
            logps[:lists],
            slots.gains,
            gamma=settings.alro_gamma,
            weights=settings.alro_rank_weights,
            pair_weights=settings.alro_pair_weights,
        )
        if slots.permutations.shape[0]:
            twins = to_original_order(logps[lists:], slots.permutations)
            loss = loss + settings.alro_psl_weight * permutation_sensitive_loss(
                logps[:lists], twins, kind=settings.alro_psl_kind, gamma=settings.alro_gamma
            )
        return loss

    return alro_loss


def dmpo_objective(settings: TuneSettings) -> LossFn:
    """DMPO (arXiv 2405.16127): the positive's identifier against k negatives' at the answer
    position, relative to the reference log-probabilities stored in the examples; one forward
    pass of the policy reads all 1 + k answers."""

    def dmpo_ranking_loss(model: Any, batch: Batch) -> Any:
        if batch.answer_ids is None or batch.ref_logps is None:
            raise DataError(
                "a DMPO batch needs each row's answer ids and reference log-probabilities: "
                "encode the prompts with encode_for(objective dmpo) and let tune() read the "
                "reference"
            )
        logp = single_token_answer_logps(
            model, batch.input_ids, batch.attention_mask, batch.answer_ids
        )
        ref = batch.ref_logps
        return dmpo_loss(
            logp[:, 0],
            logp[:, 1:],
            ref[:, 0],
            ref[:, 1:],
            settings.dmpo_beta,
            sft_weight=settings.dmpo_sft_weight,
        )

    return dmpo_ranking_loss


# Objective name -> the loss it trains with, made from the run's settings.
OBJECTIVES: dict[str, Callable[[TuneSettings], LossFn]] = {
    "sft": sft_objective,
    "alro": alro_objective,
    "dmpo": dmpo_objective,
}


def encode_examples(
    prompts: Sequence[Prompt], tokenizer: Any, max_length: int
) -> tuple[list[Example], int]:
    """Tokenize prompts with their answers (prompt and answer tokenized apart, so the answer's
    first token is exactly what the verbalizer reads at inference). Returns the examples and the
    number dropped for being longer than `max_length`."""
    examples, dropped = [], 0
    for p in prompts:
        encoded = _encode(p, tokenizer, max_length)
        if encoded is None:
            dropped += 1
            continue
        examples.append(Example(encoded[0] + encoded[1], _labels(*encoded), p.task))
    _warn_dropped(dropped, len(prompts), max_length)
    return examples, dropped


def _encode(prompt: Prompt, tokenizer: Any, max_length: int) -> tuple[list[int], list[int]] | None:
    """(prompt ids, answer ids), or None when together longer than `max_length`."""
    prefix, suffix, answer = render(prompt, tokenizer)
    prompt_ids = list(tokenizer(prefix + suffix, add_special_tokens=False)["input_ids"])
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if len(prompt_ids) + len(answer_ids) > max_length:
        return None
    return prompt_ids, answer_ids


def _labels(prompt_ids: list[int], answer_ids: list[int]) -> list[int]:
    return [IGNORE] * len(prompt_ids) + answer_ids


def _warn_dropped(dropped: int, total: int, max_length: int) -> None:
    if dropped:
        log.warning(
            "%d of %d prompts are longer than %d tokens and were left out "
            "(raise RECRANKER_TUNE__MAX_LENGTH or lower RECRANKER_PROMPTS__HISTORY_MAX)",
            dropped,
            total,
            max_length,
        )


def _identifier_ids(tokenizer: Any, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids of the first n identifiers at the answer's first slot (right after the generation
    prompt) and at later slots (after ", "): a byte-level BPE tokenizer reads "A" and " A" as
    different tokens."""
    from recranker_core.ranker.backbone import answer_token_ids

    first = tuple(verbalizer_ids(tokenizer, n)["identifiers"])
    later = answer_token_ids(tokenizer, IDENTIFIERS[:n], ", ")
    return first, tuple(later[c] for c in IDENTIFIERS[:n])


def _slotted(
    prompt: Prompt,
    tokenizer: Any,
    max_length: int,
    identifiers: tuple[tuple[int, ...], tuple[int, ...]],
    *,
    labelled: bool,
) -> Example | None:
    """A labelled listwise prompt with its answer slots and gains (labels IGNORE unless
    `labelled`: a twin adds no language-model loss); None when it is too long."""
    encoded = _encode(prompt, tokenizer, max_length)
    if encoded is None:
        return None
    prompt_ids, answer_ids = encoded
    first, later = identifiers
    ratings = prompt.label.get("ratings")
    if ratings is None or len(ratings) != len(prompt.items):
        raise DataError(
            f"the listwise prompt of user {prompt.user} has no ratings of its candidates in its "
            "label; rebuild the instruction dataset with this code (build_training_prompts)"
        )
    positions: list[int] = []
    at = -1
    for slot, name in enumerate(prompt.label["identifiers"]):
        want = (first if slot == 0 else later)[IDENTIFIERS.index(name)]
        # Slot 1 is the answer's first token; each later one follows ", " (one or two tokens).
        window = [0] if slot == 0 else [at + 2, at + 3]
        found = [j for j in window if j < len(answer_ids) and answer_ids[j] == want]
        if not found:
            raise ConfigError(
                f"the answer {prompt.answer!r} does not tokenize as one identifier token per slot "
                f"({tokenizer.convert_ids_to_tokens(answer_ids)}); ALRO reads each slot's "
                "identifier as one token: use a backbone whose tokenizer keeps them whole"
            )
        at = found[0]
        positions.append(len(prompt_ids) + at - 1)
    return Example(
        prompt_ids + answer_ids,
        _labels(prompt_ids, answer_ids)
        if labelled
        else [IGNORE] * (len(prompt_ids) + len(answer_ids)),
        prompt.task,
        slot_positions=tuple(positions),
        slot_token_ids=(first,) + (later,) * (len(positions) - 1),
        gains=tuple(2.0 ** float(r) - 1.0 for r in ratings),
    )


def encode_packed(
    prompts: Sequence[Prompt], tokenizer: Any, max_length: int
) -> tuple[list[PackedExample], int]:
    """The labelled prompts grouped by user and shared prefix (in first-seen order), one packed
    row each: the prefix tokens, each question's tokens, and the answer token the verbalizer
    scorer reads after it (a rating digit, Yes/No, or the first identifier of a listwise
    answer). A row longer than `max_length` keeps the questions that fit, in order. Returns
    the rows and the number of questions left out."""
    from recranker_core.ranker.prompts import NO, YES

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


def encode_for(
    prompts: Sequence[Prompt], tokenizer: Any, settings: TuneSettings, catalog: Catalog
) -> tuple[list[Any], int]:
    """The examples `settings.objective` trains on, and how many prompts were left out:
    SFT `encode_packed` (or `encode_examples` when not packed); ALRO `encode_alro_examples`;
    DMPO `encode_dmpo_examples`."""
    if settings.objective == "sft":
        if settings.packed:
            return encode_packed(prompts, tokenizer, settings.max_length)
        return encode_examples(prompts, tokenizer, settings.max_length)
    if settings.objective == "alro":
        return encode_alro_examples(
            prompts,
            tokenizer,
            settings.max_length,
            catalog,
            twins=settings.alro_psl_weight > 0,
            seed=settings.seed,
        )
    if settings.objective == "dmpo":
        return encode_dmpo_examples(
            prompts,
            tokenizer,
            settings.max_length,
            negatives=settings.dmpo_negatives,
            source=settings.dmpo_negative_source,
            seed=settings.seed,
        )
    raise ConfigError(
        f"RECRANKER_TUNE__OBJECTIVE={settings.objective!r}: use one of {', '.join(OBJECTIVES)}"
    )


def encode_alro_examples(
    prompts: Sequence[Prompt],
    tokenizer: Any,
    max_length: int,
    catalog: Catalog,
    *,
    twins: bool,
    seed: int,
) -> tuple[list[Example], int]:
    """Every prompt as for SFT; a labelled listwise prompt also carries its answer slots (where
    each identifier of the answer is read, and the shown identifiers' ids there), the graded
    gains of its candidates and, with `twins`, a twin: the same prompt with its candidates in a
    seeded random other order. Returns the examples and how many were left out for length."""
    examples: list[Example] = []
    dropped = 0
    identifiers: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for row, p in enumerate(prompts):
        if p.task != "listwise" or not p.label.get("order"):
            encoded = _encode(p, tokenizer, max_length)
            if encoded is None:
                dropped += 1
            else:
                examples.append(Example(encoded[0] + encoded[1], _labels(*encoded), p.task))
            continue
        n = len(p.items)
        if n not in identifiers:
            identifiers[n] = _identifier_ids(tokenizer, n)
        example = _slotted(p, tokenizer, max_length, identifiers[n], labelled=True)
        twin = None
        permutation: tuple[int, ...] = ()
        if example is not None and twins and n > 1:
            rng = np.random.default_rng([seed, row])
            perm = rng.permutation(n)
            while bool((perm == np.arange(n)).all()):
                perm = rng.permutation(n)
            permutation = tuple(int(j) for j in perm)
            twin_prompt = reorder_listwise(p, catalog, permutation)
            twin = _slotted(twin_prompt, tokenizer, max_length, identifiers[n], labelled=False)
            if twin is None:
                example = None
        if example is None:
            dropped += 1
            continue
        examples.append(replace(example, twin=twin, permutation=permutation))
    _warn_dropped(dropped, len(prompts), max_length)
    return examples, dropped


def encode_dmpo_examples(
    prompts: Sequence[Prompt],
    tokenizer: Any,
    max_length: int,
    *,
    negatives: int,
    source: str,
    seed: int,
) -> tuple[list[Example], int]:
    """DMPO's examples from the labelled listwise prompts (the others are not used): the prompt
    up to the answer position, the identifier of the label's first item as the positive and k
    shown candidates as negatives (`_negatives`). Returns the examples and how many listwise
    prompts were left out (too long, or fewer than k candidates to draw negatives from)."""
    if negatives < 1:
        raise ConfigError(f"RECRANKER_TUNE__DMPO_NEGATIVES must be 1 or more, not {negatives}")
    if source not in NEGATIVE_SOURCES:
        raise ConfigError(
            f"RECRANKER_TUNE__DMPO_NEGATIVE_SOURCE={source!r}: use one of "
            f"{', '.join(NEGATIVE_SOURCES)}"
        )
    examples: list[Example] = []
    too_long = too_few = listwise = 0
    identifiers: dict[int, tuple[int, ...]] = {}
    for row, p in enumerate(prompts):
        if p.task != "listwise" or not p.label.get("order"):
            continue
        listwise += 1
        prefix, suffix, _ = render(p, tokenizer)
        prompt_ids = list(tokenizer(prefix + suffix, add_special_tokens=False)["input_ids"])
        if len(prompt_ids) > max_length:
            too_long += 1
            continue
        positive = p.items.index(int(p.label["order"][0]))
        rng = np.random.default_rng([seed, row])
        chosen = _negatives(p, positive, negatives, source, rng)
        if chosen is None:
            too_few += 1
            continue
        n = len(p.items)
        if n not in identifiers:
            identifiers[n] = tuple(verbalizer_ids(tokenizer, n)["identifiers"])
        ids = identifiers[n]
        examples.append(
            Example(
                prompt_ids,
                [IGNORE] * len(prompt_ids),
                p.task,
                answer_ids=(ids[positive], *(ids[j] for j in chosen)),
            )
        )
    _warn_dropped(too_long, listwise, max_length)
    if too_few:
        log.warning(
            "%d of %d listwise prompts have fewer than %d %s candidates to use as DMPO negatives "
            "and were left out (lower RECRANKER_TUNE__DMPO_NEGATIVES or choose another "
            "RECRANKER_TUNE__DMPO_NEGATIVE_SOURCE)",
            too_few,
            listwise,
            negatives,
            source,
        )
    log.info("DMPO: %d examples from %d listwise prompts", len(examples), listwise)
    return examples, too_long + too_few


NEGATIVE_SOURCES = ("unseen", "low_rated", "hard")


def _negatives(
    prompt: Prompt, positive: int, k: int, source: str, rng: np.random.Generator
) -> list[int] | None:
    """Positions of k negatives among the shown candidates, or None when there are fewer.

    Only candidates worse than the positive qualify: unrated ones (never interacted with) and
    those rated below it. A held-out like rated as high as the positive is not a negative: the
    label orders equal ratings at random, so preferring one over the other teaches nothing.
    - unseen: k unrated candidates at random;
    - low_rated: the rated ones lowest first (equal ratings at random), then unrated at random;
    - hard: the base model's highest-ranked (the hint's order) among all that qualify."""
    ratings = prompt.label.get("ratings")
    if ratings is None or len(ratings) != len(prompt.items):
        raise DataError(
            f"the listwise prompt of user {prompt.user} has no ratings of its candidates in its "
            "label; rebuild the instruction dataset with this code (build_training_prompts)"
        )
    top = float(ratings[positive])
    unrated = [j for j, r in enumerate(ratings) if r <= 0]
    lower = [j for j, r in enumerate(ratings) if 0 < r < top and j != positive]
    if len(unrated) + (0 if source == "unseen" else len(lower)) < k:
        return None
    if source == "unseen":
        return [unrated[j] for j in rng.choice(len(unrated), k, replace=False)]
    if source == "low_rated":
        ties = rng.random(len(ratings))
        ranked = sorted(lower, key=lambda j: (ratings[j], ties[j]))
        return (ranked + [unrated[j] for j in rng.permutation(len(unrated))])[:k]
    where = {item: r for r, item in enumerate(prompt.hint["order"])}
    eligible = set(lower) | set(unrated)
    return sorted(eligible, key=lambda j: where[prompt.items[j]])[:k]


def collate(examples: Sequence[Example], pad_id: int, device: Any) -> Batch:
    """Right-padded tensors of `examples`, their ALRO twins appended as extra rows, with the ALRO
    slots and the DMPO answers of the rows that have them."""
    import torch

    rows = [*examples, *(e.twin for e in examples if e.twin is not None)]
    width = max(len(e.input_ids) for e in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, e in enumerate(rows):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
    answer_ids = ref_logps = None
    if any(e.answer_ids for e in examples):
        if len({len(e.answer_ids) for e in examples}) != 1:
            raise DataError(
                "DMPO rows of one batch must each have the positive and the same number of "
                "negatives; encode them with one setting of RECRANKER_TUNE__DMPO_NEGATIVES"
            )
        answer_ids = torch.tensor([e.answer_ids for e in examples], dtype=torch.long).to(device)
        if all(e.ref_logps for e in examples):
            ref_logps = torch.tensor([e.ref_logps for e in examples], dtype=torch.float32)
            ref_logps = ref_logps.to(device)
    return Batch(
        ids.to(device),
        mask.to(device),
        labels.to(device),
        [e.task for e in rows],
        _slot_batch(examples, device),
        answer_ids,
        ref_logps,
    )


def _slot_batch(examples: Sequence[Example], device: Any) -> SlotBatch | None:
    import torch

    listed = [r for r, e in enumerate(examples) if e.slot_positions]
    if not listed:
        return None
    shapes = {(len(examples[r].slot_positions), len(examples[r].gains)) for r in listed}
    with_twin = {examples[r].twin is not None for r in listed}
    if len(shapes) > 1 or len(with_twin) > 1:
        raise DataError(
            f"the listwise rows of one batch differ in (answer slots, candidates) {sorted(shapes)} "
            "or in having a permuted twin; ALRO needs equal lists (PromptSettings.listwise_top "
            "of listwise_candidates)"
        )
    twin_row: dict[int, int] = {}
    for r, e in enumerate(examples):
        if e.twin is not None:
            twin_row[r] = len(examples) + len(twin_row)
    members = [examples[r] for r in listed]
    rows = list(listed)
    if twin_row:
        twins = [e.twin for e in members if e.twin is not None]
        if any(len(t.slot_positions) != len(members[0].slot_positions) for t in twins):
            raise DataError("an ALRO twin must have as many answer slots as its original")
        members += twins
        rows += [twin_row[r] for r in listed]
    n = len(examples[listed[0]].gains)
    perms = [examples[r].permutation for r in listed] if twin_row else []
    return SlotBatch(
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        positions=torch.tensor([e.slot_positions for e in members], dtype=torch.long).to(device),
        token_ids=torch.tensor([e.slot_token_ids for e in members], dtype=torch.long).to(device),
        gains=torch.tensor([examples[r].gains for r in listed], dtype=torch.float32).to(device),
        permutations=torch.tensor(perms, dtype=torch.long).reshape(len(perms), n).to(device),
    )


@dataclass
class TuneResult:
    adapter_dir: Path  # the best adapter (peft save_pretrained)
    best_step: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    steps: int
    seconds: float
    train_tokens: int
    resumed_from: int | None = None
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.train_tokens / self.seconds if self.seconds else 0.0


def apply_lora(model: Any, settings: TuneSettings) -> Any:
    """Wrap the backbone with fresh LoRA weights (the backbone stays frozen)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in settings.target_modules if m not in present]
    if missing:
        raise ConfigError(
            f"RECRANKER_TUNE__TARGET_MODULES names {missing}, which this backbone does not have "
            f"(it has e.g. {sorted(present)[:12]})"
        )
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def tune(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    validate: ValidateFn,
    settings: TuneSettings,
    work_dir: Path,
    *,
    loss_fn: LossFn = sft_loss,
    max_steps: int | None = None,
    progress: bool = True,
    init_adapter: Path | None = None,
    select: str = "ndcg@10",
) -> TuneResult:
    """Tune LoRA weights on `examples` (`Example`s, or `PackedExample` rows); returns where the
    best adapter (by the validation metric `select`, e.g. the fused NDCG@3) was saved.
    `work_dir` holds `checkpoint/` (resumed from when its fingerprint matches: same data,
    settings, backbone, loss and starting adapter) and `best/`.

    `init_adapter` (a peft adapter directory, e.g. the SFT adapter DMPO starts from) is loaded
    trainable instead of fresh LoRA weights; its own LoRA configuration then applies. DMPO
    examples without reference log-probabilities get them from the starting model (that adapter,
    else the bare backbone) before the first step: the frozen reference is where tuning starts.
    """
    import torch
    from tqdm.auto import tqdm

    if not examples:
        raise DataError("no training examples: the sampled users gave no prompts")
    torch.manual_seed(settings.seed)
    fingerprint = _fingerprint(examples, settings, model, loss_fn, init_adapter)
    peft_model = start_adapter(model, settings, init_adapter)
    device = next(peft_model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if any(getattr(e, "answer_ids", None) and not e.ref_logps for e in examples):
        examples = reference_logps(peft_model, examples, pad_id, settings.batch_size)
    if device.type == "cuda":
        # Activations dominate memory on a GPU; recomputing them costs ~30% more time.
        peft_model.gradient_checkpointing_enable()
        peft_model.enable_input_require_grads()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.lr)
    micro = settings.batch_size
    per_epoch = math.ceil(len(examples) / micro)
    # The last step of an epoch may accumulate fewer micro-batches: epochs stay whole.
    total_steps = math.ceil(per_epoch / settings.grad_accumulation) * settings.epochs
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, settings.warmup_steps))
    )

    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = work_dir / "checkpoint" / "state.pt"
    best_dir = work_dir / "best"
    state: dict[str, Any] = {
        "step": 0,
        "micro": 0,  # micro-batches consumed in total
        "pending": 0,  # micro-batches accumulated since the last optimizer step
        "best": -math.inf,
        "best_step": 0,
        "best_metrics": {},
        "bad_evals": 0,
        "history": [],
        "tokens": 0,
    }
    resumed_from = None
    saved: dict[str, Any] = {}
    if checkpoint.exists():
        import pickle

        try:
            # Tensors and plain values only: a checkpoint never needs more, so nothing in it runs.
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            log.warning("checkpoint %s cannot be read safely (%s); starting over", checkpoint, exc)
    if saved:
        if saved.get("fingerprint") == fingerprint:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(peft_model, saved["lora"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state = saved["state"]
            resumed_from = state["step"]
            log.info("resuming from step %d (%s)", resumed_from, checkpoint)
        else:
            log.warning("checkpoint %s is for other data or settings; starting over", checkpoint)

    def evaluate() -> bool:
        """Validate, keep the best adapter, checkpoint; True when it is time to stop."""
        peft_model.eval()
        metrics = validate(peft_model)
        peft_model.train()
        score = metrics.get(select, -math.inf)
        state["history"].append({"step": state["step"], **metrics})
        if score > state["best"]:
            state.update(best=score, best_step=state["step"], best_metrics=metrics, bad_evals=0)
            _save_adapter(peft_model, best_dir)
        else:
            state["bad_evals"] += 1
        log.info(
            "step %d: validation %s (best %s %.4f at step %d)",
            state["step"],
            ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
            select,
            state["best"],
            state["best_step"],
        )
        _save_checkpoint(checkpoint, fingerprint, peft_model, optimizer, scheduler, state)
        return bool(state["bad_evals"] >= settings.patience)

    started = time.perf_counter()
    if resumed_from is None:
        evaluate()  # the untuned backbone is the baseline every adapter must beat
    peft_model.train()
    bar = tqdm(
        total=total_steps, initial=state["step"], desc="tuning", unit="step", disable=not progress
    )
    stopped = False
    losses: list[float] = []
    while state["step"] < total_steps and not stopped:
        epoch, offset = divmod(state["micro"], per_epoch)
        order = np.random.default_rng(settings.seed + epoch).permutation(len(examples))
        batch_rows = order[offset * micro : (offset + 1) * micro]
        chosen = [examples[r] for r in batch_rows]
        if isinstance(chosen[0], PackedExample):
            batch: Any = collate_packed(chosen, pad_id, device)
            state["tokens"] += batch.tokens
        else:
            batch = collate(chosen, pad_id, device)
            state["tokens"] += int(batch.attention_mask.sum())
        loss = loss_fn(peft_model, batch) / settings.grad_accumulation
        loss.backward()
        losses.append(float(loss.detach()) * settings.grad_accumulation)
        state["micro"] += 1
        state["pending"] += 1
        if state["pending"] < settings.grad_accumulation and offset + 1 < per_epoch:
            continue
        state["pending"] = 0
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", epoch=epoch)
        log.debug("step %d loss %.4f", state["step"], np.mean(losses))
        losses.clear()
        if state["step"] % settings.eval_every == 0 or state["step"] == total_steps:
            stopped = evaluate()
    bar.close()
    seconds = time.perf_counter() - started
    if not best_dir.exists():  # only possible when resumed after the best was lost
        _save_adapter(peft_model, best_dir)
    return TuneResult(
        adapter_dir=best_dir,
        best_step=state["best_step"],
        best_metrics=state["best_metrics"],
        history=state["history"],
        steps=state["step"],
        seconds=seconds,
        train_tokens=state["tokens"],
        resumed_from=resumed_from,
        stopped_early=stopped,
        extra={"init_adapter": str(init_adapter)} if init_adapter is not None else {},
    )


def start_adapter(model: Any, settings: TuneSettings, init_adapter: Path | None) -> Any:
    """The trainable peft model a run starts from: `init_adapter` loaded trainable, or fresh
    LoRA weights (`apply_lora`). Under DMPO every dropout is off (`_without_dropout`)."""
    if init_adapter is None:
        peft_model = apply_lora(model, settings)
    else:
        from peft import PeftModel

        if not (init_adapter / "adapter_config.json").is_file():
            raise ConfigError(
                f"{init_adapter} is not a peft adapter directory (no adapter_config.json); point "
                "it at a tuned adapter, e.g. the SFT adapter from `recranker tune --objective sft`"
            )
        peft_model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    if settings.objective == "dmpo":
        _without_dropout(peft_model)
    return peft_model


def _without_dropout(model: Any) -> None:
    """Turn off every dropout of `model` in place: the LoRA dropout (the SFT adapter brings its
    own, whatever RECRANKER_TUNE__LORA_DROPOUT says) and any of the backbone's. DMPO's margin is
    h = log pi - log pi_ref with the reference read in eval mode; a policy trained with dropout
    would start at h != 0 and learn against its own noise (TRL's DPO trainer disables dropout
    for the same reason)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        # Attention dropout is a float that the attention function reads while training.
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def reference_logps(
    model: Any, examples: Sequence[Example], pad_id: int, batch_size: int
) -> list[Example]:
    """`examples` with the log-probabilities of their DMPO answers under `model` as it is now,
    read without gradients and in eval mode (no dropout): the frozen reference of DMPO."""
    import torch

    need = [r for r, e in enumerate(examples) if e.answer_ids and not e.ref_logps]
    out = list(examples)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(need), batch_size):
            rows = need[start : start + batch_size]
            batch = collate([examples[r] for r in rows], pad_id, device)
            logps = single_token_answer_logps(
                model, batch.input_ids, batch.attention_mask, batch.answer_ids
            )
            for r, values in zip(rows, logps.tolist(), strict=True):
                out[r] = replace(examples[r], ref_logps=tuple(float(v) for v in values))
    model.train(was_training)
    log.info("reference log-probabilities of %d DMPO examples read", len(need))
    return out


def _save_adapter(peft_model: Any, directory: Path) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    peft_model.save_pretrained(tmp)
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    tmp.rename(directory)


def _save_checkpoint(
    path: Path, fingerprint: str, peft_model: Any, optimizer: Any, scheduler: Any, state: Any
) -> None:
    import torch
    from peft import get_peft_model_state_dict

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "fingerprint": fingerprint,
            "lora": get_peft_model_state_dict(peft_model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": state,
        },
        tmp,
    )
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint


_NOT_TRAJECTORY = ("profile", "guard_users")


def _fingerprint(
    examples: Sequence[Any],
    settings: TuneSettings,
    model: Any,
    loss_fn: LossFn,
    init_adapter: Path | None = None,
) -> str:
    digest = hashlib.sha256()
    for e in examples:
        if isinstance(e, PackedExample):
            digest.update(json.dumps([e.prefix, e.suffixes, e.answers]).encode())
            continue
        _digest_example(digest, e)
        if e.twin is not None:
            _digest_example(digest, e.twin)
    # Settings read only after training (the guard's users) or only as a label (the profile,
    # already laid over the others) do not change what a step computes: changing them must not
    # throw away an hour of checkpointed CPU training.
    trajectory = settings.model_dump(mode="json", exclude=set(_NOT_TRAJECTORY))
    digest.update(json.dumps(trajectory, sort_keys=True).encode())
    digest.update(str(getattr(model.config, "_name_or_path", "")).encode())
    digest.update(getattr(loss_fn, "__name__", repr(loss_fn)).encode())
    if init_adapter is not None:
        digest.update(_adapter_hash(init_adapter).encode())
    return digest.hexdigest()


def _digest_example(digest: Any, e: Example) -> None:
    digest.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
    digest.update(np.asarray(e.labels, dtype=np.int64).tobytes())
    optional = (e.slot_positions, e.slot_token_ids, e.gains, e.permutation, e.answer_ids)
    if any(optional) or e.ref_logps:
        digest.update(json.dumps([*optional, e.ref_logps]).encode())


def _adapter_hash(directory: Path) -> str:
    """sha256 over the files that make an adapter (its config and weights)."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("adapter_*")):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
