"""`/sessions`: create, list, read, append to, chat in, and delete the conversations of `sessions.SessionStore`.

`POST /sessions/{id}/chat` takes an OpenAI chat body whose `messages` are the new turn (usually one user message):
they are appended to the session's history, the whole history is completed as `/v1/chat/completions` would, and the
assistant's reply is appended too. Guarded by the API key, like `/v1`: sessions are users' data."""

from __future__ import annotations

from typing import Any

import msgspec

from sagellm.gateway.errors import ApiError
from sagellm.gateway.http import App, Guard, HttpRequest, Response
from sagellm.gateway.openai_routes import OpenAIRoutes
from sagellm.gateway.protocol import ChatCompletionRequest, ChatMessage
from sagellm.gateway.sessions import Session, SessionStore


class NewSession(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    title: str | None = None
    messages: list[ChatMessage] = msgspec.field(default_factory=list)


class Append(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage]


def _plain(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(m) for m in messages]


class SessionRoutes:
    def __init__(self, store: SessionStore, chat: OpenAIRoutes) -> None:
        self.store, self.chat_routes = store, chat

    def register(self, app: App, guard: Guard | None) -> None:
        app.route("POST", "/sessions", self.create, guard)
        app.route("GET", "/sessions", self.list, guard)
        app.route("GET", "/sessions/{session_id}", self.read, guard)
        app.route("DELETE", "/sessions/{session_id}", self.delete, guard)
        app.route("POST", "/sessions/{session_id}/messages", self.append, guard)
        app.route("POST", "/sessions/{session_id}/chat", self.chat, guard)

    def _session(self, http: HttpRequest) -> Session:
        session = self.store.get(http.path_params["session_id"])
        if session is None:
            raise ApiError(404, f"no session {http.path_params['session_id']!r}", code="session_not_found")
        return session

    async def create(self, http: HttpRequest) -> Response:
        body = http.json(NewSession) if http.body else NewSession()
        return Response(msgspec.to_builtins(self.store.create(body.title, _plain(body.messages))), 201)

    async def list(self, _: HttpRequest) -> Response:
        return Response({"object": "list", "data": [s.summary() for s in self.store.sessions.values()]})

    async def read(self, http: HttpRequest) -> Response:
        return Response(msgspec.to_builtins(self._session(http)))

    async def delete(self, http: HttpRequest) -> Response:
        session = self._session(http)
        self.store.delete(session.id)
        return Response({"id": session.id, "deleted": True})

    async def append(self, http: HttpRequest) -> Response:
        session = self._session(http)
        self.store.append(session, *_plain(http.json(Append).messages))
        return Response(session.summary())

    async def chat(self, http: HttpRequest) -> Response:
        session = self._session(http)
        body = http.json(ChatCompletionRequest)
        if body.stream:
            raise ApiError(400, "stream: session chat replies are not streamed", param="stream")
        turn = _plain(body.messages)
        history = msgspec.convert(session.messages + turn, list[ChatMessage])
        reply = await self.chat_routes.complete_chat(msgspec.structs.replace(body, messages=history), http.headers)
        self.store.append(session, *turn, {"role": "assistant", "content": reply["choices"][0]["message"]["content"]})
        return Response({**reply, "session_id": session.id})
