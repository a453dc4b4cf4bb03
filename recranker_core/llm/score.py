"""Scoring without generation (docs/METHOD.md section 6): read each answer as the next-token
log-probabilities at the answer position, one forward pass per prompt, with the history prefix
that a user's prompts share computed once and its key/value cache reused for every question."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from recranker_core.errors import ConfigError, DataError
from recranker_core.llm.prompts import RATING_MAX, RATING_MIN, TASKS, Prompt
from recranker_core.llm.render import render, verbalizer_ids

_RATINGS = np.arange(RATING_MIN, RATING_MAX + 1, dtype=np.float64)


@dataclass
class UserScores:
    """One user's verbalizer scores, one entry per candidate in the order given."""

    user: int
    candidates: list[int]  # item indices, in base-rank order (as given)
    # Expected rating sum_r r * p(r), p renormalised over "1".."5"; nan without a prompt.
    pointwise: npt.NDArray[np.float64]
    # Mean over the candidate's pairs of pref(c over o), where a pair asked in both orders gives
    # pref(x over y) = ((lpYes - lpNo)[x first] - (lpYes - lpNo)[y first]) / 2; 0 without a pair.
    pairwise: npt.NDArray[np.float64]
    # log p(identifier of c) at the first answer slot, renormalised over the candidates' ids;
    # nan without a listwise prompt.
    listwise: npt.NDArray[np.float64]
    prompts: int  # prompts read for this user
    prompt_tokens: int  # tokens run through the model for this user (a shared prefix once)


def score_users(
    model: Any,
    tokenizer: Any,
    user_prompts: Sequence[tuple[int, list[int], list[Prompt]]],
    *,
    tasks: Sequence[str] = TASKS,
    batch_size: int = 32,
    prefix_cache: bool = True,
) -> list[UserScores]:
    """Scores of every (user, candidates, prompts) entry, in order; only prompts whose task is in
    `tasks` are read (the single-task ablations).

    With `prefix_cache` each distinct prefix (one per user from `build_inference_prompts`) is run
    once and its key/value cache serves all of its suffixes, `batch_size` rows per forward pass
    (several users' prefixes share a pass when their questions fit in one batch). Without it every
    full prompt is run on its own row through `answer_logprobs`: the reference the cached path
    must equal.
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ConfigError(f"tasks must be a non-empty subset of {list(TASKS)}, not {list(tasks)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
    plans = [_plan(user, cands, prompts, set(tasks)) for user, cands, prompts in user_prompts]
    width = max(
        (len(p.items) for plan in plans for p in plan.prompts if p.task == "listwise"), default=0
    )
    ids = verbalizer_ids(tokenizer, width)
    columns = _Columns(len(ids["rating"]), len(ids["pairwise"]))
    wanted = [*ids["rating"], *ids["pairwise"], *ids["identifiers"]]

    units = _units(plans, tokenizer)
    if prefix_cache:
        logps = _cached_logprobs(model, tokenizer, units, wanted, batch_size)
        for unit in units:
            plans[unit.plan].tokens += len(unit.prefix) + sum(len(s) for s in unit.suffixes)
    else:
        texts = [unit.prefix_text + suffix for unit in units for suffix in unit.suffix_texts]
        flat = answer_logprobs(model, tokenizer, texts, wanted, batch_size=batch_size).astype(
            np.float64
        )
        logps = []
        start = 0
        for unit in units:
            logps.append(flat[start : start + len(unit.rows)])
            start += len(unit.rows)
            plans[unit.plan].tokens += sum(len(unit.prefix) + len(s) for s in unit.suffixes)

    per_prompt: list[npt.NDArray[np.float64]] = [
        np.empty((len(plan.prompts), len(wanted))) for plan in plans
    ]
    for unit, logp in zip(units, logps, strict=True):
        per_prompt[unit.plan][unit.rows] = logp
    return [_collect(plan, rows, columns) for plan, rows in zip(plans, per_prompt, strict=True)]


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
    pad_id = _pad_id(tokenizer)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            encoded = _encode(tokenizer, [texts[n] for n in rows])
            input_ids, mask = _left_pad(encoded, pad_id, device)
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits = model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
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


# --- planning: which prompts, which shared prefixes -------------------------------------------


@dataclass
class _Plan:
    user: int
    candidates: list[int]
    prompts: list[Prompt]
    tokens: int = 0


@dataclass
class _Unit:
    """The prompts of one plan that share one prefix text: the prefix is run once for all."""

    plan: int
    prefix_text: str
    prefix: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # prompt positions within the plan
    suffix_texts: list[str] = field(default_factory=list)
    suffixes: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True)
class _Columns:
    """Where each task's token ids sit among the columns read at the answer position."""

    ratings: int
    pairwise: int

    @property
    def yes(self) -> int:
        return self.ratings

    @property
    def no(self) -> int:
        return self.ratings + 1

    @property
    def identifiers(self) -> int:
        return self.ratings + self.pairwise


