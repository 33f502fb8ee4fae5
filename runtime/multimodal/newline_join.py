"""Newlines where an expanded placeholder meets the prompt, tokenized as the whole text would be.

Expanding a placeholder's ids (prompt_media.py) equals expanding the text before tokenizing wherever the expansion
begins and ends with a special token. Gemma 3's does not: its processor writes "\\n\\n<start_of_image>...
<end_of_image>\\n\\n", and Gemma's tokenizer has one token for each run of newlines, so after a prompt's "user\\n"
the text tokenizes as one "\\n\\n\\n" where spliced ids would be "\\n" then "\\n\\n". Joining the runs of newline tokens
either side of each edge, and tokenizing their newlines again, gives the processor's ids (vLLM does the same for
Gemma 3)."""

from __future__ import annotations

from collections.abc import Callable


class NewlineJoin:
    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str]) -> None:
        """`encode`: the tokenizer without special tokens added; `decode`: one token's text."""
        self.encode = encode
        self.decode = decode
        self._newlines: dict[int, int] = {}  # token -> its newlines, 0 for a token that is not newlines alone

    def append(self, ids: list[int], tokens: list[int], edge: bool) -> None:
        """`tokens` appended to `ids` in place; at an `edge` (an expansion begins or ends there), the newline tokens
        ending `ids` and those starting `tokens` tokenized again as one run."""
        if not edge:
            ids += tokens
            return
        trailing = self._run(reversed(ids))
        leading = self._run(tokens)
        if not trailing or not leading:
            ids += tokens
            return
        newlines = sum(self._count(t) for t in ids[len(ids) - trailing :]) + sum(map(self._count, tokens[:leading]))
        del ids[len(ids) - trailing :]
        ids += self.encode("\n" * newlines) + tokens[leading:]

    def _run(self, tokens) -> int:
        """How many tokens at the start of `tokens` are newlines alone."""
        n = 0
        for t in tokens:
            if not self._count(t):
                break
            n += 1
        return n

    def _count(self, token: int) -> int:
        if token not in self._newlines:
            text = self.decode([token])
            self._newlines[token] = len(text) if text and text == "\n" * len(text) else 0
        return self._newlines[token]
