"""Prompts tokenized before they enter the graph, off the event loop when long, and request ids.

The event loop carries every stream and `/health`: a long prompt tokenized on it stalls them all, so prompts longer
than OFF_LOOP_CHARS go to a worker thread and admission finds their token ids ready. The serving core does this for
its own requests, an API server (`api_servers.server`) for all of them, short ones too (its own thread is the
work it exists for)."""

from __future__ import annotations

import uuid
from typing import Any

import trio

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.errors import field_named
from sagellm.operators.admission import tokenize_request
from sagellm.runtime.pipeline.messages import Request

# Prompts longer than this are tokenized in a worker thread before they enter the graph (a short one costs less
# inline than the thread hop); a prompt longer than its context times MAX_CHARS_PER_TOKEN is refused untokenized.
OFF_LOOP_CHARS = 4096
MAX_CHARS_PER_TOKEN = 64


async def tokenize_prompts(
    requests: list[Request], tokenizer: Any, vocab: int | None, max_model_len: int | None, *, short_too: bool
) -> None:
    """Fills the token ids of the requests for the graph's own model: those longer than OFF_LOOP_CHARS in a worker
    thread, the short ones (`short_too`) inline, where a thread hop would cost more than the tokenizing. A prompt
    with more characters than the context could hold tokens is refused before any tokenizing. Raises ApiError (400)
    for a prompt that cannot be tokenized or is too long."""
    ours = [r for r in requests if r.model is None and r.prompt_token_ids is None]  # others' servers tokenize theirs
    long = [r for r in ours if _characters(r) > OFF_LOOP_CHARS]
    short = [r for r in ours if _characters(r) <= OFF_LOOP_CHARS] if short_too else []
    limit = (max_model_len or 0) * MAX_CHARS_PER_TOKEN
    for request in long:
        if limit and _characters(request) > limit:
            raise ApiError(
                400,
                f"the prompt has {_characters(request)} characters; this model's context of {max_model_len} "
                f"tokens holds at most about {limit}",
                code="context_length_exceeded",
            )
    problems = [tokenize_request(r, tokenizer, vocab) for r in short]
    if long:
        problems += await trio.to_thread.run_sync(lambda: [tokenize_request(r, tokenizer, vocab) for r in long])
    for problem in problems:
        if problem is not None:
            raise ApiError(400, problem, param=field_named(problem), code="invalid_request")


def _characters(request: Request) -> int:
    """A prompt's length in characters: its text, or the text of its chat messages."""
    if request.prompt is not None:
        return len(request.prompt)
    return sum(len(m.get("content") or "") for m in request.messages or () if isinstance(m.get("content"), str))


class RequestIds:
    """Request ids, unique across processes and runs and not guessable (a request's status is read by its id):
    `prefix-<128 random bits>`, as vLLM's."""

    def __call__(self, prefix: str = "req") -> str:
        return f"{prefix}-{uuid.uuid4().hex}"
