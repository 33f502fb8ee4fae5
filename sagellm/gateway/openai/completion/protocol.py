"""The body of `POST /v1/completions` and its prompts as pipeline `Request`s, one per prompt: OpenAI's fields on
top of what every generation takes (`generation.protocol`), completions' `echo` and `best_of` among them."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.generation.protocol import (
    GenerationRequest,
    check_unsupported,
    refuse,
    sampling_params,
    scheduling,
)
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.engine.request_limits import MAX_PROMPTS
from sagellm.runtime.engine.sampling_params import MAX_CHOICES, MAX_LOGPROBS
from sagellm.runtime.pipeline.messages import Request, TokenId

COMPLETIONS_MAX_TOKENS = 16  # a completion that sets no max_tokens: the OpenAI API's default


class CompletionRequest(GenerationRequest, kw_only=True):
    prompt: str | list[Any]  # a batch of strings, token ids, or a batch of token-id lists (checked by _prompts)
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def completion_requests(
    body: CompletionRequest,
    headers: dict[str, str],
    new_id: Any,
    defaults: dict[str, Any] | None,
    guided: GuidedDecoding | None = None,
) -> list[Request]:
    """One pipeline request per prompt (OpenAI accepts a batch of prompts: one choice each); `defaults`: the model's
    sampling defaults; `guided`: the output's constraint. `max_tokens` is 16 when left out, the OpenAI API's default
    for completions (vLLM's too). With `echo`, `max_tokens: 0` asks for the prompt alone: one token is generated
    after it (the prompt's logits are computed by the step that samples it) and left out of the reply, as vLLM
    does; `logprobs` then also scores the prompt's tokens."""
    check_unsupported(body, chat=False)
    if body.max_tokens == 0 and not body.echo:
        refuse("max_tokens", "0 only with echo=true (the prompt alone)")
    if body.suffix:
        refuse("suffix", "not supported")
    if body.best_of is not None and not body.n <= body.best_of <= MAX_CHOICES:
        raise ApiError(400, f"best_of: must be in [n, {MAX_CHOICES}], got {body.best_of}", param="best_of")
    if body.stream and (body.best_of or body.n) > body.n:
        refuse("best_of", "picks the best choices once all are done: not with stream=true")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        refuse("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {body.logprobs}")
    prompts = _prompts(body.prompt)
    max_tokens = COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens or 1
    echoed = body.logprobs if body.echo else None  # the echoed prompt's tokens are scored like the output's
    params = sampling_params(body, max_tokens, body.logprobs, defaults, guided, echoed)
    now = time.time()
    extra = scheduling(body, headers, now)
    return [
        Request(
            request_id=new_id(),
            sampling=params,
            model=body.model,
            arrival_time=now,
            **({"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p}),
            **extra,
        )
        for p in prompts
    ]


def _prompts(prompt: Any) -> list[str | list[int]]:
    """A completion's prompts: a text, texts, token ids or token-id lists (at most MAX_PROMPTS of them), checked by
    msgspec rather than a Python loop: a body may hold a million token ids (the vocabulary is checked at admission)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        refuse("prompt", "must not be empty")
    first = prompt[0]
    if type(first) is not int and len(prompt) > MAX_PROMPTS:
        message = f"prompt: {len(prompt)} prompts in one request, more than {MAX_PROMPTS}: send several requests"
        raise ApiError(400, message, param="prompt", code="invalid_request")
    shape = list[TokenId] if type(first) is int else list[str] if isinstance(first, str) else list[list[TokenId]]
    try:
        prompts = msgspec.convert(prompt, shape)
    except msgspec.ValidationError:
        refuse("prompt", "must be a string, a list of strings, a list of token ids or a list of token-id lists")
    if type(first) is int:
        return [prompts]
    if not all(prompts):
        refuse("prompt", "no prompt in the list may be empty")
    return prompts
