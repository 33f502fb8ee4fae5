"""`POST /v1/chat/completions`: OpenAI's chat, answered whole or streamed (`serving`).

A streamed request waits for its first item before answering, so a chat the graph rejects up front (context too
long, overloaded, no healthy instance) gets its proper HTTP status instead of a 200 stream holding an error; a failure
after the first token ends the stream with an `error` event and `[DONE]`, never as text."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sagellm.gateway.http.app import App, EventStream, Guard, HttpRequest, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.openai.chat_completion.protocol import ChatCompletionRequest
from sagellm.gateway.openai.chat_completion.serving import ChatServing


class ChatRoutes:
    def __init__(
        self, serving: ChatServing, to_core: Callable[[HttpRequest], Awaitable[Response]] | None = None
    ) -> None:
        """`to_core`: in an API server's process, which holds no retrieval indexes, where a whole chat that names
        one is passed on to (the gateway's core, which holds them)."""
        self.serving, self.to_core = serving, to_core

    def register(self, app: App, guard: Guard | None) -> None:
        app.route("POST", "/v1/chat/completions", self.chat, guard)

    async def chat(self, http: HttpRequest) -> Response | EventStream:
        body = http.json(ChatCompletionRequest)
        here = self.serving.preparation.indexes is not None
        if body.index is not None and not here and self.to_core is not None and not body.stream:
            return await self.to_core(http)  # an API server: the core holds the indexes and answers it whole
        if not body.stream:
            return Response(await self.serving.complete(body, http.headers, key_owner(http), http))
        return await self.serving.stream(body, http.headers, key_owner(http))
