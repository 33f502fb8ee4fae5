"""`POST /v1/responses`: a response request run as the chat it is (`ChatPreparation.prepared_chat`, so admission,
policy, route, failover, guided decoding and tool parsing are the chat's own), answered whole or as the Responses
API's typed event stream, and kept for `previous_response_id` and `GET /v1/responses/{id}` when stored (`DELETE`
forgets it). A stream always ends with the event that says how (`events`): a request that fails after its first
token ends with `response.failed`. With `background: true` the reply is the response `queued` at once (or, with
`stream`, its events as they come); it runs as a task of the gateway's (`BackgroundTasks`), its states kept as they
come for the client to poll, its events for it to stream again (`event_logs.py`), and `POST
/v1/responses/{id}/cancel` ends it `cancelled`. One a restart interrupted reads `failed`, saying so.

The gateway's core answers it: an API server passes it on (its route table has no `/v1/responses`), so every
stored response is in one place whichever API server a follow-up reaches."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import structlog

from sagellm.gateway.http.app import App, EventStream, Guard, HttpRequest, LastEvents, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.http.paging import ordered_page
from sagellm.gateway.openai.chat_completion.preparation import ChatPreparation
from sagellm.gateway.openai.chat_completion.protocol import audio_parts, image_parts, images_named
from sagellm.gateway.openai.generation.reply_bodies import request_metrics, usage
from sagellm.gateway.openai.responses.content import input_audios, input_images
from sagellm.gateway.openai.responses.conversation_routes import ConversationRoutes
from sagellm.gateway.openai.responses.conversations import (
    CONVERSATIONS_DIR,
    Conversation,
    ConversationStore,
    kept_items,
)
from sagellm.gateway.openai.responses.event_logs import EventLogs
from sagellm.gateway.openai.responses.events import ResponseEvents, response_error
from sagellm.gateway.openai.responses.protocol import (
    ResponsesRequest,
    chat_body,
    conversation_after,
    conversation_id,
    created_at,
    new_id,
    output_items,
    reasoning_effort,
    reasoning_item,
    refuse_include,
    response_body,
)
from sagellm.gateway.openai.responses.store import RESPONSES_DIR, ResponseStore
from sagellm.gateway.replies.choice import Choice, collect_choices, first_or_raise
from sagellm.gateway.replies.reader import Reply, ReplyReader, rendered
from sagellm.gateway.serving.background import BackgroundTasks
from sagellm.gateway.serving.item_stream import ItemStream
from sagellm.runtime.pipeline.messages import RequestError, TokenDelta

log = structlog.get_logger("sagellm.responses")


class ResponsesRoutes:
    def __init__(
        self, chat: ChatPreparation, store: ResponseStore, tasks: BackgroundTasks, conversations: ConversationStore
    ) -> None:
        self.chat, self.store, self.tasks, self.conversations = chat, store, tasks, conversations
        self.event_logs = EventLogs()  # background responses' events, to stream them again
        for stored in store.unfinished():
            assert stored.body is not None
            error = {"code": "server_error", "message": "the gateway restarted before this response finished"}
            store.keep(
                stored.id, stored.owner, stored.conversation, {**stored.body, "status": "failed", "error": error}
            )

    @classmethod
    def kept_in(cls, state_dir: Path, chat: ChatPreparation, tasks: BackgroundTasks) -> ResponsesRoutes:
        """The routes over the responses and conversations kept under `state_dir`."""
        store = ResponseStore(root=state_dir / RESPONSES_DIR)
        return cls(chat, store, tasks, ConversationStore(state_dir / CONVERSATIONS_DIR))

    def register(self, app: App, guard: Guard | None) -> None:
        app.route("POST", "/v1/responses", self.create, guard)
        ConversationRoutes(self.conversations).register(app, guard)
        app.route("GET", "/v1/responses/{response_id}", self.retrieve, guard)
        app.route("DELETE", "/v1/responses/{response_id}", self.delete, guard)
        app.route("POST", "/v1/responses/{response_id}/cancel", self.cancel, guard)
        app.route("GET", "/v1/responses/{response_id}/input_items", self.input_items, guard)

    def _conversation(self, body: ResponsesRequest, owner: str) -> Conversation | None:
        """The conversation the response continues, if it names one (not with previous_response_id: one history)."""
        conversation = conversation_id(body)
        if conversation is None:
            return None
        if body.previous_response_id is not None:
            raise ApiError(400, "conversation: a response continues a conversation or a previous response, not both",
                           param="conversation")  # fmt: skip
        return self.conversations.get(conversation, owner)

    async def retrieve(self, http: HttpRequest) -> Response | EventStream:
        """The stored response; with `stream=true`, a background response's events after `starting_after` (all of
        them without it), as they come until it ends."""
        response_id, query = http.path_params["response_id"], http.query
        body = self.store.get(response_id, key_owner(http))
        if query.get("stream", "false") not in ("true", "false"):
            raise ApiError(400, f"stream: true or false, got {query['stream']!r}", param="stream")
        after = query.get("starting_after")
        if query.get("stream") != "true":
            if after is not None:
                raise ApiError(400, "starting_after: a place in the response's events, with stream=true",
                               param="starting_after")  # fmt: skip
            return Response(body)
        if after is not None and not after.lstrip("-").isdigit():
            raise ApiError(400, f"starting_after: an event's sequence number, got {after!r}", param="starting_after")
        return EventStream(self.event_logs.get(response_id).follow(int(after) if after is not None else -1))

    async def input_items(self, http: HttpRequest) -> Response:
        """A page of the items the response was answered after (a previous response's input and output, or the
        conversation's items, then its own input), newest first by default (OpenAI's)."""
        refuse_include(http.query)
        items = self.store.input_items(http.path_params["response_id"], key_owner(http))
        return Response(ordered_page(items, http.query))

    async def delete(self, http: HttpRequest) -> Response:
        response_id, owner = http.path_params["response_id"], key_owner(http)
        self.store.delete(response_id, owner)
        self.tasks.cancel(response_id)  # a background one still running is not answered to anyone
        return Response({"id": response_id, "object": "response", "deleted": True})

    async def cancel(self, http: HttpRequest) -> Response:
        """Cancels a background response that runs (OpenAI's: only those can be); one already done is as it is."""
        response_id, owner = http.path_params["response_id"], key_owner(http)
        body = self.store.get(response_id, owner)
        if not body.get("background"):
            raise ApiError(400, f"response {response_id!r} was not created in the background; only those are cancelled",
                           param="response_id")  # fmt: skip
        if self.tasks.cancel(response_id):
            body = {**body, "status": "cancelled"}
            self.store.keep(response_id, owner, self.store.conversation(response_id, owner), body)
        return Response(body)

    async def create(self, http: HttpRequest) -> Response | EventStream:
        body = http.json(ResponsesRequest)
        owner = key_owner(http)
        thread = self._conversation(body, owner)
        history = thread.history() if thread is not None else self.store.conversation(body.previous_response_id, owner)
        chat, conversation, namespaces = chat_body(body, history)
        given = kept_items(body.input)  # checked by chat_body
        context = (
            list(thread.items) if thread is not None else self.store.context_items(body.previous_response_id, owner)
        )
        if self.chat.honours_effort(chat.model):  # else `reasoning` is taken and echoed, changing nothing
            chat.reasoning_effort = reasoning_effort(body.reasoning)
        # an image's refusal names its input part; the images of earlier inputs, fetched again, the response named
        earlier = ["previous_response_id"] * (len(image_parts(chat)) - len(input_images(body.input)))
        heard = ["previous_response_id"] * (len(audio_parts(chat)) - len(input_audios(body.input)))
        with images_named(chat, earlier + input_images(body.input), heard + input_audios(body.input)):
            request, plan, _ = await self.chat.prepared_chat(chat, http.headers, owner)
        response_id, created = new_id("resp"), created_at()
        model = request.model or self.chat.core.model_name

        def answer(choice: Choice, reply: Reply) -> dict[str, Any]:
            output = output_items(reply.content, reply.calls, namespaces)
            if reply.reasoning is not None:  # the thinking first, as a reasoning item
                output.insert(0, reasoning_item(reply.reasoning))
            done = response_body(response_id, model, body, output, usage([choice]), choice.finish_reason, created)
            if self.chat.per_request_metrics:  # vLLM's, at the top level (a streamed one's in response.completed)
                done["metrics"] = request_metrics([choice])
            if thread is not None:  # the conversation goes on with this turn's input and output
                self.conversations.add(thread, given + output)
            if body.store:
                after = conversation_after(conversation, reply.content, reply.calls)
                self.store.keep(response_id, owner, after, done, context + given)
            return done

        def failed(error: dict[str, str]) -> dict[str, Any]:
            return response_body(response_id, model, body, [], None, None, created, status="failed", error=error)

        if body.background:
            queued = response_body(response_id, model, body, [], None, None, created, status="queued")
            self.store.keep(response_id, owner, conversation, queued, context + given)
            snapshot = {**queued, "status": "in_progress"}
            events, log = ResponseEvents(snapshot, namespaces), self.event_logs.open(response_id)

            def failed_kept(error: dict[str, str]) -> dict[str, Any]:  # kept, for whoever polls it
                ended = failed(error)
                self.store.keep(response_id, owner, conversation, ended)
                return ended

            async def run() -> None:
                self.store.keep(response_id, owner, conversation, snapshot)
                stream = self.chat.core.submit(request)
                try:
                    first = await first_or_raise(stream)
                    async for ready in _events(events, first, stream, ReplyReader(plan), answer, failed_kept):
                        log.add(ready)
                except Exception as error:  # a failure before its first token: the request's, or this code's
                    code, why = (error.code, error.message) if isinstance(error, ApiError) else ("internal", str(error))
                    log.add([*events.start(), *events.fail(failed_kept(response_error(code, why)))])
                finally:
                    stream.cancel()  # a cancelled response's request ends too (a no-op once it has)
                    log.end()

            self.tasks.start(response_id, run)
            # Streamed, its events are the log's: a client that leaves does not stop it (it is a background one).
            return EventStream(log.follow(-1)) if body.stream else Response(queued)
        if not body.stream:
            (choice,) = await collect_choices([self.chat.core.submit(request)])
            reply = ReplyReader.whole(plan, choice.text) if plan.reads else Reply(None, choice.text or None, [])
            return Response(answer(choice, reply))
        stream = self.chat.core.submit(request)
        first = await first_or_raise(stream)
        snapshot = response_body(response_id, model, body, [], None, None, created, status="in_progress")
        events = _events(ResponseEvents(snapshot, namespaces), first, stream, ReplyReader(plan), answer, failed)
        return EventStream(events, on_disconnect=stream.cancel)


async def _events(
    events: ResponseEvents,
    first: TokenDelta,
    stream: ItemStream,
    reader: ReplyReader,
    answer: Callable[[Choice, Reply], dict[str, Any]],
    failed: Callable[[dict[str, str]], dict[str, Any]],
) -> AsyncIterator[Any]:
    """The stream's events: text deltas and calls as the reply's tokens come (read for thinking and tool calls as
    the request's plan says), the whole response last, its thinking a reasoning item; a failure after the start (the
    request's, or this code's) ends it with `response.failed`."""
    yield tuple(events.start())
    choice = Choice(0)
    item: TokenDelta | RequestError = first
    ready: list[dict[str, Any]] = []
    try:
        while not isinstance(item, RequestError):
            choice.add(item)
            ready = rendered(reader.step(item.text, item.finished), events)
            if item.finished:
                break
            if ready:
                yield tuple(ready)
            following = await anext(stream, None)
            if following is None:
                break
            item = following
        if isinstance(item, RequestError):
            last = events.fail(failed(response_error(item.code, item.message)))
        else:
            last = [*ready, *events.finish(answer(choice, reader.reply))]
    except Exception as exc:  # a fault of this code's must still end the stream as clients expect
        log.exception("responses_stream_failed", error=str(exc))
        stream.cancel()
        last = events.fail(failed(response_error("internal", f"the response failed: {exc}")))
    yield LastEvents(last)
