"""A request's reply as its stream delivers it: one choice accumulated from its deltas (`Choice`), the first item of
a streamed request awaited before answering (`first_or_raise`), and whole requests run to their end
(`collect_choices`). Every API that runs a request reads its stream so, whatever shape it answers in (OpenAI's
completions, chats and responses, Anthropic's messages): a request the graph rejects before its first token answers
with its own HTTP status, never as a 200 stream that holds an error."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.errors import api_error
from sagellm.gateway.serving.item_stream import ItemStream
from sagellm.runtime.engine.outputs import RequestMetrics, TokenLogprob
from sagellm.runtime.pipeline.messages import RequestError, TokenDelta


@dataclass
class Choice:
    """What one request produced, accumulated from its deltas."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or string that ended it, when the engine says
    metrics: RequestMetrics | None = None

    def add(self, delta: TokenDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs or []
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finished:
            self.finish_reason, self.stop_reason, self.metrics = delta.finish_reason, delta.stop_reason, delta.metrics


async def first_or_raise(stream: Any) -> Any:
    """A streamed request's first item (an `ItemStream`'s, or `ChoiceStreams`' with its choice's index); a request
    rejected before its first token answers with its status, its other choices cancelled. A client that leaves while
    it waits (its connection's scope is cancelled) aborts the request wherever it is."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        raise ApiError(500, "the request ended without a reply", code="internal") from None
    except BaseException:
        stream.cancel()
        raise
    item = first[1] if isinstance(first, tuple) else first
    if isinstance(item, RequestError):
        stream.cancel()
        raise api_error(item)
    return first


async def collect_choices(streams: Sequence[ItemStream]) -> list[Choice]:
    """Every stream to its end; the first failure cancels the rest and answers for all."""
    choices = [Choice(i) for i in range(len(streams))]
    failure: RequestError | None = None

    async def drain(stream: ItemStream, choice: Choice, scope: trio.CancelScope) -> None:
        nonlocal failure
        async for item in stream:
            if isinstance(item, RequestError):
                failure = failure or item
                scope.cancel()
                return
            choice.add(item)

    try:
        async with trio.open_nursery() as nursery:
            for stream, choice in zip(streams, choices):
                nursery.start_soon(drain, stream, choice, nursery.cancel_scope)
    finally:
        for stream in streams:
            stream.cancel()  # no-op for those that finished; a client that left cancels the rest
    if failure is not None:
        raise api_error(failure)
    return choices
