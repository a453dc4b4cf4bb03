"""The LoRA tuning loop on a tiny random Llama: loss only on answer tokens, a few steps lower
the loss, a stopped run resumes to exactly the weights of an uninterrupted one, and verbalizer
scores ignore left padding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recranker_core.config import TuneSettings
from recranker_core.llm.prompts import Prompt
from recranker_core.llm.render import render
from recranker_core.tune_ranker.batches import IGNORE, collate, encode_examples
from recranker_core.tune_ranker.loop import tune
from recranker_core.tune_ranker.losses import sft_loss


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recranker_core.llm.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return model, tokenizer


def prompts(n: int = 16) -> list[Prompt]:
    out = []
    for k in range(n):
        rating = 1 + k % 5
        out.append(
            Prompt(
                task="pointwise",
                user=k,
                prefix=f"The user rated:\nMovie {k} (199{k % 10}; Drama), rated {rating}/5\n",
                question=f"How would the user rate Movie {k + 1}? Answer with one digit.",
                answer=str(rating),
                items=[k + 1],
                label={"rating": rating},
                history=[k],
            )
        )
    return out


def settings(**kw: Any) -> TuneSettings:
    base: dict[str, Any] = {
        "lr": 1e-2,
        "epochs": 3,
        "batch_size": 4,
        "grad_accumulation": 1,
        "eval_every": 4,
        "patience": 100,
        "lora_dropout": 0.0,
        "warmup_steps": 0,
    }
    return TuneSettings(**{**base, **kw})


def test_labels_cover_only_the_answer(tiny: Path):
    _, tokenizer = load(tiny)
    examples, dropped = encode_examples(prompts(3), tokenizer, max_length=512)
    assert dropped == 0
    for e, p in zip(examples, prompts(3), strict=True):
        answer_ids = tokenizer(render(p, tokenizer)[2], add_special_tokens=False)["input_ids"]
        labelled = [t for t in e.labels if t != IGNORE]
        assert labelled == answer_ids and e.input_ids[-len(answer_ids) :] == answer_ids
    short, dropped = encode_examples(prompts(3), tokenizer, max_length=10)
    assert short == [] and dropped == 3


def test_a_few_steps_lower_the_loss_and_resume_matches(tiny: Path, tmp_path: Path):
    model, tokenizer = load(tiny)
    examples, _ = encode_examples(prompts(), tokenizer, max_length=512)
    batch = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        before = float(sft_loss(model, batch))

    def validate(m: Any) -> dict[str, float]:
        with torch.no_grad():
            return {"ndcg@10": -float(sft_loss(m, batch))}

    full = tune(model, tokenizer, examples, validate, settings(), tmp_path / "a", progress=False)
    assert full.steps == 12 and full.resumed_from is None
    with torch.no_grad():
        after = float(sft_loss(model, batch))
    assert after < before * 0.95, (before, after)

    # The same run stopped after 5 steps and started again: it resumes from the checkpoint
    # and ends with the same LoRA weights as the run that never stopped.
    model_b, _ = load(tiny)
    first = tune(
        model_b,
        tokenizer,
        examples,
        validate,
        settings(),
        tmp_path / "b",
        max_steps=5,
        progress=False,
    )
    assert first.steps == 5
    model_c, _ = load(tiny)
    resumed = tune(
        model_c, tokenizer, examples, validate, settings(), tmp_path / "b", progress=False
    )
    assert resumed.resumed_from == 5 and resumed.steps == 12
    lora_a = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    lora_c = {k: v for k, v in model_c.state_dict().items() if "lora_" in k}
    assert lora_a and lora_a.keys() == lora_c.keys()
    for key in lora_a:
        torch.testing.assert_close(lora_a[key], lora_c[key], rtol=1e-4, atol=1e-6)


def test_other_settings_do_not_resume_a_checkpoint(tiny: Path, tmp_path: Path):
    model, tokenizer = load(tiny)
    examples, _ = encode_examples(prompts(8), tokenizer, max_length=512)

    def validate(m: Any) -> dict[str, float]:
        return {"ndcg@10": 0.0}

    tune(model, tokenizer, examples, validate, settings(epochs=1), tmp_path, progress=False)
    model2, _ = load(tiny)
    other = tune(
        model2,
        tokenizer,
        examples,
        validate,
        settings(epochs=1, lr=1e-3),
        tmp_path,
        progress=False,
    )
    assert other.resumed_from is None


def test_only_settings_that_change_a_step_change_the_checkpoint_fingerprint(tiny: Path):
    """A resumed run must be the same computation (lr, data, ...), but a setting read only after
    training (the guard's users) or a label (the profile) must not discard the checkpoint."""
    from recranker_core.tune_ranker.loop import _fingerprint

    model, tokenizer = load(tiny)
    examples, _ = encode_examples(prompts(4), tokenizer, max_length=512)
    base = _fingerprint(examples, settings(epochs=1), model, sft_loss)
    assert _fingerprint(examples, settings(epochs=1, guard_users=7), model, sft_loss) == base
    assert _fingerprint(examples, settings(epochs=1, profile="cpu"), model, sft_loss) == base
    assert _fingerprint(examples, settings(epochs=1, lr=1e-3), model, sft_loss) != base
    assert _fingerprint(examples[:-1], settings(epochs=1), model, sft_loss) != base


def test_verbalizer_scores_ignore_left_padding(tiny: Path):
    from recranker_core.llm.score import answer_logprobs

    model, tokenizer = load(tiny)
    texts = ["".join(render(p, tokenizer)[:2]) for p in prompts(4)]
    texts[1] = texts[1] + " and some more words to make this prompt clearly longer than the rest"
    ids = [tokenizer.convert_tokens_to_ids(d) for d in "12345"]
    batched = answer_logprobs(model, tokenizer, texts, ids, batch_size=4)
    alone = np.vstack([answer_logprobs(model, tokenizer, [t], ids) for t in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-4)
    assert np.all(batched < 0)
