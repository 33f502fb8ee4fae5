"""What a request's penalties, biases and token restrictions do to its logits before a token is chosen, in vLLM v1's
order and with its formulas, so a request moved from vLLM to sageLLM (or back) is penalized the same way:

    allowed_token_ids   every other token -inf
    bad_words           -inf on a bad word's last token where its earlier tokens end the output so far
    min_tokens          -inf on EOS and the stop token ids while the output is shorter (ignore_eos too)
    logit_bias          added
    repetition_penalty  a token of the prompt or the output: logit > 0 divided by it, else multiplied
    frequency_penalty   minus it times the token's count in the output
    presence_penalty    minus it where the token is in the output

The rows that use any of them are processed together with tensor ops, the penalties on the distinct (row, token) pairs
of the rows' tokens rather than on whole [rows, vocabulary] tensors: the Python here loops over the token ids a row
names, never over the vocabulary. The sampler calls `adjust_logits` only when some row needs it.
A request's output is what it generated, on this engine or (a resume) before it: a resumed prompt's last tokens
count as output here, as they did on the engine that generated them, while `min_tokens` counts this engine's output,
as `max_tokens` does (a resume lowers both by what was generated)."""

from __future__ import annotations

import math
from array import array
from collections.abc import Collection, Iterable
from collections.abc import Sequence as Seq
from typing import Any, Protocol

import torch

from sagellm.common.errors import FieldError
from sagellm.runtime.engine.sampling_params import SamplingParams


class TokenHistory(Protocol):
    """What the penalties read of a request (the engine's `Sequence` is one)."""

    @property
    def token_ids(self) -> list[int]: ...  # the prompt, then the output

    @property
    def output_start(self) -> int: ...  # where the request's output starts in token_ids

    @property
    def num_output_tokens(self) -> int: ...  # the tokens this engine generated (what min_tokens counts)

    @property
    def bad_words_token_ids(self) -> list[list[int]]: ...  # `bad_word_token_ids` of its params' bad_words


def bad_word_token_ids(tokenizer: Any, bad_words: Iterable[str], vocab_size: int) -> list[list[int]]:
    """The token id sequences `bad_words` forbid: each word (leading spaces dropped) tokenized as it is and after a
    space, since a word at the start of a text and one in its middle are different tokens; the same sequence once.
    vLLM keeps the spaced form only when it has as many tokens as the other, which lets " Paris" through where
    "Paris" takes two tokens; here both are kept. A sequence holding a token the model cannot produce is dropped:
    it can never be generated whole."""
    sequences: list[list[int]] = []
    for word in bad_words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            if not ids:
                raise FieldError("bad_words", f"bad_words must have tokens, got {word!r}, which has none")
            if ids not in sequences and max(ids) < vocab_size:
                sequences.append(ids)
    return sequences


def adjust_logits(
    logits: torch.Tensor,  # [R, V] float32, changed in place
    params: Seq[SamplingParams],  # one per row
    histories: Seq[TokenHistory],  # one per row
    eos_token_ids: Collection[int],
) -> torch.Tensor:  # logits, adjusted
    """Applies every row's penalties, biases and restrictions to `logits` (rows that set none are left as they are)."""
    device, vocab = logits.device, logits.shape[1]
    allowed = [(row, p.allowed_token_ids) for row, p in enumerate(params) if p.allowed_token_ids]
    if allowed:
        banned = torch.ones(len(allowed), vocab, dtype=torch.bool, device=device)  # [A, V]
        listed = _long([a for a, (_, ids) in enumerate(allowed) for _ in ids], device)
        banned[listed, _long([t for _, ids in allowed for t in ids], device)] = False
        index = _long([row for row, _ in allowed], device)  # [A]
        logits[index] = logits[index].masked_fill(banned, -math.inf)
    rows, tokens = _banned(params, histories, eos_token_ids, vocab)
    if rows:
        logits[_long(rows, device), _long(tokens, device)] = -math.inf
    biased = [(row, p.logit_bias) for row, p in enumerate(params) if p.logit_bias]
    if biased:
        rows = [row for row, bias in biased for _ in bias]
        tokens = [t for _, bias in biased for t in bias]
        values = torch.tensor([v for _, bias in biased for v in bias.values()], device=device)
        logits.index_put_((_long(rows, device), _long(tokens, device)), values, accumulate=True)
    repeated = [(row, h.token_ids) for row, (p, h) in enumerate(zip(params, histories)) if p.repetition_penalty != 1]
    if repeated:  # on each (row, token) of the prompt or the output, once
        rows_t, tokens_t = _unique_pairs(repeated, vocab, device)[:2]  # [U], [U]
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)[rows_t]  # [U]
        seen = logits[rows_t, tokens_t]  # [U]
        logits[rows_t, tokens_t] = torch.where(seen > 0, seen / penalty, seen * penalty)
    counted = [
        (row, h.token_ids[h.output_start :])
        for row, (p, h) in enumerate(zip(params, histories))
        if p.frequency_penalty or p.presence_penalty
    ]
    if any(ids for _, ids in counted):  # on each (row, token) of the output, with its count there
        rows_t, tokens_t, counts = _unique_pairs(counted, vocab, device)  # [U], [U], [U]
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[rows_t]  # [U]
        presence = torch.tensor([p.presence_penalty for p in params], device=device)[rows_t]  # [U]
        logits[rows_t, tokens_t] = logits[rows_t, tokens_t] - frequency * counts - presence
    return logits


def _banned(
    params: Seq[SamplingParams], histories: Seq[TokenHistory], eos_token_ids: Collection[int], vocab: int
) -> tuple[list[int], list[int]]:
    """The rows and tokens bad_words and min_tokens set to -inf (pairs: rows[i], tokens[i])."""
    rows: list[int] = []
    tokens: list[int] = []
    for row, (p, h) in enumerate(zip(params, histories)):
        if p.bad_words:
            ids, start = h.token_ids, h.output_start
            for word in h.bad_words_token_ids:  # banned where the output so far ends with all but its last token
                prefix = len(word) - 1
                if len(ids) - prefix >= start and ids[len(ids) - prefix :] == word[:-1]:
                    rows.append(row)
                    tokens.append(word[-1])
        if p.min_tokens and h.num_output_tokens < p.min_tokens:
            stops = {t for t in (*eos_token_ids, *p.stop_token_ids) if t < vocab}  # others can never be chosen
            rows += [row] * len(stops)
            tokens += stops
    return rows, tokens


def _unique_pairs(
    rows: list[tuple[int, list[int]]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [U] rows, [U] tokens, [U] float32 counts
    """Each distinct (row, token) of the listed rows' token ids, with how many times it occurs. The ids go to torch
    as int64 buffers (`array`): several times faster than a tensor built from Python ints, for long prompts too;
    the work is then on those few pairs, never on the whole [R, V]."""
    listed = [(row, ids) for row, ids in rows if ids]
    tokens = torch.cat([torch.frombuffer(array("q", ids), dtype=torch.int64) for _, ids in listed])  # [T]
    lengths = torch.tensor([len(ids) for _, ids in listed])  # [L]
    row_of = torch.repeat_interleave(torch.tensor([row for row, _ in listed]), lengths)  # [T]
    pairs, counts = torch.unique(row_of * vocab + tokens, return_counts=True)  # [U], [U]
    pairs = pairs.to(device)
    return pairs // vocab, pairs % vocab, counts.to(device=device, dtype=torch.float32)


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