def _plan(user: int, candidates: list[int], prompts: list[Prompt], tasks: set[str]) -> _Plan:
    cands = [int(c) for c in candidates]
    if len(set(cands)) != len(cands):
        raise DataError(f"user {user}: candidates hold duplicates {cands}; pass each item once")
    known = set(cands)
    chosen: list[Prompt] = []
    for prompt in prompts:
        if prompt.user != user:
            raise DataError(
                f"a prompt of user {prompt.user} was passed with user {user}'s candidates; "
                "pass each user's own build_inference_prompts output"
            )
        if prompt.task not in TASKS:
            raise DataError(f"user {user}: a prompt has the unknown task {prompt.task!r}")
        stray = [i for i in prompt.items if i not in known]
        if stray:
            raise DataError(
                f"user {user}: a {prompt.task} prompt shows items {stray} that are not among the "
                f"candidates {cands}; build the prompts from the same candidate list"
            )
        if prompt.task in tasks:
            chosen.append(prompt)
    return _Plan(user=int(user), candidates=cands, prompts=chosen)


def _units(plans: list[_Plan], tokenizer: Any) -> list[_Unit]:
    """Each plan's prompts grouped by rendered prefix (one group for build_inference_prompts),
    prefix and suffixes tokenized apart: render cuts the text at a token boundary."""
    units: list[_Unit] = []
    for index, plan in enumerate(plans):
        by_prefix: dict[str, _Unit] = {}
        for row, prompt in enumerate(plan.prompts):
            prefix_text, suffix_text, _ = render(prompt, tokenizer)
            unit = by_prefix.get(prefix_text)
            if unit is None:
                unit = by_prefix[prefix_text] = _Unit(plan=index, prefix_text=prefix_text)
                units.append(unit)
            unit.rows.append(row)
            unit.suffix_texts.append(suffix_text)
    for unit in units:
        unit.prefix = _encode(tokenizer, [unit.prefix_text])[0]
        unit.suffixes = _encode(tokenizer, unit.suffix_texts)
    return units


# --- the forward passes -----------------------------------------------------------------------


