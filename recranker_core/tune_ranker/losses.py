"""The losses the tuning loop trains with, made per objective by `OBJECTIVES` (SFT, ALRO, DMPO;
their math is in objectives.py), and `encode_for`, the examples each objective trains on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from recranker_core.config import TuneSettings
from recranker_core.errors import ConfigError, DataError
from recranker_core.llm.prompts import Catalog, Prompt
from recranker_core.tune_ranker.batches import (
    Batch,
    encode_alro_examples,
    encode_dmpo_examples,
    encode_examples,
)
from recranker_core.tune_ranker.objectives import (
    dmpo_loss,
    gather_answer_logps,
    permutation_sensitive_loss,
    single_token_answer_logps,
    soft_lambda_loss,
    to_original_order,
)
from recranker_core.tune_ranker.packing import PackedBatch, encode_packed

# A loss maps (model, batch) to a scalar tensor. SFT is the default; others share the loop.
LossFn = Callable[[Any, Batch], Any]


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
