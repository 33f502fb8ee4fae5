"""Prompts tokenized before they enter the graph, off the event loop when long, and request ids.

The event loop carries every stream and `/health`: a long prompt tokenized on it stalls them all, so a request whose
preparation reads more than OFF_LOOP_CHARS (its prompt, or its chat's messages and tools, rendered and tokenized; its
bad words, tokenized twice each) is prepared in a worker thread and admission finds its token ids ready. The serving
core does this for its own requests, an API server (`api_servers.server`) for all of them, light ones too (its own
thread is the work it exists for)."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import trio

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.errors import field_named
from sagellm.operators.admission import tokenize_request
from sagellm.runtime.pipeline.messages import Request

# Requests whose preparation reads more than this many characters in all are prepared in a worker thread (a light
# one costs less inline than the thread hop); a prompt longer than its context times MAX_CHARS_PER_TOKEN is refused
# untokenized.
OFF_LOOP_CHARS = 4096
MAX_CHARS_PER_TOKEN = 64


async def tokenize_prompts(
    requests: list[Request], tokenizer: Any, vocab: int | None, max_model_len: int | None, *, short_too: bool
) -> None:
    """Fills the token ids of the requests for the graph's own model (their prompts' and their bad words',
    `tokenize_request`): in one worker thread those whose preparation reads more than OFF_LOOP_CHARS, and with
    `short_too` the light ones too, inline while they read that little in all. A prompt with more characters than the
    context could hold tokens is refused before any tokenizing. Raises ApiError (400) for a prompt that cannot be
    tokenized or is too long."""
    ours = [r for r in requests if r.model is None and _unprepared(r)]  # others' servers tokenize theirs
    limit = (max_model_len or 0) * MAX_CHARS_PER_TOKEN
    for request in ours:
        if limit and _characters(request) > limit:
            raise ApiError(
                400,
                f"the prompt has {_characters(request)} characters; this model's context of {max_model_len} "
                f"tokens holds at most about {limit}",
                code="context_length_exceeded",
            )
    weighed = [(r, _work(r)) for r in ours]
    chosen = [(r, work) for r, work in weighed if short_too or work > OFF_LOOP_CHARS]

    def prepare() -> list[str | None]:
        return [tokenize_request(r, tokenizer, vocab) for r, _ in chosen]

    heavy = sum(work for _, work in chosen) > OFF_LOOP_CHARS
    problems = await trio.to_thread.run_sync(prepare) if heavy else prepare()
    for problem in problems:
        if problem is not None:
            raise ApiError(400, problem, param=field_named(problem), code="invalid_request")


def _unprepared(request: Request) -> bool:
    sampling = request.sampling
    return request.prompt_token_ids is None or (bool(sampling.bad_words) and sampling.bad_words_token_ids is None)


def _work(request: Request) -> int:
    """About how many characters preparing `request` reads: its prompt, or its chat's messages and tools as JSON
    (what the template renders), unless tokenized; its bad words twice (alone and after a space), unless tokenized."""
    work = 0
    if request.prompt_token_ids is None:
        work += len(request.prompt or "")
        if request.prompt is None and request.messages:
            work += len(msgspec.json.encode(request.messages)) + len(msgspec.json.encode(request.tools or []))
    if request.sampling.bad_words_token_ids is None:
        work += 2 * sum(len(word) + 1 for word in request.sampling.bad_words)
    return work


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