def _cached_logprobs(
    model: Any, tokenizer: Any, units: list[_Unit], wanted: list[int], batch_size: int
) -> list[npt.NDArray[np.float64]]:
    """Per unit, log p(wanted | prefix + suffix) for each suffix: [len(suffixes), len(wanted)].

    Units are taken in groups whose suffixes fit one batch (or one unit at a time): the group's
    prefixes run left-padded in one pass, then all of the group's suffixes run in one more pass,
    packed: each unit's suffixes side by side in one row (several rows when they exceed
    _PACK_TOKENS) that reads its prefix's cache once, with a 4D mask that lets each suffix see its
    prefix and itself only. Its positions continue from its prefix's real length, so neither
    packing nor padding changes a score. Packing matters when questions are short next to the
    prefix (template rr-2): one row per user instead of one copy of the prefix's cache per
    question.
    """
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    columns = torch.tensor(wanted, device=device)
    pad_id = _pad_id(tokenizer)
    out = [np.empty((len(u.suffixes), len(wanted))) for u in units]
    # Longest prefixes together: a group's prefix padding stays small.
    order = sorted(range(len(units)), key=lambda n: -len(units[n].prefix))
    with torch.inference_mode():
        for group in _groups(order, units, batch_size):
            prefix_ids, prefix_mask = _left_pad([units[n].prefix for n in group], pad_id, device)
            prefix_len = prefix_mask.sum(dim=1)
            cache = DynamicCache(config=model.config)
            model(
                input_ids=prefix_ids,
                attention_mask=prefix_mask,
                position_ids=(prefix_mask.cumsum(dim=1) - 1).clamp(min=0),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            layers = _prefix_states(cache)
            rows = _pack_rows([units[n].suffixes for n in group])
            packed = _packed_suffixes(
                [[units[group[g]].suffixes[s] for s in picked] for g, picked in rows],
                [int(prefix_len[g]) for g, _ in rows],
                pad_id,
            )
            owner = torch.tensor([g for g, _ in rows], device=device)
            # A forward pass appends to the cache it is given: the rows get their own, built
            # from the prefix rows they read.
            row_cache = DynamicCache(
                ddp_cache_data=[(k[owner], v[owner]) for k, v in layers], config=model.config
            )
            allowed = torch.cat(
                [
                    prefix_mask[owner][:, None, None, :].bool().expand(-1, 1, packed.width, -1),
                    torch.from_numpy(packed.allowed).to(device)[:, None],
                ],
                dim=-1,
            )
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            mask.masked_fill_(~allowed, torch.finfo(dtype).min)
            logits = model(
                input_ids=torch.from_numpy(packed.ids).to(device),
                attention_mask=mask,
                position_ids=torch.from_numpy(packed.positions).to(device),
                past_key_values=row_cache,
                use_cache=True,
                logits_to_keep=torch.from_numpy(packed.ends).to(device),
            ).logits
            row_of = torch.tensor([r for r, at in enumerate(packed.at) for _ in at], device=device)
            end_of = torch.tensor([e for at in packed.at for e in at], device=device)
            read = torch.log_softmax(logits[row_of, end_of].float(), dim=-1)[:, columns]
            logp = iter(read.double().cpu().numpy())
            for g, picked in rows:
                for s in picked:
                    out[group[g]][s] = next(logp)
    return out


# Most question tokens packed in one row. Each packed token attends over the whole row (masked
# scores still cost), so a row of Q question tokens does Q x (prefix + Q) attention work where
# unpacked rows did Q x (prefix + one question): 256 keeps that overhead small next to a prefix
# of about a thousand tokens and still fits rr-2's 21 questions (about 190 tokens) in one row;
# rr-1's long questions go about four to a row.
_PACK_TOKENS = 256


def _pack_rows(suffixes: list[list[list[int]]]) -> list[tuple[int, list[int]]]:
    """(unit position in the group, its suffix indices) per packed row: a unit's suffixes in
    order, a new row where the next one would pass _PACK_TOKENS (a longer one alone)."""
    rows: list[tuple[int, list[int]]] = []
    for g, unit in enumerate(suffixes):
        current: list[int] = []
        size = 0
        for s, suffix in enumerate(unit):
            if current and size + len(suffix) > _PACK_TOKENS:
                rows.append((g, current))
                current, size = [], 0
            current.append(s)
            size += len(suffix)
        if current:
            rows.append((g, current))
    return rows


@dataclass
class _Packed:
    ids: npt.NDArray[np.int64]  # [rows, width]
    positions: npt.NDArray[np.int64]  # [rows, width]
    allowed: npt.NDArray[np.bool_]  # [rows, width, width]: query may attend to key
    ends: npt.NDArray[np.int64]  # [columns]: every column where some row's suffix ends
    at: list[list[int]]  # per row, per suffix: its index into `ends`

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])


