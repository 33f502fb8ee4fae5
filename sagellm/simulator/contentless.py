"""What the cluster simulator does not model, standing in where the real operators expect it: prompt contents (a
prompt is a length) and the engines' prefix caches (they hold nothing)."""

from __future__ import annotations

from typing import Any

from sagellm.operators.prefix_index import PrefixIndex


class LengthOnlyPrompt(list):
    """A prompt of `n` tokens whose contents are not modelled: `len()` is n, and nothing is stored, so a queue of a
    million waiting requests costs no prompt memory. Only the policies read it, and only its length."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __len__(self) -> int:
        return self.n


class NoPrefixCache(PrefixIndex):
    """pd_split's view of the engines' prefix caches when prompts have lengths and no contents: nothing is cached."""

    def cached_tokens(self, instance: str, token_ids: Any, hashes: list[int] | None = None) -> int:
        return 0

    def record(self, instance: str, token_ids: Any, hashes: list[int] | None = None) -> None:
        return None
