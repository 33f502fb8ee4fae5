"""Turns one step's logits into one token per sequence, with each request's own sampling parameters.

The whole batch is processed with a few tensor ops, per-row parameters held as tensors, and every stage that no row
needs is skipped: an all-greedy batch without logprobs costs one argmax. Random rows use the exponential race,
argmax(p / q) with q ~ Exp(1), which draws exactly from p without a cumulative-sum search; a seeded request draws its
q from its own torch.Generator, seeded for each token from (seed, the token's position in the sequence): its tokens
depend only on its seed, its logits and where they stand, never on its batch neighbours nor on which engine drew the
tokens before, so a request split across prefill and decode workers, or resumed on another instance from its prompt
and the tokens so far, draws what one engine would have drawn.

Before a token is chosen, greedy or not, the rows that set penalties, biases or token restrictions have their logits
adjusted in vLLM v1's order (`penalties.py`); a batch whose rows set none pays nothing for them. Filters then follow
Hugging Face's order (the numerical oracle): temperature, top-k, top-p, then min-p. Logprobs come from log_softmax of
the raw logits, before any of them (vLLM's default "raw_logprobs").
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from sagellm.runtime.engine.outputs import TokenLogprob
from sagellm.runtime.engine.penalties import TokenHistory, adjust_logits
from sagellm.runtime.engine.sampling_params import SamplingParams

TOP_P_CANDIDATES = 1024  # largest logits searched first for a top-p cutoff; the whole vocab only if it lies beyond


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # one per row; None where the request did not ask for logprobs


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A request's private RNG; created once per request, seeded with `seed_at` before each of its draws."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def seed_at(generator: torch.Generator, seed: int, position: int) -> None:
    """Seeds `generator` for the token at `position` (0-based, prompt included) of a request seeded with `seed`."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    generator.manual_seed(int.from_bytes(digest, "little"))


def mask_top_k_top_p(
    x: torch.Tensor,  # [R, V] logits
    top_k: list[int],  # per row; V (the vocab size) where off
    top_p: list[float],  # per row; 1.0 where off
) -> torch.Tensor:  # [R, V], filtered-out logits set to -inf
    """Keep, per row, the logits >= a cutoff: the k-th largest, raised to where the better-ranked tokens' mass
    reaches p. The cutoff is found among the few largest logits (a partial selection: a full sort of the vocab
    costs tens of ms per step on CPU), widened to the whole vocab only when a top-p row needs more.
    A token tied with the cutoff is kept too."""
    device, vocab = x.device, x.shape[1]
    k = torch.tensor(top_k, device=device)  # [R], vocab where off
    # Rows with top_p = 1 get an infinite p: float rounding of the cumulative sum must not drop the tail.
    p = torch.tensor([q if q < 1.0 else math.inf for q in top_p], device=device)  # [R]
    p_without_k = any(q < 1.0 and kk == vocab for kk, q in zip(top_k, top_p, strict=True))
    width = max((kk for kk in top_k if kk < vocab), default=1)
    if p_without_k:
        width = min(vocab, max(width, TOP_P_CANDIDATES))
    while True:
        ranks = torch.arange(width, device=device)  # [W]
        largest = torch.topk(x, width, dim=-1).values  # [R, W], descending
        largest = largest.masked_fill(ranks >= k.unsqueeze(1), -math.inf)
        # top-p renormalizes over what top-k kept: the kept prefix, or the whole row where top-k is off.
        log_norm = torch.where(k < vocab, largest.logsumexp(dim=-1), x.logsumexp(dim=-1))  # [R]
        probs = (largest - log_norm.unsqueeze(1)).exp()  # [R, W]
        mass = probs.cumsum(dim=-1)  # [R, W]
        if width == vocab or not bool(((k == vocab) & (mass[:, -1] < p) & torch.isfinite(p)).any()):
            break
        width = vocab  # some top-p row's nucleus is wider than the candidates
    # [R]; rank 0 always stays, also for a top_p so small that it rounds to 0 in float32 (1e-213 is a valid top_p)
    kept = ((mass - probs < p.unsqueeze(1)) & (ranks < k.unsqueeze(1))).sum(dim=-1).clamp(min=1)
    cutoff = largest.gather(1, (kept - 1).unsqueeze(1))  # [R, 1]
    unfiltered = (k == vocab) & torch.isinf(p)  # [R]
    cutoff = cutoff.masked_fill(unfiltered.unsqueeze(1), -math.inf)
    return x.masked_fill(x < cutoff, -math.inf)