def _packed_suffixes(rows: list[list[list[int]]], prefix_lens: list[int], pad_id: int) -> _Packed:
    """Each row's suffixes side by side, rows left-padded to one width. A real token sees the
    real tokens of its own suffix up to itself; padding sees none (it still sees its prefix, so
    no attention row is empty) and no token sees padding. `ends` is the union of the columns
    where answers are read: the model's logits_to_keep."""
    width = max(sum(len(suffix) for suffix in row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    segment = np.full((len(rows), width), -1, dtype=np.int64)
    row_ends: list[list[int]] = []
    for r, row in enumerate(rows):
        positions[r] = prefix_lens[r]
        at = width - sum(len(suffix) for suffix in row)
        row_ends.append([])
        for i, suffix in enumerate(row):
            ids[r, at : at + len(suffix)] = suffix
            positions[r, at : at + len(suffix)] = prefix_lens[r] + np.arange(len(suffix))
            segment[r, at : at + len(suffix)] = i
            at += len(suffix)
            row_ends[-1].append(at - 1)
    real = segment >= 0
    same = (segment[:, :, None] == segment[:, None, :]) & real[:, :, None]
    allowed = same & np.tri(width, dtype=bool)[None]
    ends = np.array(sorted({e for row in row_ends for e in row}), dtype=np.int64)
    index = {int(e): n for n, e in enumerate(ends)}
    return _Packed(ids, positions, allowed, ends, [[index[e] for e in row] for row in row_ends])


def _prefix_states(cache: Any) -> list[tuple[Any, Any]]:
    """(keys, values) of every layer of a cache filled by a prefix pass."""
    from transformers.cache_utils import DynamicLayer

    states = []
    for layer in cache.layers:
        # A sliding window keeps only the last tokens, a linear-attention layer a state: neither
        # can be copied row by row next to a padding mask of the whole prefix.
        if not isinstance(layer, DynamicLayer) or layer.is_sliding or layer.keys is None:
            raise ConfigError(
                f"the backbone's cache layer {type(layer).__name__} is not a full-attention "
                "key/value cache, so the shared prefix cannot be reused; score with "
                "prefix_cache=False"
            )
        states.append((layer.keys, layer.values))
    return states


def _groups(order: list[int], units: list[_Unit], batch_size: int) -> list[list[int]]:
    """Consecutive units of `order` whose suffixes fit in one batch; a unit with more suffixes
    than a batch is a group of its own."""
    groups: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for n in order:
        size = len(units[n].suffixes)
        if current and rows + size > batch_size:
            groups.append(current)
            current, rows = [], 0
        current.append(n)
        rows += size
    if current:
        groups.append(current)
    return groups


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


def _left_pad(encoded: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """(input_ids, attention_mask) on `device`, every sequence ending in the last column."""
    import torch

    width = max(len(ids) for ids in encoded)
    flat = np.full((len(encoded), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=np.int64)
    for r, ids in enumerate(encoded):
        if ids:
            flat[r, width - len(ids) :] = ids
            mask[r, width - len(ids) :] = 1
    return torch.from_numpy(flat).to(device), torch.from_numpy(mask).to(device)


# --- from token log-probabilities to per-candidate scores ------------------------------------


def _collect(plan: _Plan, logp: npt.NDArray[np.float64], columns: _Columns) -> UserScores:
    position = {item: j for j, item in enumerate(plan.candidates)}
    n = len(plan.candidates)
    point_sum = np.zeros(n)
    point_count = np.zeros(n)
    list_sum = np.zeros(n)
    list_count = np.zeros(n)
    # Margins of each unordered pair, signed towards its lower-indexed candidate.
    pair_margins: dict[tuple[int, int], list[float]] = defaultdict(list)
    for prompt, row in zip(plan.prompts, logp, strict=True):
        if prompt.task == "pointwise":
            rating = row[: columns.ratings]
            p = np.exp(rating - np.logaddexp.reduce(rating))
            j = position[prompt.items[0]]
            point_sum[j] += float(p @ _RATINGS[: columns.ratings])
            point_count[j] += 1
        elif prompt.task == "pairwise":
            x, y = (position[i] for i in prompt.items)
            margin = float(row[columns.yes] - row[columns.no])
            if x < y:
                pair_margins[(x, y)].append(margin)
            else:
                pair_margins[(y, x)].append(-margin)
        else:
            shown = row[columns.identifiers : columns.identifiers + len(prompt.items)]
            normalised = shown - np.logaddexp.reduce(shown)
            for item, value in zip(prompt.items, normalised, strict=True):
                list_sum[position[item]] += value
                list_count[position[item]] += 1

    pair_sum = np.zeros(n)
    pair_count = np.zeros(n)
    for (x, y), margins in pair_margins.items():
        # Averaging both orders cancels the model's bias towards the first-shown item.
        pref = float(np.mean(margins))
        pair_sum[x] += pref
        pair_sum[y] -= pref
        pair_count[x] += 1
        pair_count[y] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        pointwise = np.where(point_count > 0, point_sum / point_count, np.nan)
        listwise = np.where(list_count > 0, list_sum / list_count, np.nan)
    pairwise = np.where(pair_count > 0, pair_sum / np.maximum(pair_count, 1), 0.0)
    return UserScores(
        user=plan.user,
        candidates=list(plan.candidates),
        pointwise=pointwise,
        pairwise=pairwise,
        listwise=listwise,
        prompts=len(plan.prompts),
        prompt_tokens=plan.tokens,
    )
