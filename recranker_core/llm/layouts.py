"""The wording of the three templates (rr-1, rr-2, rr-3; docs/METHOD.md sections 4 and 6): the
history block and each task's question over the candidates shown, one wording for tuning and
inference."""

from __future__ import annotations

from typing import Any

from recranker_core.llm.prompts import (
    _CANDIDATES_HEADER,
    _RR2_RULES,
    IDENTIFIERS,
    NO,
    YES,
    Catalog,
    Prompt,
)

# --- the wording: one per task, shared by training and inference ----------------------------


def _history_block(
    catalog: Catalog, history: list[int], rated: dict[int, float], template: str
) -> str:
    # Ratings are shown in every task, not only pointwise, so that all of a user's prompts share
    # this block as one prefix whose key/value cache the scorer computes once (docs/METHOD.md
    # section 6).
    if template == "rr-3":
        # The most recent ratings, oldest first, one line per item: the order is the signal.
        lines = [f"{catalog.describe(i)}: {_format_rating(rated[i])}\n" for i in history]
        return "Ratings a user gave (1 = worst, 5 = best), oldest first:\n" + (
            "".join(lines) if lines else "none yet\n"
        )
    if template == "rr-2":
        # One line per rating, best first, the items of a line in the history's random order:
        # the same ratings as rr-1's one line per item in about 5 fewer tokens per item.
        groups: dict[float, list[str]] = {}
        for i in history:
            groups.setdefault(rated[i], []).append(catalog.describe(i))
        lines = [
            f"{_format_rating(r)}: {' | '.join(groups[r])}\n" for r in sorted(groups, reverse=True)
        ]
        return "Ratings a user gave (1 = worst, 5 = best), items in random order:\n" + (
            "".join(lines) if lines else "none yet\n"
        )
    lines = [f"- {catalog.describe(i)}: rated {_format_rating(rated[i])}/5\n" for i in history]
    # Ends with "\n" and every question starts with a letter: the cut between them is a token
    # boundary for byte-level BPE tokenizers.
    return "Ratings a user gave (1 = worst, 5 = best), in random order:\n" + (
        "".join(lines) if lines else "- none yet\n"
    )


class _Layout:
    """A template's wording of the three tasks over the candidates `shown`: the subclasses
    write the prefix and the questions; the Prompt of each task (answer, label, hint) is the
    same whichever template worded it."""

    template: str
    catalog: Catalog
    prefix: str
    shown: list[int]
    base_order: list[int]

    def _pointwise_question(self, item: int, predicted: float) -> str:
        raise NotImplementedError

    def _pairwise_question(self, first: int, second: int, hint_first: bool) -> str:
        raise NotImplementedError

    def _listwise_question(self, top: int) -> str:
        raise NotImplementedError

    def _listwise_hint(self) -> dict[str, Any]:
        return {}

    def pointwise(
        self, user: int, history: list[int], item: int, predicted: float, rating: int | None
    ) -> Prompt:
        return Prompt(
            task="pointwise",
            user=user,
            prefix=self.prefix,
            question=self._pointwise_question(item, predicted),
            answer="" if rating is None else str(rating),
            items=[item],
            label={} if rating is None else {"rating": rating},
            history=list(history),
            hint={"predicted_rating": predicted},
            template=self.template,
        )

    def pairwise(
        self,
        user: int,
        history: list[int],
        first: int,
        second: int,
        hint_first: bool,
        prefers_first: bool | None,
    ) -> Prompt:
        return Prompt(
            task="pairwise",
            user=user,
            prefix=self.prefix,
            question=self._pairwise_question(first, second, hint_first),
            answer="" if prefers_first is None else (YES if prefers_first else NO),
            items=[first, second],
            label={} if prefers_first is None else {"prefers_first": prefers_first},
            history=list(history),
            hint={"prefers_first": hint_first},
            template=self.template,
        )

    def listwise(
        self,
        user: int,
        history: list[int],
        top: int,
        order: list[int] | None,
        ratings: list[float] | None = None,
    ) -> Prompt:
        name = {item: IDENTIFIERS[j] for j, item in enumerate(self.shown)}
        label: dict[str, Any] = {}
        if order is not None:
            label = {"order": list(order), "identifiers": [name[i] for i in order]}
            if ratings is not None:
                label["ratings"] = list(ratings)
        return Prompt(
            task="listwise",
            user=user,
            prefix=self.prefix,
            question=self._listwise_question(top),
            answer=", ".join(label.get("identifiers", [])),
            items=list(self.shown),
            label=label,
            history=list(history),
            hint={
                "order": self.base_order,
                "identifiers": [name[i] for i in self.base_order],
                **self._listwise_hint(),
            },
            template=self.template,
        )


