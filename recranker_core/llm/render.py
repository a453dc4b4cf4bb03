"""A prompt in a backbone's chat template (`render`: the shared prefix, the question, the
answer) and the token ids the verbalizer scorer reads at the answer position (`verbalizer_ids`)."""

from __future__ import annotations

from typing import Any

from recranker_core.errors import ConfigError
from recranker_core.llm.prompts import (
    _BOUNDARY,
    IDENTIFIERS,
    NO,
    RATING_TOKENS,
    SYSTEM_MESSAGE,
    YES,
    Prompt,
)


def render(prompt: Prompt, tokenizer: Any) -> tuple[str, str, str]:
    """(prefix_text, suffix_text, answer_text) of `prompt` in the tokenizer's chat template.

    prefix_text + suffix_text is the templated conversation with the generation prompt, split
    where the history ends, so that a scorer computes the prefix once per user and reuses its
    key/value cache. answer_text is the answer followed by the end-of-turn token.
    """
    prefix = _defuse_special_tokens(prompt.prefix, tokenizer)
    question = _defuse_special_tokens(prompt.question, tokenizer)
    marked = _chat(tokenizer, prefix + _BOUNDARY + question)
    if marked.count(_BOUNDARY) != 1:
        raise ConfigError(
            "the backbone's chat template drops or repeats the user message; use a backbone "
            "whose template renders a system and a user message once each"
        )
    prefix_text, suffix_text = marked.split(_BOUNDARY)
    if prefix_text + suffix_text != _chat(tokenizer, prefix + question):
        raise ConfigError(
            "the backbone's chat template rewrites the user message, so the shared history "
            "prefix cannot be cut out of it; use a backbone whose template keeps message text"
        )
    return prefix_text, suffix_text, prompt.answer + _end_of_turn(tokenizer)


def verbalizer_ids(tokenizer: Any, n_candidates: int) -> dict[str, list[int]]:
    """Token ids the scorer reads at the answer position: "rating" ("1".."5"), "pairwise"
    ([Yes, No]) and "identifiers" (the first `n_candidates` of A..Z). Raises ConfigError when
    one of them is not a single token right after the generation prompt."""
    if not 0 <= n_candidates <= len(IDENTIFIERS):
        raise ConfigError(
            f"{n_candidates} candidates cannot be named by single-letter identifiers "
            f"(at most {len(IDENTIFIERS)}): lower the number of candidates per user"
        )
    opening = _chat(tokenizer, "x")
    base = list(tokenizer.encode(opening, add_special_tokens=False))

    def one_token(text: str) -> int:
        ids = list(tokenizer.encode(opening + text, add_special_tokens=False))
        if len(ids) == len(base) + 1 and ids[: len(base)] == base:
            return int(ids[-1])
        common = 0
        while common < min(len(ids), len(base)) and ids[common] == base[common]:
            common += 1
        pieces = tokenizer.convert_ids_to_tokens(ids[common:])
        raise ConfigError(
            f"the answer {text!r} is not one token after the backbone's generation prompt: it "
            f"tokenizes as {pieces}; the verbalizer scorer needs single-token answers, so choose "
            "a backbone whose tokenizer keeps it whole"
        )

    return {
        "rating": [one_token(r) for r in RATING_TOKENS],
        "pairwise": [one_token(YES), one_token(NO)],
        "identifiers": [one_token(i) for i in IDENTIFIERS[:n_candidates]],
    }


def _chat(tokenizer: Any, user_message: str) -> str:
    messages = [
        {"role": "system", "content": SYSTEM_MESSAGE},
        {"role": "user", "content": user_message},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(text)


def _special_tokens(tokenizer: Any) -> list[str]:
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens.update(t.content for t in decoder.values() if getattr(t, "special", False))
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _defuse_special_tokens(text: str, tokenizer: Any) -> str:
    # A title that spells a control token ("<|im_end|>") must not end the message early: a
    # zero-width space keeps it readable but stops it from matching the special token.
    for token in _special_tokens(tokenizer):
        if token in text:
            text = text.replace(token, token[0] + "\u200b" + token[1:])
    return text


def _end_of_turn(tokenizer: Any) -> str:
    """The control token the chat template writes after an assistant message (falls back to
    the tokenizer's eos token)."""
    messages = [
        {"role": "system", "content": SYSTEM_MESSAGE},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": _BOUNDARY},
    ]
    text = str(tokenizer.apply_chat_template(messages, tokenize=False))
    tail = text.split(_BOUNDARY, 1)[1] if _BOUNDARY in text else ""
    for token in _special_tokens(tokenizer):
        if tail.startswith(token):
            return token
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ConfigError(
            "the backbone's tokenizer has no end-of-turn or eos token, so answers cannot be "
            "terminated; set eos_token in its tokenizer_config.json"
        )
    return str(eos)
