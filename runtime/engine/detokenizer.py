"""Turns a request's generated token ids into text, a delta per step, and finds its stop strings.

Decoding the whole output every step costs O(length) per token; decoding one token alone is wrong, because a token's
text depends on its neighbours (SentencePiece's leading-space rule, byte-fallback and byte-level tokens that each
carry part of a multi-byte UTF-8 character). So each step decodes only a small window: the tokens of the last emitted
piece (`prefix_offset:read_offset`, context) plus the new ones; the new text is the window's text minus the context's
text. While the window's text ends with U+FFFD the new tokens are an incomplete character, and nothing is emitted
until the bytes that complete it arrive.

Stop strings: the text is searched only where a stop string could newly end, so the work stays per-step constant.
When the stop string itself is not to be shown, the last (longest stop - 1) characters are held back from the stream
until the request finishes, because they may turn out to be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from sagellm.common.errors import InternalError
from sagellm.runtime.engine.sampling_params import SamplingParams

# Prompt tokens decoded as context for the first output token, as in vLLM: enough for leading-space rules.
PROMPT_CONTEXT_TOKENS = 5


def find_stop_string(
    text: str, stops: Sequence[str], new_chars: int, include_stop_str_in_output: bool
) -> tuple[str, int] | None:
    """The earliest stop string that ends within the last `new_chars` characters of `text`, and the length to
    truncate `text` to (through the stop string if it is to be included, else up to it); None if there is none.

    Older text was searched when it was new, so a stop string is looked for only from where it could straddle the
    previous end: len(text) - new_chars - len(stop) + 1. Ties at one start go to the shortest, which completes first.
    """
    best: tuple[int, int, str] | None = None  # (start, length, stop)
    for stop in stops:
        start = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
        if start != -1 and (best is None or (start, len(stop)) < best[:2]):
            best = (start, len(stop), stop)
    if best is None:
        return None
    start, length, stop = best
    return stop, start + length if include_stop_str_in_output else start


class DetokenizerFinishedError(InternalError, RuntimeError):
    """Tokens were added after a stop string matched or after flush(): the request is over."""


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stops = list(stop)
        self._include_stop = include_stop_str_in_output
        # The stop string is shown anyway when included, so then nothing is ever withdrawn and nothing held back.
        self._hold_back = 0 if include_stop_str_in_output or not self._stops else max(map(len, self._stops)) - 1
        self._token_ids = list(prompt_token_ids)
        self._prefix_offset = max(len(self._token_ids) - PROMPT_CONTEXT_TOKENS, 0)
        self._read_offset = len(self._token_ids)
        self._text = ""
        self._streamed = 0  # characters of self._text already returned by add() or flush()
        self._stop_string: str | None = None
        self._finished = False

    @classmethod
    def from_params(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        resumed_tokens: int = 0,
    ) -> IncrementalDetokenizer:
        """`resumed_tokens`: the prompt's last tokens are the output of an earlier run of this request (a resume on
        another engine): they are replayed one at a time, as that run added them, their text discarded (its client
        has it), so the text that run still held back (a character cut between tokens, a possible stop string's
        start) comes out as it would have."""
        stop = params.stop or ()  # a list once SamplingParams has normalized it
        cut = len(prompt_token_ids) - resumed_tokens
        detok = cls(
            tokenizer, prompt_token_ids[:cut], params.skip_special_tokens, stop, params.include_stop_str_in_output
        )
        for token in prompt_token_ids[cut:]:
            detok.add([token])
        return detok

    @property
    def text(self) -> str:
        """The whole output decoded so far (cut at the stop string), including characters still held back."""
        return self._text

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the output, once one has matched: the request's finish reason is "stop"."""
        return self._stop_string

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated tokens; return the text that can be streamed now (possibly empty)."""
        if self._finished:
            raise DetokenizerFinishedError("cannot add tokens: the output already ended (stop string or flush)")
        self._token_ids.extend(token_ids)
        new_text = self._decode_new(final=False)
        self._text += new_text
        if new_text and self._stops:
            match = find_stop_string(self._text, self._stops, len(new_text), self._include_stop)
            if match is not None:
                self._stop_string, cut = match
                self._text = self._text[:cut]
                return self._release(final=True)
        return self._release(final=False)

    def flush(self) -> str:
        """End the output (EOS, stop token, max_tokens): release held-back text, and an incomplete trailing character
        as the U+FFFD a full decode would show. Idempotent."""
        if self._finished:
            return ""
        self._text += self._decode_new(final=True)
        return self._release(final=True)

    def _decode_new(self, final: bool) -> str:
        """Text of the tokens after read_offset, or "" while they end inside a UTF-8 character (unless final)."""
        context = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._token_ids[self._prefix_offset :])
        if len(window) <= len(context) or (window.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._token_ids)
        return window[len(context) :]

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(
            token_ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _release(self, final: bool) -> str:
        self._finished = final
        end = len(self._text) if final else max(self._streamed, len(self._text) - self._hold_back)
        delta = self._text[self._streamed : end]
        self._streamed = end
        return delta
