"""`POST /v1/messages` and `POST /v1/messages/count_tokens`: a message request run as the chat it is
(`ChatPreparation.prepared_chat`: admission, policy, route, failover, guided decoding and tool parsing are the chat's
own), answered whole or as Anthropic's event stream, its errors in Anthropic's shape.

The gateway's core answers it: an API server passes it on (its route table has no `/v1/messages`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from sagellm.gateway.anthropic.protocol import CountTokensRequest, MessagesRequest, chat_body, image_blocks
from sagellm.gateway.anthropic.replies import (
    MessageEvents,
    content_blocks,
    error_body,
    error_response,
    message_body,
    new_message_id,
    stop,
    usage,
)
from sagellm.gateway.http.app import App, EventStream, Guard, HttpRequest, LastEvents, NamedEvent, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.openai.chat_completion.preparation import ChatPreparation
from sagellm.gateway.openai.chat_completion.protocol import images_named
from sagellm.gateway.openai.tokenization.api_router import TokenizerRoutes
from sagellm.gateway.openai.tokenization.protocol import TokenizeRequest
from sagellm.gateway.replies.choice import Choice, collect_choices, first_or_raise
from sagellm.gateway.replies.reader import Reply, ReplyReader, rendered
from sagellm.gateway.serving.errors import api_error
from sagellm.gateway.serving.item_stream import ItemStream
from sagellm.runtime.pipeline.messages import RequestError, TokenDelta


class MessagesRoutes:
    def __init__(self, chat: ChatPreparation, tokenizer: TokenizerRoutes) -> None:
        self.chat, self.tokenizer = chat, tokenizer

    def register(self, app: App, guard: Guard | None) -> None:
        app.route("POST", "/v1/messages", self.create, guard, error_response)
        app.route("POST", "/v1/messages/count_tokens", self.count_tokens, guard, error_response)

    async def create(self, http: HttpRequest) -> Response | EventStream:
        body = http.json(MessagesRequest)
        chat = chat_body(body, body.model)
        with images_named(chat, image_blocks(body)):  # an image's refusal names its block
            request, plan, _ = await self.chat.prepared_chat(chat, http.headers, key_owner(http))
        message_id = new_message_id()
        core = self.chat.core
        if not body.stream:
            (choice,) = await collect_choices([core.submit(request)])
            reply = ReplyReader.whole(plan, choice.text) if plan.reads else Reply(None, choice.text or None, [])
            reason, sequence = stop(choice, reply.calls, body.stop_sequences)
            blocks = content_blocks(reply.reasoning, reply.content, reply.calls)
            return Response(message_body(message_id, body.model, blocks, reason, sequence, usage(choice)))
        stream = core.submit(request)
        first = await first_or_raise(stream)
        events = _events(MessageEvents(message_id, body.model), first, stream, ReplyReader(plan), body.stop_sequences)
        return EventStream(events, on_disconnect=stream.cancel)

    async def count_tokens(self, http: HttpRequest) -> Response:
        body = http.json(CountTokensRequest)
        chat = chat_body(body, body.model)
        tools = chat.tools if chat.tool_choice != "none" else None
        counted = TokenizeRequest(model=chat.model, messages=chat.messages, tools=tools)
        with images_named(chat, image_blocks(body)):  # images counted as served; a refusal names its block
            tokens, _ = await self.tokenizer.tokens(counted, key_owner(http))
        return Response({"input_tokens": len(tokens)})


async def _events(
    events: MessageEvents,
    first: TokenDelta,
    stream: ItemStream,
    reader: ReplyReader,
    stop_sequences: list[str] | None,
) -> AsyncIterator[Any]:
    """The stream's events: thinking, text deltas and tool calls as the reply's tokens come (read as the request's
    plan says), the stop reason and usage last; a failure after the start is an `error` event."""
    yield tuple(events.start())
    choice = Choice(0)
    item: TokenDelta | RequestError = first
    ready: list[NamedEvent] = []
    while True:
        if isinstance(item, RequestError):
            error = api_error(item)
            yield LastEvents((*ready, NamedEvent("error", error_body(error.http_status, error.message))))
            return
        choice.add(item)
        ready += rendered(reader.step(item.text, item.finished), events)
        if item.finished:
            break
        if ready:
            yield tuple(ready)
            ready = []
        try:
            item = await anext(stream)
        except StopAsyncIteration:
            break
    reason, sequence = stop(choice, reader.reply.calls, stop_sequences)
    yield LastEvents((*ready, *events.finish(reason, sequence, usage(choice))))
