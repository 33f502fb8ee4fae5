"""`POST /v1/responses`: a response request run as the chat it is (`OpenAIRoutes.prepared_chat`, so admission,
policy, route, failover, guided decoding and tool parsing are the chat's own), answered whole or as the Responses
API's typed event stream, and kept for `previous_response_id` when stored.

The gateway's core answers it: an API server passes it on (its route table has no `/v1/responses`), so every
stored response is in one place whichever API server a follow-up reaches."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from sagellm.gateway.http.app import App, EventStream, Guard, HttpRequest, LastEvents, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.openai.replies import Choice, usage
from sagellm.gateway.openai.responses import (
    ResponseEvents,
    ResponsesRequest,
    ResponseStore,
    chat_body,
    conversation_after,
    created_at,
    new_id,
    output_items,
    response_body,
)
from sagellm.gateway.openai.routes import OpenAIRoutes, collect_choices, first_or_raise
from sagellm.gateway.openai.tool_parsers import ContentEvent, ToolCall, ToolCallEvent, ToolParser, parser_for
from sagellm.gateway.serving.errors import api_error
from sagellm.gateway.serving.request_stream import RequestStream
from sagellm.runtime.pipeline.messages import RequestError, TokenDelta


class ResponsesRoutes:
    def __init__(self, chat: OpenAIRoutes, store: ResponseStore | None = None) -> None:
        self.chat_routes, self.store = chat, store or ResponseStore()

    def register(self, app: App, guard: Guard | None) -> None:
        app.route("POST", "/v1/responses", self.create, guard)

    async def create(self, http: HttpRequest) -> Response | EventStream:
        body = http.json(ResponsesRequest)
        owner = key_owner(http)
        chat, conversation = chat_body(body, self.store.conversation(body.previous_response_id, owner))
        request, tool_use, _ = await self.chat_routes.prepared_chat(chat, http.headers, owner)
        parser = parser_for(tool_use.parser) if tool_use is not None and tool_use.parser is not None else None
        response_id, created = new_id("resp"), created_at()
        model = request.model or self.chat_routes.core.model_name

        def answer(choice: Choice, content: str | None, calls: list[ToolCall]) -> dict[str, Any]:
            if body.store:
                self.store.keep(response_id, owner, conversation_after(conversation, content, calls))
            output = output_items(content, calls)
            return response_body(response_id, model, body, output, usage([choice]), choice.finish_reason, created)

        if not body.stream:
            (choice,) = await collect_choices([self.chat_routes.core.submit(request)])
            content, calls = parser.parse(choice.text) if parser is not None else (choice.text or None, [])
            return Response(answer(choice, content, calls))
        stream = self.chat_routes.core.submit(request)
        first = await first_or_raise(stream)
        snapshot = response_body(response_id, model, body, [], None, None, created, status="in_progress")
        events = _events(ResponseEvents(snapshot), first, stream, parser, answer)
        return EventStream(events, on_disconnect=stream.cancel)


async def _events(
    events: ResponseEvents,
    first: TokenDelta,
    stream: RequestStream,
    parser: ToolParser | None,
    answer: Callable[[Choice, str | None, list[ToolCall]], dict[str, Any]],
) -> AsyncIterator[Any]:
    """The stream's events: text deltas and calls as the reply's tokens come (through the tool-call parser when the
    request has tools), the whole response last; a failure after the start is an `error` event."""
    yield tuple(events.start())
    choice, content, calls = Choice(0), "", []
    item: TokenDelta | RequestError = first
    while True:
        if isinstance(item, RequestError):
            error = api_error(item).body()["error"]
            yield LastEvents(({"type": "error", "sequence_number": events.sequence, **error},))
            return
        choice.add(item)
        if parser is not None:
            read = parser.step(item.text, item.finished)
        else:
            read = [ContentEvent(item.text)] if item.text else []
        ready: list[dict[str, Any]] = []
        for event in read:
            if isinstance(event, ContentEvent):
                content += event.text
                ready += events.text(event.text)
            elif isinstance(event, ToolCallEvent):
                calls.append(event.call)
                ready += events.call(event.call)
        if item.finished:
            break
        if ready:
            yield tuple(ready)
        try:
            item = await anext(stream)
        except StopAsyncIteration:
            break
    yield LastEvents((*ready, *events.finish(answer(choice, content or None, calls))))
