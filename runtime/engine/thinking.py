"""A thinking budget: a reasoning model may think for at most `budget` tokens, then its thinking is closed for it.

The request says how its model thinks (`ThinkingBudget`: the tags, the tokens that close the thinking, whether the
reply starts inside it, as the gateway's reasoning parser reads the template). The engine follows each reply
(`ThinkingTracker`) by its text, not its token ids, so a tag is found however the tokenizer split it: the reply is
inside the thinking from its start or once it opens with the opening tag, and out of it at the closing tag. Each
token made inside counts; when `budget` have been made, the closing tokens are forced one by one, through the same
allowed-token mask guided decoding uses, and the answer follows (as llama.cpp's `--reasoning-budget` and vLLM's
`thinking_token_budget` do)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sagellm.common.errors import FieldError


@dataclass
class ThinkingBudget:
    budget: int  # thinking tokens allowed before the thinking is closed (0: closed at once)
    close_token_ids: list[int]  # what is forced when the budget is spent: the closing tag and what follows it
    open_tag: str = "<think>"
    close_tag: str = "</think>"
    starts_inside: bool = False  # the prompt opened the thinking: the reply starts inside it

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int) or isinstance(self.budget, bool) or self.budget < 0:
            raise FieldError("thinking_budget", f"thinking_budget must be an integer >= 0, got {self.budget!r}")
        if not self.close_token_ids or not self.open_tag or not self.close_tag:
            raise FieldError("thinking_budget", "a thinking budget needs the tags and the tokens that close it")


@dataclass
class ThinkingTracker:
    """Where one reply stands with its budget: inside the thinking or not, tokens thought, closing tokens to force."""

    spec: ThinkingBudget
    inside: bool = False
    done: bool = False  # the thinking closed (by the model, or forced): nothing is counted or forced again
    thought: int = 0
    forcing: list[int] = field(default_factory=list)
    _text: str = ""  # the reply's text while the opening or closing tag may still be coming

    def __post_init__(self) -> None:
        self.inside = self.spec.starts_inside
        if self.inside:
            self._spend()

    def accept(self, token: int, text: str) -> None:
        """Moves past one appended token and the text it added to the reply."""
        if self.done:
            return
        if self.forcing:
            self.forcing.pop(0)
            self.done = not self.forcing
            return
        self._text += text
        if not self.inside:
            stripped = self._text.lstrip()
            if stripped.startswith(self.spec.open_tag):
                self.inside, self._text = True, stripped[len(self.spec.open_tag) :]
            elif not self.spec.open_tag.startswith(stripped):
                self.done = True  # the reply did not open with its thinking: nothing to budget
            return
        if self.spec.close_tag in self._text:
            self.done = True
            return
        self._text = self._text[-len(self.spec.close_tag) :]
        self.thought += 1
        self._spend()

    def _spend(self) -> None:
        if self.thought >= self.spec.budget:
            self.forcing = list(self.spec.close_token_ids)

    def fill(self, masks: torch.Tensor, row: int) -> None:
        """Row `row` of the bit-packed masks (`grammar.new_masks`) allows only the next closing token."""
        token = self.forcing[0]
        bit = 1 << (token % 32)
        masks[row].zero_()
        masks[row, token // 32] = bit - (1 << 32) if bit >= 1 << 31 else bit  # bit 31 is int32's sign
