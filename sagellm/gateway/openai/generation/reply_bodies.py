"""OpenAI response bodies and stream chunks of completions and chats, built from the choices a request's stream
delivered (`replies.choice`).

Kept apart from the routes so the shapes (which SDKs parse strictly) live in one place: `usage` with cached prompt
tokens, completions' `logprobs` (tokens, token_logprobs, top_logprobs, text_offset) and chat's (`content` entries with
`bytes` and `top_logprobs`), vLLM's `prompt_logprobs`. Token strings are each token decoded on its own, as vLLM reports
them."""

from __future__ import annotations

import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sagellm.gateway.replies.choice import Choice
from sagellm.runtime.engine.outputs import TokenLogprob


def usage(choices: list[Choice], per_prompt: int = 1) -> dict[str, Any]:
    """The tokens of every choice's output, and of each prompt once (`per_prompt`: the choices of one prompt,
    which follow each other)."""
    firsts = choices[::per_prompt]
    prompt = sum(c.metrics.num_prompt_tokens for c in firsts if c.metrics)
    # Another model's server streams text only: its own count of the tokens is in the metrics.
    completion = sum(len(c.token_ids) or (c.metrics.num_output_tokens if c.metrics else 0) for c in choices)
    cached = sum(c.metrics.num_cached_tokens for c in firsts if c.metrics)
    details: dict[str, Any] = {"cached_tokens": cached}
    tiers = [c.metrics.cached_tokens_by_tier for c in firsts if c.metrics and c.metrics.cached_tokens_by_tier]
    if tiers:  # our extension, where the engine has tiers under its prefix cache: where the cached tokens were
        by_tier: Counter[str] = Counter()
        for tier in tiers:
            by_tier.update(tier)
        details["cached_tokens_by_tier"] = dict(by_tier)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": details,
    }


def request_metrics(choices: list[Choice]) -> dict[str, float | None] | None:
    """vLLM's per-request `metrics` (`--enable-per-request-metrics`): the one generation's timings from the engine's
    record, in ms (TTFT from when it was scheduled, as vLLM counts it); None for several choices or prompts, whose
    timings belong to none of them alone, as vLLM does."""
    if len(choices) != 1 or choices[0].metrics is None:
        return None
    m = choices[0].metrics
    tokens = m.num_output_tokens or len(choices[0].token_ids)
    generation = _ms(m.first_token_time, m.finished_time)
    inference = _ms(m.first_scheduled_time, m.finished_time)
    return {
        "time_to_first_token_ms": _ms(m.first_scheduled_time, m.first_token_time),
        "generation_time_ms": generation,
        "queue_time_ms": _ms(m.arrival_time, m.first_scheduled_time),
        "mean_itl_ms": round(generation / (tokens - 1), 3) if generation is not None and tokens > 1 else None,
        "tokens_per_second": round(tokens / inference * 1000, 3) if inference else None,
    }


def _ms(start: float | None, end: float | None) -> float | None:
    return round((end - start) * 1000, 3) if start is not None and end is not None else None


_TOKEN_TEXTS: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()


def _token(tokenizer: Any, token_id: int) -> str:
    """A token's text, decoded once per tokenizer: an echoed batch of prompts with top alternatives asks for tens of
    thousands (16 prompts of 256 tokens with 5 alternatives: 24,576 decodes, a quarter of a second on the event loop
    that every other request waits through), mostly the same few thousand ids."""
    if tokenizer is None:
        return str(token_id)
    texts = _TOKEN_TEXTS.setdefault(tokenizer, {})
    text = texts.get(token_id)
    if text is None:
        text = texts[token_id] = tokenizer.decode([token_id])
    return text


def completion_logprobs(
    tokenizer: Any, logprobs: list[TokenLogprob | None], offset: int, token_ids: list[int] | None = None
) -> dict[str, Any]:
    """`token_ids`: the tokens when an entry is None (an echoed prompt's first token, which nothing scores)."""
    ids = token_ids if token_ids is not None else [lp.token_id for lp in logprobs if lp is not None]
    tokens = [_token(tokenizer, t) for t in ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [None if lp is None else lp.logprob for lp in logprobs],
        "top_logprobs": [None if lp is None else {_token(tokenizer, t): v for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def prompt_logprobs_json(tokenizer: Any, logprobs: list[TokenLogprob | None]) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (None for the first), the token and its top alternatives by id,
    each with its logprob, rank and text; -inf as -9999.0 (JSON has no infinity), as vLLM's."""

    def entry(token_id: int, logprob: float, rank: int | None) -> dict[str, Any]:
        return {"logprob": max(logprob, -9999.0), "rank": rank, "decoded_token": _token(tokenizer, token_id)}

    def position(lp: TokenLogprob) -> dict[str, Any]:
        top = {str(t): entry(t, v, rank) for rank, (t, v) in enumerate(lp.top, 1)}
        return {str(lp.token_id): entry(lp.token_id, lp.logprob, lp.rank), **top}

    return [None if lp is None else position(lp) for lp in logprobs]


def chat_logprobs(tokenizer: Any, logprobs: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token = _token(tokenizer, token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs
        ]
    }


def finish_reason(reason: str | None) -> str | None:
    """The engine's reasons are OpenAI's, except a cancelled request, which OpenAI has no word for."""
    return "stop" if reason == "abort" else reason


@dataclass
class Envelope:
    """The fields every response and chunk of one HTTP request share."""

    id: str
    model: str
    object: str  # "text_completion" | "chat.completion" | "chat.completion.chunk"
    created: int = field(default_factory=lambda: int(time.time()))
    with_metrics: bool = False  # vLLM's per-request `metrics` beside the usage (`--enable-per-request-metrics`)

    def usage_fields(self, choices: list[Choice], per_prompt: int) -> dict[str, Any]:
        """`usage` of the choices (`usage`), and their `metrics` when the server gives them."""
        fields: dict[str, Any] = {"usage": usage(choices, per_prompt)}
        if self.with_metrics:
            fields["metrics"] = request_metrics(choices)
        return fields

    def body(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
