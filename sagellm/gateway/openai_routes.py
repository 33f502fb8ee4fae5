"""The OpenAI API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`, and sageLLM's
`/v1/requests/{id}` (a request's status).

A generation request becomes pipeline `Request`s submitted to the serving core, whichever instance serves its model
(the graph's engines, or servers attached to the registry); the reply is read from the request's stream. A streamed
request waits for its first item before answering, so a request the graph rejects up front (context too long,
overloaded, no healthy instance) gets its proper HTTP status instead of a 200 stream holding an error; a failure
after the first token ends the stream with an `error` event and `[DONE]`, never as text."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import trio

from sagellm.gateway.core import ServingCore
from sagellm.gateway.embeddings import EmbeddingService
from sagellm.gateway.engines import EngineManager
from sagellm.gateway.errors import ApiError
from sagellm.gateway.http import App, EventStream, Guard, HttpRequest, Response
from sagellm.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_request,
    completion_requests,
)
from sagellm.gateway.request_stream import RequestStream
from sagellm.gateway.responses import Choice, Envelope, chat_logprobs, completion_logprobs, finish_reason, usage
from sagellm.runtime.pipeline.messages import Request, RequestError, TokenDelta

DONE = b"[DONE]"
# Inputs one embedding request may carry: a batch this size takes about a second of CPU here; more would hold the
# model (one batch at a time) from every other client for as long as a client cares to send.
MAX_EMBEDDING_INPUTS = 256


class OpenAIRoutes:
    def __init__(
        self,
        core: ServingCore | None,
        embeddings: EmbeddingService | None = None,
        engines: EngineManager | None = None,
    ) -> None:
        """`core` None: an embedding-only server (sagellm.gateway.embedding_server) uses just `embeddings()`.
        `engines`: embedding requests naming a managed embedding engine's model are proxied to it."""
        self.core, self.embedding, self.engines = core, embeddings, engines
        self.created = int(time.time())

    def register(self, app: App, guard: Guard | None) -> None:
        app.route("GET", "/v1/models", self.models, guard)
        app.route("POST", "/v1/completions", self.completions, guard)
        app.route("POST", "/v1/chat/completions", self.chat, guard)
        app.route("POST", "/v1/embeddings", self.embeddings, guard)
        app.route("GET", "/v1/requests/{request_id}", self.request_status, guard)

    async def request_status(self, http: HttpRequest) -> Response:
        """Where a request is (queued, running, completed, failed, cancelled), by the `id` of its reply."""
        request_id = http.path_params["request_id"]
        status = self.core.request_status(request_id)
        if status is None:
            raise ApiError(404, f"no request {request_id!r} here (or it ended long ago)", code="not_found")
        return Response(status)

    # -- models ---------------------------------------------------------------------------------------------------
    async def models(self, _: HttpRequest) -> Response:
        def card(name: str, **extra: Any) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "sagellm", **extra}

        own, *attached = self.core.models()
        data = [card(own, max_model_len=self.core.max_model_len), *map(card, attached)]
        if self.embedding is not None:
            data.append(card(self.embedding.name, max_model_len=self.embedding.max_length))
        if self.engines is not None:
            data += self.engines.model_cards(self.created)
        return Response({"object": "list", "data": data})

    def _check_model(self, name: str | None, served: str | None, kind: str) -> None:
        if name is not None and name != served:
            raise ApiError(
                404,
                f"the {kind} model {name!r} does not exist here; this server has {served!r}",
                param="model",
                code="model_not_found",
            )

    # -- completions ----------------------------------------------------------------------------------------------
    async def completions(self, http: HttpRequest) -> Response | EventStream:
        body = http.json(CompletionRequest)
        model = self.core.instance_model(body.model)
        requests = completion_requests(body, http.headers, lambda: self.core.new_id("cmpl"))
        for request in requests:
            request.model = model
        await self.core.tokenize_long_prompts(requests)
        envelope = Envelope(requests[0].request_id, model or self.core.model_name, "text_completion")
        wants_logprobs = body.logprobs is not None
        if body.stream:
            if len(requests) > 1:
                raise ApiError(400, "stream=true takes one prompt; send several requests", param="prompt")
            stream = self.core.submit(requests[0])
            first = await _first_or_raise(stream)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._completion_events(envelope, stream, first, wants_logprobs, include_usage)
            return EventStream(events, on_disconnect=stream.cancel)
        choices = await _collect([self.core.submit(r) for r in requests])
        tokenizer = self.core.tokenizer
        return Response(
            envelope.body(
                [
                    {
                        "index": c.index,
                        "text": c.text,
                        "logprobs": completion_logprobs(tokenizer, c.logprobs, 0) if wants_logprobs else None,
                        "finish_reason": finish_reason(c.finish_reason),
                    }
                    for c in choices
                ],
                usage=usage(choices),
            )
        )

    def _completion_events(
        self, envelope: Envelope, stream: RequestStream, first: TokenDelta, logprobs: bool, include_usage: bool
    ) -> AsyncIterator[Any]:
        offset = 0

        def render(item: TokenDelta) -> dict[str, Any]:
            nonlocal offset
            lp = completion_logprobs(self.core.tokenizer, item.logprobs or [], offset) if logprobs else None
            offset += len(item.text)
            return {"index": 0, "text": item.text, "logprobs": lp, "finish_reason": finish_reason(item.finish_reason)}

        return _events(envelope, first, stream, render, logprobs, include_usage)

    # -- chat -----------------------------------------------------------------------------------------------------
    async def chat(self, http: HttpRequest) -> Response | EventStream:
        body = http.json(ChatCompletionRequest)
        if not body.stream:
            return Response(await self.complete_chat(body, http.headers))
        request = self._chat_request(body, http.headers)
        await self.core.tokenize_long_prompts([request])
        envelope = Envelope(request.request_id, request.model or self.core.model_name, "chat.completion.chunk")
        stream = self.core.submit(request)
        first = await _first_or_raise(stream)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = self._chat_events(envelope, stream, first, body.logprobs, include_usage)
        return EventStream(events, on_disconnect=stream.cancel)

    async def complete_chat(self, body: ChatCompletionRequest, headers: dict[str, str]) -> dict[str, Any]:
        """A whole chat completion as OpenAI's response body (the sessions route uses it too)."""
        request = self._chat_request(body, headers)
        await self.core.tokenize_long_prompts([request])
        envelope = Envelope(request.request_id, request.model or self.core.model_name, "chat.completion")
        (choice,) = await _collect([self.core.submit(request)])
        message = {"role": "assistant", "content": choice.text}
        lp = chat_logprobs(self.core.tokenizer, choice.logprobs) if body.logprobs else None
        fields = {"index": 0, "message": message, "logprobs": lp, "finish_reason": finish_reason(choice.finish_reason)}
        return envelope.body([fields], usage=usage([choice]))

    def _chat_request(self, body: ChatCompletionRequest, headers: dict[str, str]) -> Request:
        model = self.core.instance_model(body.model)
        request = chat_request(body, headers, self.core.new_id("chatcmpl"))
        request.model = model
        return request

    def _chat_events(
        self, envelope: Envelope, stream: RequestStream, first: TokenDelta, logprobs: bool, include_usage: bool
    ) -> AsyncIterator[Any]:
        def render(item: TokenDelta) -> dict[str, Any]:
            lp = chat_logprobs(self.core.tokenizer, item.logprobs or []) if logprobs else None
            delta = {"content": item.text} if item.text else {}
            return {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_reason(item.finish_reason)}

        opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        return _events(envelope, first, stream, render, logprobs, include_usage, opening=opening)

    # -- embeddings -----------------------------------------------------------------------------------------------
    async def embeddings(self, http: HttpRequest) -> Response | EventStream:
        body = http.json(EmbeddingRequest)
        engine = self.engines.embedding_engine(body.model) if self.engines is not None else None
        if engine is not None:
            return await self.engines.proxy(engine, http)
        if self.embedding is None:
            raise ApiError(
                404,
                "this server runs no embedding model (start it without --no-embedding)",
                param="model",
                code="model_not_found",
            )
        self._check_model(body.model, self.embedding.name, "embedding")
        inputs = _embedding_inputs(body.input)
        if body.dimensions is not None and body.dimensions != self.embedding.dim:
            raise ApiError(
                400,
                f"dimensions: {self.embedding.name} has {self.embedding.dim}, got {body.dimensions}",
                param="dimensions",
            )
        vectors, prompt_tokens = await self.embedding.embed(inputs)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode_vector(v, body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        tokens = sum(prompt_tokens)
        return Response(
            {
                "object": "list",
                "data": data,
                "model": self.embedding.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


def _embedding_inputs(value: Any) -> list[str] | list[list[int]]:
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [list(value)]
    if value and (all(isinstance(v, str) for v in value) or all(isinstance(v, list) for v in value)):
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise ApiError(
                400, f"input: at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(value)}", param="input"
            )
        return list(value)
    raise ApiError(
        400, "input: a non-empty string, list of strings, token ids or list of token-id lists", param="input"
    )


def _encode_vector(vector: Any, encoding: str) -> list[float] | str:
    array = np.asarray(vector, dtype=np.float32)
    if encoding == "base64":
        return base64.b64encode(array.astype("<f4").tobytes()).decode("ascii")
    return array.tolist()


async def _events(
    envelope: Envelope,
    first: TokenDelta,
    stream: RequestStream,
    render: Callable[[TokenDelta], dict[str, Any]],
    logprobs: bool,
    include_usage: bool,
    opening: dict[str, Any] | None = None,
) -> AsyncIterator[Any]:
    """The SSE events of one streamed choice: `render` turns a delta into the choice's fields; deltas with nothing to
    show (a token that ends mid-character) are skipped; a failure is an `error` event; usage last when asked."""
    choice = Choice(0)
    extra = {"usage": None} if include_usage else {}
    if opening is not None:
        yield envelope.body([opening], **extra)
    async for item in _resume(first, stream):
        if isinstance(item, RequestError):
            yield ApiError.from_request_error(item).body()
            break
        choice.add(item)
        if item.text or item.finished or (logprobs and item.logprobs):
            yield envelope.body([render(item)], **extra)
    if include_usage and choice.finish_reason is not None:
        yield envelope.body([], usage=usage([choice]))
    yield DONE


async def _first_or_raise(stream: RequestStream) -> TokenDelta:
    """A streamed request's first item; a request rejected before its first token answers with its status."""
    async for item in stream:
        if isinstance(item, RequestError):
            raise ApiError.from_request_error(item)
        return item
    raise ApiError(500, "the request ended without a reply", code="internal")


async def _resume(first: TokenDelta, stream: RequestStream) -> AsyncIterator[TokenDelta | RequestError]:
    yield first
    if not first.finished:
        async for item in stream:
            yield item


async def _collect(streams: list[RequestStream]) -> list[Choice]:
    """Every stream to its end; the first failure cancels the rest and answers for all."""
    choices = [Choice(i) for i in range(len(streams))]
    failure: RequestError | None = None

    async def drain(stream: RequestStream, choice: Choice, scope: trio.CancelScope) -> None:
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
        raise ApiError.from_request_error(failure)
    return choices
