"""Packed training in the inference layout: one row per user and cut (the shared prefix, then
every question under the scorer's mask) gives the same loss as each question run as its own
full prompt, reads the answer token the verbalizer scorer reads, and trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recranker_core.config import TuneSettings
from recranker_core.llm.layouts import _history_block, _layout
from recranker_core.llm.prompts import Catalog, Prompt
from recranker_core.llm.render import render
from recranker_core.tune_ranker.batches import encode_examples
from recranker_core.tune_ranker.loop import tune
from recranker_core.tune_ranker.losses import packed_loss
from recranker_core.tune_ranker.packing import PackedExample, collate_packed, encode_packed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recranker_core.llm.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


CATALOG = Catalog(
    titles=[f"Movie {i}" for i in range(12)],
    years=[1990 + i for i in range(12)],
    genres=[["Drama"] if i % 2 else ["Comedy"] for i in range(12)],
)


def cut_prompts(user: int, history: list[int], shown: list[int], seed: int) -> list[Prompt]:
    """A user's labelled prompts at one cut, all sharing one rr-3 prefix."""
    rng = np.random.default_rng(seed)
    rated = {i: float(rng.integers(1, 6)) for i in history}
    block = _history_block(CATALOG, history, rated, "rr-3")
    predicted = [round(float(v), 1) for v in rng.uniform(1, 5, len(shown))]
    layout = _layout("rr-3", CATALOG, block, shown, predicted, sorted(shown))
    answer = shown[int(rng.integers(len(shown)))]
    others = [i for i in shown if i != answer]
    out = [layout.listwise(user, history, 3, [answer, *others[:2]], [0.0] * len(shown))]
    out.append(layout.pointwise(user, history, answer, predicted[shown.index(answer)], 5))
    out.append(layout.pointwise(user, history, others[0], 3.0, 2))
    for other in others[:2]:
        out.append(layout.pairwise(user, history, answer, other, True, True))
        out.append(layout.pairwise(user, history, other, answer, False, False))
    return out


def all_prompts() -> list[Prompt]:
    return cut_prompts(0, [1, 2, 3], [4, 5, 6, 7], 0) + cut_prompts(1, [8, 9], [0, 10, 11], 1)


def separate_loss(model: Any, tokenizer: Any, prompts: list[Prompt], rows: Any) -> float:
    """Mean cross-entropy of each packed answer token after its full prompt, run alone."""
    losses = []
    answers = [a for row in rows for a in row.answers]
    for p, answer in zip(prompts, answers, strict=True):
        prefix, suffix, _ = render(p, tokenizer)
        ids = tokenizer(prefix + suffix, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        losses.append(float(-torch.log_softmax(logits.float(), -1)[answer]))
    return float(np.mean(losses))


def test_packed_loss_equals_one_prompt_per_question(tiny: Path):
    model, tokenizer = load(tiny)
    model.eval()
    prompts = all_prompts()
    rows, dropped = encode_packed(prompts, tokenizer, max_length=4096)
    assert dropped == 0
    assert len(rows) == 2  # one row per user and prefix
    assert [len(r.suffixes) for r in rows] == [7, 7]
    batch = collate_packed(rows, tokenizer.pad_token_id or 0, torch.device("cpu"))
    with torch.no_grad():
        packed = float(packed_loss(model, batch))
    assert packed == pytest.approx(separate_loss(model, tokenizer, prompts, rows), abs=1e-4)


def test_packed_answers_are_the_tokens_the_scorer_reads(tiny: Path):
    from recranker_core.llm.render import verbalizer_ids

    _, tokenizer = load(tiny)
    prompts = cut_prompts(0, [1, 2, 3], [4, 5, 6, 7], 0)
    (row,), _ = encode_packed(prompts, tokenizer, max_length=4096)
    ids = verbalizer_ids(tokenizer, 4)
    listwise = prompts[0]
    first = listwise.answer.split(",")[0].strip()
    assert row.answers[0] == ids["identifiers"]["ABCD".index(first)]
    assert row.answers[1] == ids["rating"][4] and row.answers[2] == ids["rating"][1]
    assert row.answers[3] == ids["pairwise"][0] and row.answers[4] == ids["pairwise"][1]
    assert row.tasks[:3] == ("listwise", "pointwise", "pointwise")


def test_packed_row_keeps_the_questions_that_fit(tiny: Path):
    _, tokenizer = load(tiny)
    prompts = cut_prompts(0, [1, 2, 3], [4, 5, 6, 7], 0)
    (full,), _ = encode_packed(prompts, tokenizer, max_length=4096)
    limit = len(full.prefix) + sum(len(s) for s in full.suffixes[:3])
    (cut,), dropped = encode_packed(prompts, tokenizer, max_length=limit)
    assert dropped == 4 and cut.suffixes == full.suffixes[:3]
    none, dropped = encode_packed(prompts, tokenizer, max_length=len(full.prefix))
    assert none == [] and dropped == 7


def test_padding_changes_no_answer(tiny: Path):
    """A short row padded next to a long one reads the same loss as alone."""
    model, tokenizer = load(tiny)
    model.eval()
    rows, _ = encode_packed(all_prompts(), tokenizer, max_length=4096)
    short = min(rows, key=lambda r: r.length)
    pad = tokenizer.pad_token_id or 0
    with torch.no_grad():
        alone = float(packed_loss(model, collate_packed([short], pad, torch.device("cpu"))))
        longer = PackedExample(
            (*short.prefix, *short.prefix), short.suffixes, short.answers, short.tasks
        )
        both = collate_packed([short, longer], pad, torch.device("cpu"))
        logits = model(
            input_ids=both.input_ids,
            attention_mask=both.attention_mask,
            position_ids=both.position_ids,
            logits_to_keep=both.keep,
        ).logits
    mine = both.rows == 0
    read = logits[both.rows[mine], both.columns[mine]].float()
    padded = float(torch.nn.functional.cross_entropy(read, both.targets[mine]))
    assert padded == pytest.approx(alone, abs=1e-5)


def test_packed_tuning_lowers_the_loss(tiny: Path, tmp_path: Path):
    model, tokenizer = load(tiny)
    rows, _ = encode_packed(all_prompts() * 4, tokenizer, max_length=4096)
    settings = TuneSettings(
        lr=1e-2,
        epochs=20,
        batch_size=2,
        grad_accumulation=1,
        eval_every=10,
        patience=100,
        lora_dropout=0.0,
        warmup_steps=0,
    )
    pad = tokenizer.pad_token_id or 0
    batch = collate_packed(rows[:2], pad, torch.device("cpu"))
    with torch.no_grad():
        before = float(packed_loss(model, batch))
    losses: list[float] = []

    def validate(m: Any) -> dict[str, float]:
        with torch.no_grad():
            losses.append(float(packed_loss(m, batch)))
        return {"ndcg@10": -losses[-1]}

    result = tune(model, tokenizer, rows, validate, settings, tmp_path, progress=False)
    assert result.steps == 20 and result.train_tokens > 0
    assert losses[0] == pytest.approx(before, abs=1e-5)
    assert min(losses[1:]) < before - 0.5


def test_packed_and_one_prompt_examples_cover_the_same_answers(tiny: Path):
    _, tokenizer = load(tiny)
    prompts = all_prompts()
    rows, _ = encode_packed(prompts, tokenizer, max_length=4096)
    separate, _ = encode_examples(prompts, tokenizer, max_length=4096)
    assert sum(len(r.answers) for r in rows) == len(separate) == len(prompts)
