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
of the rows' tokens rather than on whole [rows, vocabulary] tensors: the token ids a row names go to torch as buffers,
and the Python here never loops over the vocabulary, nor over a request's bad words (`BadWords` looks up what the
output so far bans). The sampler calls `adjust_logits` only when some row needs it.
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
    def bad_words(self) -> BadWords | None: ...  # its params' bad_words, indexed (None: it has none)


def bad_word_token_ids(tokenizer: Any, bad_words: Iterable[str], vocab_size: int) -> list[list[int]]:
    """The token id sequences `bad_words` forbid: each word (leading spaces dropped) tokenized as it is and after a
    space, since a word at the start of a text and one in its middle are different tokens; the same sequence once.
    vLLM keeps the spaced form only when it has as many tokens as the other, which lets " Paris" through where
    "Paris" takes two tokens; here both are kept. A sequence holding a token the model cannot produce is dropped:
    it can never be generated whole. Linear in the words: a request may give thousands (`request_limits`)."""
    sequences: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for word in bad_words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            if not ids:
                raise FieldError("bad_words", f"bad_words must have tokens, got {word!r}, which has none")
            key = tuple(ids)
            if key not in seen and max(ids) < vocab_size:
                seen.add(key)
                sequences.append(ids)
    return sequences


class BadWords:
    """A request's bad word sequences indexed by what comes before each one's last token: for each length of that
    prefix, the prefixes and the last tokens they ban. What the output so far bans is then one lookup per length
    (a handful), however many words the request gave; scanning every sequence at every step (as vLLM does) would
    cost a request with thousands of words milliseconds of each step of the batch it is in."""

    def __init__(self, sequences: Iterable[Seq[int]]) -> None:
        self._banned_after: dict[int, dict[tuple[int, ...], set[int]]] = {}  # prefix length -> prefix -> last tokens
        for ids in sequences:
            self._banned_after.setdefault(len(ids) - 1, {}).setdefault(tuple(ids[:-1]), set()).add(ids[-1])

    def banned(self, token_ids: Seq[int], output_start: int) -> set[int]:
        """The tokens banned next: the last token of each sequence whose earlier tokens end the output so far
        (`token_ids[output_start:]`)."""
        end, found = len(token_ids), set()
        for length, after in self._banned_after.items():
            if end - length >= output_start:
                found |= after.get(tuple(token_ids[end - length :]), set())
        return found


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
        listed, tokens_a = _flat([(a, ids) for a, (_, ids) in enumerate(allowed)])  # [N], [N]
        banned[listed.to(device), tokens_a.to(device)] = False
        index = _long([row for row, _ in allowed], device)  # [A]
        logits[index] = logits[index].masked_fill(banned, -math.inf)
    rows, tokens = _banned(params, histories, eos_token_ids, vocab)
    if rows:
        logits[_long(rows, device), _long(tokens, device)] = -math.inf
    biased = [(row, p.logit_bias) for row, p in enumerate(params) if p.logit_bias]
    if biased:
        rows_b, tokens_b = _flat(biased)  # [B], [B]
        values = torch.cat([torch.frombuffer(array("d", bias.values()), dtype=torch.float64) for _, bias in biased])
        index = (rows_b.to(device), tokens_b.to(device))
        logits.index_put_(index, values.to(device=device, dtype=logits.dtype), accumulate=True)
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
        if h.bad_words is not None:
            banned = h.bad_words.banned(h.token_ids, h.output_start)
            rows += [row] * len(banned)
            tokens += banned
        if p.min_tokens and h.num_output_tokens < p.min_tokens:
            stops = {t for t in (*eos_token_ids, *p.stop_token_ids) if t < vocab}  # others can never be chosen
            rows += [row] * len(stops)
            tokens += stops
    return rows, tokens


def _unique_pairs(
    rows: list[tuple[int, list[int]]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [U] rows, [U] tokens, [U] float32 counts
    """Each distinct (row, token) of the listed rows' token ids, with how many times it occurs: the work is on
    those few pairs, never on the whole [R, V]."""
    row_of, tokens = _flat([(row, ids) for row, ids in rows if ids])  # [T], [T]
    pairs, counts = torch.unique(row_of * vocab + tokens, return_counts=True)  # [U], [U]
    pairs = pairs.to(device)
    return pairs // vocab, pairs % vocab, counts.to(device=device, dtype=torch.float32)


def _flat(rows: Seq[tuple[int, Iterable[int]]]) -> tuple[torch.Tensor, torch.Tensor]:  # [T] rows, [T] ids, on the CPU
    """The rows' token ids (a list, or a map's keys) end to end, each with its row. The ids go to torch as int64
    buffers (`array`): several times faster than a tensor built from Python ints, for thousands of ids too."""
    ids = [torch.frombuffer(array("q", values), dtype=torch.int64) for _, values in rows]  # each [n_i]
    lengths = torch.tensor([len(i) for i in ids])  # [L]
    return torch.repeat_interleave(torch.tensor([row for row, _ in rows]), lengths), torch.cat(ids)


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
