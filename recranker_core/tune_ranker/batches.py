"""Tokenized training examples, one prompt and its answer each (`Example`: SFT's, with ALRO's
answer slots and permuted twins or DMPO's negatives), and their right-padded batches (`collate`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from recranker_core.errors import ConfigError, DataError
from recranker_core.llm.builders import reorder_listwise
from recranker_core.llm.prompts import IDENTIFIERS, Catalog, Prompt
from recranker_core.llm.render import render, verbalizer_ids

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
    from recranker_core.llm.backbone import answer_token_ids

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