class Sampler:
    def __init__(self, eos_token_ids: Collection[int] = ()) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)  # the model's EOS ids, which min_tokens keeps out

    def sample(
        self,
        logits: torch.Tensor,  # [N, V]
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        histories: Sequence[TokenHistory] | None = None,  # each row's tokens; needed where a row adjusts logits
    ) -> SamplerOutput:
        num_rows = logits.shape[0] if logits.dim() == 2 else -1
        if num_rows < 0 or len(params) != num_rows or len(generators) != num_rows:
            raise ValueError(
                f"sample needs logits [N, V] with one SamplingParams and one generator per row, got logits "
                f"{tuple(logits.shape)}, {len(params)} params, {len(generators)} generators"
            )
        adjusted = [i for i, p in enumerate(params) if p.adjusts_logits]
        if adjusted and (histories is None or len(histories) != num_rows):
            raise ValueError("sample needs each row's token history where a row has penalties, biases or restrictions")
        want_logprobs = any(p.logprobs is not None for p in params)
        if not adjusted and not want_logprobs and all(p.is_greedy for p in params):
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * num_rows)

        raw = logits.float()
        logits = self._adjusted(raw, adjusted, params, histories) if adjusted and histories is not None else raw
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if len(random_rows) == num_rows:
            token_ids = self._sample_random(logits, params, generators)  # [N]
        else:
            token_ids = logits.argmax(dim=-1)  # [N]
            if random_rows:
                rows = torch.tensor(random_rows, device=logits.device)
                picked = self._sample_random(
                    logits[rows], [params[i] for i in random_rows], [generators[i] for i in random_rows]
                )
                token_ids[rows] = picked
        ids = token_ids.tolist()
        logprobs = self._logprobs(raw, token_ids, params) if want_logprobs else [None] * num_rows
        return SamplerOutput(ids, logprobs)

    def _adjusted(
        self,
        raw: torch.Tensor,  # [N, V] float32, left untouched
        rows: list[int],  # the rows that adjust their logits
        params: Sequence[SamplingParams],
        histories: Sequence[TokenHistory],
    ) -> torch.Tensor:  # [N, V], a new tensor
        if len(rows) == raw.shape[0]:
            return adjust_logits(raw.clone(), params, histories, self.eos_token_ids)
        index = torch.tensor(rows, device=raw.device)  # [R]
        part = adjust_logits(raw[index], [params[i] for i in rows], [histories[i] for i in rows], self.eos_token_ids)
        return raw.index_copy(0, index, part)

    def _sample_random(
        self,
        logits: torch.Tensor,  # [R, V] float32, rows that are not greedy
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:  # [R] int64
        device, vocab = logits.device, logits.shape[1]
        temperature = torch.tensor([p.temperature for p in params], device=device)  # [R]
        x = logits / temperature.unsqueeze(1)  # [R, V], a new tensor: the caller's logits stay untouched

        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]  # vocab: off
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(q < 1.0 for q in top_p):
            x = mask_top_k_top_p(x, top_k, top_p)
        if any(p.min_p > 0 for p in params):
            # p_i < min_p * p_max  <=>  x_i < x_max + log(min_p): no softmax needed, and -inf rows (min_p=0) pass.
            log_min_p = torch.tensor([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params], device=device)
            threshold = x.amax(dim=-1, keepdim=True) + log_min_p.unsqueeze(1)  # [R, 1]
            x = x.masked_fill(x < threshold, -math.inf)

        probs = torch.softmax(x, dim=-1)  # [R, V]
        # Exp(1) noise as -log(U): uniform draws are several times cheaper than exponential_ on CPU, and U < 1 keeps
        # the noise > 0, so no 0/0 NaN can win the argmax (CPU exponential_ can return 0, pytorch#22557).
        # A seeded row's draws come from its CPU generator whatever the logits' device, the same numbers on any
        # backend: a GPU engine's seeded request samples what a CPU engine's does.
        noise = torch.rand(probs.shape, device=device)  # [R, V], global RNG for unseeded rows
        for row, generator in enumerate(generators):
            if generator is not None and generator.device == noise.device:
                noise[row].uniform_(generator=generator)
            elif generator is not None:
                noise[row].copy_(torch.empty(vocab, dtype=noise.dtype).uniform_(generator=generator))
        noise.log_().neg_()
        return (probs / noise).argmax(dim=-1)  # [R]

    @staticmethod
    def _logprobs(
        logits: torch.Tensor,  # [N, V] float32, raw
        token_ids: torch.Tensor,  # [N]
        params: Sequence[SamplingParams],
    ) -> list[TokenLogprob | None]:
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if len(rows) < len(params):  # only those rows: no copy of the whole batch's logits when every row asks
            index = torch.tensor(rows, device=logits.device)
            logits, token_ids = logits[index], token_ids[index]
        scored = token_logprobs(logits, token_ids, [params[i].logprobs or 0 for i in rows])
        out: list[TokenLogprob | None] = [None] * len(params)
        for row, logprob in zip(rows, scored):
            out[row] = logprob
        return out


def token_logprobs(
    logits: torch.Tensor,  # [R, V] raw
    targets: torch.Tensor,  # [R] the token each row scores
    top_n: Sequence[int],  # per row: how many most likely alternatives to list
    ranked: bool = False,  # also rank each target among the row's tokens
) -> list[TokenLogprob]:
    """Each row's target token's logprob under log_softmax of the raw logits, and the row's `top_n` most likely
    tokens: a sampled token's logprobs, and a prompt's (`ranked`, as vLLM reports prompt logprobs)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    chosen = logprobs.gather(1, targets.unsqueeze(1))  # [R, 1]
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist() if ranked else [None] * len(top_n)
    top_values, top_ids = torch.topk(logprobs, max(top_n, default=0), dim=-1)  # [R, top], most likely first
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprob(token_id=token, logprob=value, top=list(zip(top_ids[i], top_values[i]))[: top_n[i]], rank=rank)
        for i, (token, value, rank) in enumerate(zip(targets.tolist(), chosen.squeeze(1).tolist(), ranks))
    ]
