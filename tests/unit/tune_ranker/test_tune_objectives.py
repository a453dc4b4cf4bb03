"""The ALRO and DMPO objectives wired into the tuning loop, on a tiny random Llama and real
training prompts: a permuted twin maps back to its original, ALRO's slots read the answer's
identifiers, ALRO's loss is its language-model, Soft Lambda and permutation-sensitive parts
computed apart, a few ALRO steps lower it and a resumed ALRO run ends where an uninterrupted one
does, DMPO's negatives follow their source, DMPO starts at log 2 (plus its anchor) from an SFT
adapter, exactly so even when that adapter has dropout, and a few steps lower it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from recranker_core.base.split import SplitData, build_split
from recranker_core.config import PromptSettings, TuneSettings
from recranker_core.errors import ConfigError
from recranker_core.llm.builders import (
    build_inference_prompts,
    build_training_prompts,
    reorder_listwise,
)
from recranker_core.llm.prompts import IDENTIFIERS, Catalog, Prompt
from recranker_core.tune_ranker.batches import (
    IGNORE,
    Example,
    collate,
    encode_alro_examples,
    encode_dmpo_examples,
)
from recranker_core.tune_ranker.loop import apply_lora, reference_logps, start_adapter, tune
from recranker_core.tune_ranker.losses import OBJECTIVES, encode_for
from recranker_core.tune_ranker.objectives import (
    gather_answer_logps,
    permutation_sensitive_loss,
    single_token_answer_logps,
    soft_lambda_loss,
    to_original_order,
)

N_ITEMS = 40


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # The tiny model's ops are too small to split across threads; on a busy 2-core machine,
    # threads waiting for each other make the module several times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class PopularityHints:
    def __init__(self, data: SplitData) -> None:
        self.counts = np.bincount(data.rating_items, minlength=data.n_items).astype(np.float64)

    def item_scores(self, user: int) -> npt.NDArray[np.floating]:
        return self.counts

    def predict_ratings(self, user: int, items: npt.NDArray[np.int64]) -> npt.NDArray[np.floating]:
        return np.full(len(items), 3.5)


@pytest.fixture(scope="module")
def data() -> SplitData:
    rng = np.random.default_rng(3)
    rows: list[tuple[str, str, float, int]] = []
    for u in range(6):
        picked = rng.choice(N_ITEMS, 18, replace=False)
        # Enough five- and four-star likes for every user's listwise label (3 + 2 held out).
        ratings = [5.0] * 5 + [4.0] * 5 + list(rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], 8))
        rng.shuffle(ratings)
        pairs = enumerate(zip(picked.tolist(), ratings, strict=True))
        rows += [(f"u{u}", f"m{i:02d}", float(r), t) for t, (i, r) in pairs]
    users, items, values, ts = zip(*rows, strict=True)
    return build_split(users, items, values, ts, like_threshold=4.0)


@pytest.fixture(scope="module")
def catalog(data: SplitData) -> Catalog:
    return Catalog(
        titles=[f"Film {i}#" for i in data.item_ids],
        years=[1980 + k % 20 for k in range(data.n_items)],
        genres=[["Drama"] for _ in range(data.n_items)],
        item_ids=list(data.item_ids),
    )


@pytest.fixture(scope="module", params=["rr-1", "rr-2"])
def prompts(request: pytest.FixtureRequest, data: SplitData, catalog: Catalog) -> list[Prompt]:
    users = np.repeat(np.arange(data.n_users, dtype=np.int64), 2)
    settings = PromptSettings(history_max=3, template=request.param)
    built, counts = build_training_prompts(data, catalog, PopularityHints(data), users, settings)
    assert counts["listwise"] == len(users)
    return built


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


def settings(**kw: Any) -> TuneSettings:
    base: dict[str, Any] = {
        "lr": 1e-2,
        "epochs": 2,
        "batch_size": 4,
        "grad_accumulation": 1,
        "eval_every": 3,
        "patience": 100,
        "lora_dropout": 0.0,
        "warmup_steps": 0,
    }
    return TuneSettings(**{**base, **kw})


def rising() -> Any:
    """A validation whose score rises at every call: the last adapter is the best one."""
    calls = iter(range(1000))

    def validate(model: Any) -> dict[str, float]:
        return {"ndcg@10": float(next(calls))}

    return validate


def listwise(prompts: list[Prompt]) -> list[Prompt]:
    return [p for p in prompts if p.task == "listwise"]


def named(x: Example, n: int) -> torch.Tensor:
    """One-hot [slots, candidates]: which shown candidate the token after each slot's read
    position names."""
    hot = torch.zeros(len(x.slot_positions), n)
    for s, at in enumerate(x.slot_positions):
        hot[s, list(x.slot_token_ids[s]).index(x.input_ids[at + 1])] = 1.0
    return hot


# --- the permuted twin ------------------------------------------------------------------------


def test_the_twin_of_the_twin_is_the_original(
    prompts: list[Prompt], data: SplitData, catalog: Catalog
) -> None:
    rng = np.random.default_rng(0)
    for p in listwise(prompts):
        perm = rng.permutation(len(p.items)).tolist()
        twin = reorder_listwise(p, catalog, perm)
        assert twin.items == [p.items[j] for j in perm]
        assert twin.history == p.history
        if p.template == "rr-2":  # the candidate list is part of the shared prefix
            history = p.prefix.split("Candidates, each with")[0]
            assert twin.prefix != p.prefix and twin.prefix.startswith(history)
            assert twin.question == p.question
            assert twin.hint["predicted_ratings"] == [p.hint["predicted_ratings"][j] for j in perm]
        else:
            assert twin.prefix == p.prefix and twin.question != p.question
        # The same items in the same order, under their new identifiers.
        assert twin.label["order"] == p.label["order"] and twin.hint["order"] == p.hint["order"]
        assert [twin.items[IDENTIFIERS.index(c)] for c in twin.label["identifiers"]] == (
            p.label["order"]
        )
        assert twin.answer == ", ".join(twin.label["identifiers"])
        assert twin.label["ratings"] == [p.label["ratings"][j] for j in perm]
        assert reorder_listwise(twin, catalog, np.argsort(perm).tolist()) == p
    # Inference prompts (no label) reorder too: the position-bias measure shuffles them.
    user = 0
    cands = [i for i in range(data.n_items) if i not in set(data.seen(user, "valid"))][:10]
    (shown,) = [
        p
        for p in build_inference_prompts(
            data, catalog, PopularityHints(data), user, cands, "valid", PromptSettings()
        )
        if p.task == "listwise"
    ]
    perm = rng.permutation(len(cands)).tolist()
    twin = reorder_listwise(shown, catalog, perm)
    assert twin.label == {} and twin.prefix != shown.prefix  # rr-2: the list is in the prefix
    assert reorder_listwise(twin, catalog, np.argsort(perm).tolist()) == shown


def test_alro_slots_read_the_answers_identifiers_and_the_twin_maps_back(
    tiny: Path, prompts: list[Prompt], catalog: Catalog
) -> None:
    _, tokenizer = load(tiny)
    examples, dropped = encode_alro_examples(prompts, tokenizer, 2048, catalog, twins=True, seed=0)
    assert dropped == 0 and len(examples) == len(prompts)
    slotted = [e for e in examples if e.slot_positions]
    assert len(slotted) == len(listwise(prompts))
    for e, p in zip(slotted, listwise(prompts), strict=True):
        assert e.twin is not None and sorted(e.permutation) == list(range(len(p.items)))
        assert e.gains == tuple(2.0**r - 1 for r in p.label["ratings"])
        # Each slot reads the token before an answer identifier that the loss also labels;
        # the twin adds no language-model loss.
        assert all(e.labels[at + 1] == e.input_ids[at + 1] for at in e.slot_positions)
        assert e.twin.labels == [IGNORE] * len(e.twin.input_ids)
        original = named(e, len(p.items))
        # The answer names the label's items, best first.
        assert [p.items[j] for j in original.argmax(dim=1).tolist()] == p.label["order"]
        twin = named(e.twin, len(p.items))
        back = to_original_order(twin[None], torch.tensor(e.permutation))[0]
        torch.testing.assert_close(back, original)
    # Without the permutation-sensitive loss there are no twins.
    plain, _ = encode_alro_examples(prompts, tokenizer, 2048, catalog, twins=False, seed=0)
    assert all(e.twin is None for e in plain) and sum(bool(e.slot_positions) for e in plain)


# --- ALRO in the loop -------------------------------------------------------------------------


def test_alro_loss_is_the_sum_of_its_parts(
    tiny: Path, prompts: list[Prompt], catalog: Catalog
) -> None:
    cfg = settings(objective="alro", alro_sll_weight=0.7, alro_psl_weight=0.3, alro_gamma=5.0)
    model, tokenizer = load(tiny)
    model.eval()
    examples, _ = encode_for(prompts, tokenizer, cfg, catalog)
    batch = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))
    # The parts, from one forward pass and the examples' own slots (not the batch's SlotBatch):
    # listwise rows first, then their twins, which collate appends after all examples.
    listed = [r for r, e in enumerate(examples) if e.slot_positions]
    twins = [len(examples) + k for k in range(len(listed))]
    members = [examples[r] for r in listed] + [examples[r].twin for r in listed]
    assert listed and all(m is not None for m in members)
    with torch.no_grad():
        out = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        )
        logps = gather_answer_logps(
            out.logits[listed + twins],
            torch.tensor([m.slot_positions for m in members if m is not None]),
            torch.tensor([m.slot_token_ids for m in members if m is not None]),
        )
        gains = torch.tensor([examples[r].gains for r in listed])
        perms = torch.tensor([examples[r].permutation for r in listed])
        sll = soft_lambda_loss(logps[: len(listed)], gains, gamma=5.0, pair_weights="paper")
        psl = permutation_sensitive_loss(
            logps[: len(listed)],
            to_original_order(logps[len(listed) :], perms),
            kind="kl",
            gamma=5.0,
        )
        total = OBJECTIVES["alro"](cfg)(model, batch)
    assert float(sll) > 1e-3 and float(psl) > 1e-6
    torch.testing.assert_close(total, out.loss + 0.7 * sll + 0.3 * psl, rtol=1e-6, atol=1e-6)
    # The other pair weights give another loss: the setting reaches the Soft Lambda Loss.
    lambdarank = cfg.model_copy(update={"alro_pair_weights": "lambdarank"})
    with torch.no_grad():
        other = OBJECTIVES["alro"](lambdarank)(model, batch)
        sll_lr = soft_lambda_loss(logps[: len(listed)], gains, gamma=5.0, pair_weights="lambdarank")
    torch.testing.assert_close(other, out.loss + 0.7 * sll_lr + 0.3 * psl, rtol=1e-6, atol=1e-6)
    assert abs(float(sll_lr) - float(sll)) > 1e-4


def test_alro_steps_lower_its_loss_and_a_resumed_run_matches(
    tiny: Path, prompts: list[Prompt], catalog: Catalog, tmp_path: Path
) -> None:
    cfg = settings(objective="alro", alro_gamma=5.0, alro_psl_weight=0.5)
    model, tokenizer = load(tiny)
    examples, _ = encode_for(prompts, tokenizer, cfg, catalog)
    loss_fn = OBJECTIVES["alro"](cfg)
    batch = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))
    assert batch.slots is not None and batch.input_ids.shape[0] == len(examples) + len(
        listwise(prompts)
    )
    with torch.no_grad():
        sft_part = float(OBJECTIVES["sft"](cfg)(model, batch))
        before = float(loss_fn(model, batch))
    # The ranking terms add to the language-model loss.
    assert before > sft_part + 1e-3

    def validate(m: Any) -> dict[str, float]:
        return {"ndcg@10": 0.0}

    full = tune(
        model, tokenizer, examples, validate, cfg, tmp_path / "a", loss_fn=loss_fn, progress=False
    )
    assert full.steps == 2 * math.ceil(len(examples) / 4)
    with torch.no_grad():
        after = float(loss_fn(model, batch))
    # Mostly the language-model term: the ranking terms of a random tiny model move slowly.
    assert after < before - 0.2, (before, after)

    model_b, _ = load(tiny)
    first = tune(
        model_b,
        tokenizer,
        examples,
        validate,
        cfg,
        tmp_path / "b",
        loss_fn=OBJECTIVES["alro"](cfg),
        max_steps=3,
        progress=False,
    )
    assert first.steps == 3
    model_c, _ = load(tiny)
    resumed = tune(
        model_c,
        tokenizer,
        examples,
        validate,
        cfg,
        tmp_path / "b",
        loss_fn=OBJECTIVES["alro"](cfg),
        progress=False,
    )
    assert resumed.resumed_from == 3 and resumed.steps == full.steps
    lora_a = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    lora_c = {k: v for k, v in model_c.state_dict().items() if "lora_" in k}
    assert lora_a and lora_a.keys() == lora_c.keys()
    for key in lora_a:
        torch.testing.assert_close(lora_a[key], lora_c[key], rtol=1e-4, atol=1e-6)


# --- DMPO -------------------------------------------------------------------------------------


def test_dmpo_negatives_follow_their_source(tiny: Path, prompts: list[Prompt]) -> None:
    from recranker_core.llm.render import verbalizer_ids

    _, tokenizer = load(tiny)
    chosen: dict[str, list[list[int]]] = {}
    for source in ("unseen", "low_rated", "hard"):
        examples, dropped = encode_dmpo_examples(
            prompts, tokenizer, 2048, negatives=3, source=source, seed=0
        )
        assert dropped == 0 and len(examples) == len(listwise(prompts))
        chosen[source] = []
        for e, p in zip(examples, listwise(prompts), strict=True):
            ids = verbalizer_ids(tokenizer, len(p.items))["identifiers"]
            positions = [ids.index(t) for t in e.answer_ids]
            assert p.items[positions[0]] == p.label["order"][0]
            negatives = positions[1:]
            assert len(set(negatives)) == 3 and positions[0] not in negatives
            ratings = p.label["ratings"]
            # Never a candidate rated as high as the positive.
            assert all(ratings[j] < ratings[positions[0]] for j in negatives)
            if source == "unseen":
                assert all(ratings[j] == 0 for j in negatives)
            if source == "low_rated":
                lower = sorted(r for r in ratings if 0 < r < ratings[positions[0]])
                assert [ratings[j] for j in negatives][: len(lower)] == lower[:3]
            if source == "hard":
                top = ratings[positions[0]]
                eligible = [i for i in p.hint["order"] if ratings[p.items.index(i)] < top]
                assert [p.items[j] for j in negatives] == eligible[:3]
            # The prompt stops where the answer would start: nothing is labelled.
            assert e.labels == [IGNORE] * len(e.input_ids)
            chosen[source].append(negatives)
    assert chosen["unseen"] != chosen["hard"] and chosen["unseen"] != chosen["low_rated"]
    with pytest.raises(ConfigError, match="DMPO_NEGATIVE_SOURCE"):
        encode_dmpo_examples(prompts, tokenizer, 2048, negatives=3, source="random", seed=0)


def test_dmpo_starts_at_log_2_from_the_sft_adapter_and_steps_lower_it(
    tiny: Path, prompts: list[Prompt], catalog: Catalog, tmp_path: Path
) -> None:
    # Stage one: a short SFT run whose last adapter is the best (one prompt per question: the
    # DMPO stage below reads whole published-layout prompts).
    sft_cfg = settings(epochs=1, packed=False)
    model, tokenizer = load(tiny)
    sft_examples, _ = encode_for(prompts, tokenizer, sft_cfg, catalog)
    sft = tune(model, tokenizer, sft_examples, rising(), sft_cfg, tmp_path / "sft", progress=False)
    assert sft.best_step == sft.steps > 0

    anchor = 0.2
    cfg = settings(objective="dmpo", dmpo_beta=1.0, dmpo_sft_weight=anchor, epochs=3, lr=2e-2)
    examples, _ = encode_for(prompts, tokenizer, cfg, catalog)
    assert examples and all(len(e.answer_ids) == 1 + cfg.dmpo_negatives for e in examples)
    loss_fn = OBJECTIVES["dmpo"](cfg)
    pad = tokenizer.pad_token_id

    # The policy starts as its reference (the SFT adapter): the margin is 0.
    reference, _ = load(tiny)
    start = start_adapter(reference, cfg, sft.adapter_dir)
    with_ref = reference_logps(start, examples, pad, 4)
    batch = collate(with_ref, pad, torch.device("cpu"))
    assert batch.ref_logps is not None
    with torch.no_grad():
        at_start = float(loss_fn(start, batch))
    nll = float(-batch.ref_logps[:, 0].mean())
    assert at_start == pytest.approx(math.log(2) + anchor * nll, abs=1e-5)
    # The SFT adapter is not the bare backbone: the reference differs from the untuned model.
    bare, _ = load(tiny)
    with torch.no_grad():
        untuned = reference_logps(start_adapter(bare, settings(), None), examples, pad, 4)
    assert not np.allclose([e.ref_logps for e in untuned], [e.ref_logps for e in with_ref])

    policy, _ = load(tiny)
    result = tune(
        policy,
        tokenizer,
        examples,
        rising(),
        cfg,
        tmp_path / "dmpo",
        loss_fn=loss_fn,
        init_adapter=sft.adapter_dir,
        progress=False,
    )
    assert result.steps > 0 and result.extra["init_adapter"] == str(sft.adapter_dir)
    margin_only = OBJECTIVES["dmpo"](cfg.model_copy(update={"dmpo_sft_weight": 0.0}))
    with torch.no_grad():
        after = float(loss_fn(policy, batch))
        preference = float(margin_only(policy, batch))
    assert after < at_start - 0.02, (at_start, after)
    # Not only the anchor: the positive rose against the negatives, relative to the reference.
    assert preference < math.log(2) - 0.01, preference

    with pytest.raises(ConfigError, match="adapter_config.json"):
        start_adapter(load(tiny)[0], cfg, tmp_path / "nowhere")


def test_dmpo_policy_starts_exactly_at_its_reference_despite_the_adapters_dropout(
    tiny: Path, prompts: list[Prompt], catalog: Catalog, tmp_path: Path
) -> None:
    # An "SFT adapter" with a large LoRA dropout and non-zero LoRA weights (B != 0), so that the
    # LoRA path, and its dropout, change the answer log-probabilities.
    model, tokenizer = load(tiny)
    sft = apply_lora(model, settings(lora_dropout=0.3))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, weight in sft.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.5)
    adapter = tmp_path / "sft"
    sft.save_pretrained(adapter)

    cfg = settings(objective="dmpo", dmpo_beta=1.0, dmpo_negatives=2)
    examples, _ = encode_for(prompts, tokenizer, cfg, catalog)
    pad = tokenizer.pad_token_id

    def train_mode_logps(policy: Any) -> tuple[torch.Tensor, Any]:
        """The reference as tune() reads it, then the policy in train mode on the same batch."""
        with_ref = reference_logps(policy, examples, pad, len(examples))
        batch = collate(with_ref, pad, torch.device("cpu"))
        policy.train()
        torch.manual_seed(2)
        return single_token_answer_logps(
            policy, batch.input_ids, batch.attention_mask, batch.answer_ids
        ), batch

    # Under DMPO: no dropout, so at step 0 h = log pi - log pi_ref is exactly 0 and loss = log 2.
    policy = start_adapter(load(tiny)[0], cfg, adapter)
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in policy.modules())
    logps, batch = train_mode_logps(policy)
    assert torch.equal(logps, batch.ref_logps)
    loss = OBJECTIVES["dmpo"](cfg)(policy, batch)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-7)
    loss.backward()  # the gradient still flows: training moves away from the reference

    # The same adapter under another objective keeps its dropout: in train mode h != 0.
    noisy = start_adapter(load(tiny)[0], settings(), adapter)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in noisy.modules())
    with torch.no_grad():
        noisy_logps, noisy_batch = train_mode_logps(noisy)
    assert float((noisy_logps - noisy_batch.ref_logps).abs().max()) > 1e-3