class _Layout1(_Layout):
    """Template rr-1: the prefix is the history block; each question names its own candidates
    with their hint."""

    template = "rr-1"

    def __init__(
        self,
        catalog: Catalog,
        block: str,
        shown: list[int] | None = None,
        base_order: list[int] | None = None,
    ) -> None:
        self.catalog = catalog
        self.prefix = block
        self.shown = list(shown or [])
        self.base_order = list(base_order or [])

    def _pointwise_question(self, item: int, predicted: float) -> str:
        return (
            f"Item: {self.catalog.describe(item)}\n"
            f"A conventional model predicts {predicted:.1f}.\n"
            "How would the user rate the item (1-5)? Answer with only the rating."
        )

    def _pairwise_question(self, first: int, second: int, hint_first: bool) -> str:
        return (
            f"X: {self.catalog.describe(first)}\n"
            f"Y: {self.catalog.describe(second)}\n"
            f"A conventional model prefers {'X' if hint_first else 'Y'}.\n"
            f"Would the user prefer X over Y? Answer with only {YES} or {NO}."
        )

    def _listwise_question(self, top: int) -> str:
        name = {item: IDENTIFIERS[j] for j, item in enumerate(self.shown)}
        lines = "".join(f"{name[i]}: {self.catalog.describe(i)}\n" for i in self.shown)
        return (
            f"Candidates:\n{lines}"
            f"A conventional model ranks them: {', '.join(name[i] for i in self.base_order)}.\n"
            f"Which {top} candidates would the user like most, best first? "
            "Answer with only their letters, separated by commas."
        )


class _Layout2(_Layout):
    """Template rr-2: one prefix (how questions are answered, the history block, the candidates
    with their predicted ratings, the conventional model's order) shared by every prompt over
    the same candidates, and questions that only name identifiers."""

    template = "rr-2"

    def __init__(
        self,
        catalog: Catalog,
        block: str,
        shown: list[int],
        predicted: list[float],
        base_order: list[int],
    ) -> None:
        self.catalog = catalog
        self.shown = list(shown)
        self.predicted = list(predicted)
        self.base_order = list(base_order)
        self.name = {item: IDENTIFIERS[j] for j, item in enumerate(self.shown)}
        lines = "".join(
            f"{self.name[i]}: {catalog.describe(i)} ~ {p:.1f}\n"
            for i, p in zip(self.shown, self.predicted, strict=True)
        )
        ranked = ", ".join(self.name[i] for i in self.base_order)
        # The instructions first, then the data they are about.
        self.prefix = (
            f"{_RR2_RULES}{block}{_CANDIDATES_HEADER}{lines}"
            f"The conventional model ranks them: {ranked}.\n"
        )

    def _pointwise_question(self, item: int, predicted: float) -> str:
        return f"{self.name[item]} rating?"

    def _pairwise_question(self, first: int, second: int, hint_first: bool) -> str:
        return f"{self.name[first]} over {self.name[second]}?"

    def _listwise_question(self, top: int) -> str:
        return f"Top {top}?"

    def _listwise_hint(self) -> dict[str, Any]:
        return {"predicted_ratings": self.predicted}


class _Layout3(_Layout2):
    """Template rr-3: rr-2's prefix and questions; its history block (`_history_block`) is the
    most recent ratings in time order."""

    template = "rr-3"


def _layout(
    template: str,
    catalog: Catalog,
    block: str,
    shown: list[int],
    predicted: list[float],
    base_order: list[int],
) -> _Layout:
    """The wording of `template` for prompts over the candidates `shown` (rr-1 does not show
    their predicted ratings, so it ignores `predicted`)."""
    if template == "rr-3":
        return _Layout3(catalog, block, shown, predicted, base_order)
    if template == "rr-2":
        return _Layout2(catalog, block, shown, predicted, base_order)
    return _Layout1(catalog, block, shown, base_order)


def _format_rating(value: float) -> str:
    return f"{value:g}"
