"""`/sessions`: create, list, read, append to, chat in, and delete the conversations of `sessions.SessionStore`.

`POST /sessions/{id}/chat` takes an OpenAI chat body whose `messages` are the new turn (usually one user message):
they are appended to the session's history, the history is completed as `/v1/chat/completions` would, and the
assistant's reply is appended too. A history longer than the model's context is completed over its latest turns
(the oldest dropped from the prompt, 1, 2, 4, ... at a time, never from the session; system messages kept), so a
long session goes on instead of failing every turn. Guarded by the API key, like `/v1`, and each key sees only its
own sessions."""

from __future__ import annotations

from typing import Any

import msgspec

from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.chat_completion.protocol import ChatCompletionRequest, ChatMessage, Messages
from sagellm.gateway.openai.chat_completion.serving import ChatServing
from sagellm.gateway.sessions.store import Session, SessionStore


class NewSession(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    title: str | None = None
    messages: Messages = msgspec.field(default_factory=list)


class Append(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    messages: Messages


def _plain(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    return [msgspec.to_builtins(m) for m in messages]


class SessionRoutes:
    def __init__(self, store: SessionStore, chat: ChatServing) -> None:
        self.store, self.chat_serving = store, chat

    def register(self, app: App, guard: Guard | None) -> None:
        app.collection("/sessions", "session_id", self, guard)
        app.route("POST", "/sessions/{session_id}/messages", self.append, guard)
        app.route("POST", "/sessions/{session_id}/chat", self.chat, guard)

    def _session(self, http: HttpRequest) -> Session:
        session = self.store.get(http.path_params["session_id"], key_owner(http))
        if session is None:
            raise ApiError(404, f"no session {http.path_params['session_id']!r}", code="session_not_found")
        return session

    async def create(self, http: HttpRequest) -> Response:
        body = http.json(NewSession) if http.body else NewSession()
        session = self.store.create(key_owner(http), body.title, _plain(body.messages))
        await self.store.save()
        return Response(session.public(), 201)

    async def list(self, http: HttpRequest) -> Response:
        return Response({"object": "list", "data": [s.summary() for s in self.store.owned_by(key_owner(http))]})

    async def show(self, http: HttpRequest) -> Response:
        return Response(self._session(http).public())

    async def delete(self, http: HttpRequest) -> Response:
        session = self._session(http)
        self.store.delete(session.id)
        await self.store.save()
        return Response({"id": session.id, "deleted": True})

    async def append(self, http: HttpRequest) -> Response:
        session = self._session(http)
        self.store.append(session, *_plain(http.json(Append).messages))
        await self.store.save()
        return Response(session.summary())

    async def chat(self, http: HttpRequest) -> Response:
        session = self._session(http)
        body = http.json(ChatCompletionRequest)
        if body.stream:
            raise ApiError(400, "stream: session chat replies are not streamed", param="stream")
        turn = _plain(body.messages)
        self.store.check_room(session, *turn)
        history = msgspec.convert(session.messages + turn, list[ChatMessage])
        dropped = 1  # then 2, 4, ...: a history far over the context takes a few tries, not one per message
        while True:
            try:
                reply = await self.chat_serving.complete(
                    msgspec.structs.replace(body, messages=history), http.headers, key_owner(http)
                )
                break
            except ApiError as error:
                shorter = _without_oldest(history, dropped, keep=len(turn))
                if error.code != "context_length_exceeded" or shorter is None:
                    raise
                history, dropped = shorter, dropped * 2
        message = reply["choices"][0]["message"]
        answer = {"role": "assistant", "content": message["content"]}
        if "tool_calls" in message:  # the history holds the calls, so the next turn can answer them
            answer["tool_calls"] = message["tool_calls"]
        self.store.append(session, *turn, answer)
        await self.store.save()
        return Response({**reply, "session_id": session.id})


def _without_oldest(history: list[ChatMessage], count: int, *, keep: int) -> list[ChatMessage] | None:
    """The history without its `count` oldest messages that are neither system messages nor among the last `keep`
    (the new turn); None when there is nothing left to drop."""
    droppable = [i for i, m in enumerate(history[: len(history) - keep]) if m.role not in ("system", "developer")]
    if not droppable:
        return None
    gone = set(droppable[:count])
    return [m for i, m in enumerate(history) if i not in gone]
