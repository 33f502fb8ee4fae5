"""A request's `n` choices (and completions' `best_of`): one pipeline request per choice, in one group.

Each choice is a request of its own through the graph, so routing, PD, failover and resume treat it as any other;
the group keeps them on one engine, which prefills their prompt once and shares its KV blocks (`LLMEngine`'s
groups). Choice i samples with `seed + i` (`SamplingParams.choice`): reproducible, and distinct. `best_of` runs that
many choices and answers with the `n` of highest cumulative logprob, as OpenAI's legacy completions do."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from sagellm.gateway.replies.choice import Choice
from sagellm.runtime.pipeline.messages import Request


def fan_out(
    request: Request, count: int, new_id: Callable[[], str], scored: bool = False, prompt_each: bool = False
) -> list[Request]:
    """`request`'s `count` choices as pipeline requests (the first keeps its id, which names the group); `scored`:
    each also reports its tokens' logprobs (what `best_of` ranks by); `prompt_each`: each scores the prompt too (a
    streamed echo shows each choice's), not only the first."""
    if count == 1:
        return [request]
    requests = []
    for index in range(count):
        sampling = request.sampling.choice(index)
        if scored and sampling.logprobs is None:
            sampling.logprobs = 0
        if prompt_each:
            sampling.prompt_logprobs = request.sampling.prompt_logprobs
        requests.append(
            msgspec.structs.replace(
                request,
                request_id=request.request_id if index == 0 else new_id(),
                group=request.request_id,
                sampling=sampling,
                prompt_token_ids=list(request.prompt_token_ids) if request.prompt_token_ids is not None else None,
            )
        )
    return requests


def best_of(choices: list[Choice], per_prompt: int, n: int, keep_logprobs: bool) -> list[Choice]:
    """Of each prompt's `per_prompt` choices, the `n` of highest cumulative logprob, re-indexed in order; their
    logprobs dropped unless the request asked for them (`keep_logprobs`)."""
    kept: list[Choice] = []
    for start in range(0, len(choices), per_prompt):
        group = choices[start : start + per_prompt]
        ranked = sorted(group, key=lambda c: sum(lp.logprob for lp in c.logprobs), reverse=True)[:n]
        kept += sorted(ranked, key=lambda c: c.index)
    for index, choice in enumerate(kept):
        choice.index = index
        if not keep_logprobs:
            choice.logprobs = []
    return kept
