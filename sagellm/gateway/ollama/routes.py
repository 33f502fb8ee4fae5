"""Ollama's API: `/api/version`, `/api/tags`, `/api/show`, `/api/ps`, `/api/chat` and `/api/generate` (whole, or
streamed as NDJSON lines, Ollama's default), `/api/embed` and the older `/api/embeddings`; errors as Ollama writes
them. A chat or a templated generate runs as the chat it is (`ChatPreparation.prepared_chat`: admission, policy,
route, failover, guided decoding, tool and thinking parsing are the chat's own), a raw generate as the completion of
its prompt, an embed through the embeddings' own path: no side path.

The gateway's core answers these routes: an API server passes them on (its route table has none)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from sagellm.gateway.http.app import App, EventStream, Guard, HttpRequest, LastEvents, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.ollama.cards import OllamaCards
from sagellm.gateway.ollama.protocol import (
    ChatRequest,
    EmbeddingsRequest,
    EmbedRequest,
    GenerateRequest,
    ModelRequest,
    PullRequest,
    chat_of,
    generate_chat,
    keep_alive_s,
    raw_completion,
    refuse_unserved,
    sampling_fields,
)
from sagellm.gateway.ollama.pull import Pulls, pull_lines
from sagellm.gateway.ollama.replies import NS, ChatLines, GenerateLines, error_response
from sagellm.gateway.openai.chat_completion.preparation import ChatPreparation
from sagellm.gateway.openai.chat_completion.protocol import ChatCompletionRequest, images_named
from sagellm.gateway.openai.completion.api_router import CompletionRoutes
from sagellm.gateway.openai.embedding.api_router import EmbeddingRoutes
from sagellm.gateway.openai.generation.serving import generation_model
from sagellm.gateway.replies.choice import Choice, collect_choices, first_or_raise
from sagellm.gateway.replies.reader import Reply, ReplyPlan, ReplyReader, rendered
from sagellm.gateway.serving.core import ServingCore
from sagellm.gateway.serving.errors import api_error
from sagellm.gateway.serving.item_stream import ItemStream
from sagellm.runtime.pipeline.messages import Request, RequestError, TokenDelta

OLLAMA_VERSION = "0.13.0"  # the Ollama API these routes follow (clients read it to know what a server takes)
# Ollama's routes that change its model store, not served here: a 404 saying so in Ollama's shape, not OpenAI's.
NOT_SERVED = (
    ("POST", "/api/create"),
    ("POST", "/api/copy"),
    ("DELETE", "/api/delete"),
    ("POST", "/api/push"),
    ("GET", "/api/blobs/{digest}"),
    ("POST", "/api/blobs/{digest}"),
)  # fmt: skip (GET answers HEAD)

Lines = ChatLines | GenerateLines


class OllamaRoutes:
    def __init__(
        self, core: ServingCore, chat: ChatPreparation, completions: CompletionRoutes, embeddings: EmbeddingRoutes
    ) -> None:
        self.core, self.chat, self.completions, self.embeddings = core, chat, completions, embeddings
        self.cards = OllamaCards(core)
        self.pulls = Pulls(core)

    def register(self, app: App, guard: Guard | None) -> None:
        for method, path, handler in (
            ("GET", "/api/version", self.version),
            ("GET", "/api/tags", self.tags),
            ("POST", "/api/show", self.show),
            ("GET", "/api/ps", self.ps),
            ("POST", "/api/chat", self.chat_route),
            ("POST", "/api/generate", self.generate),
            ("POST", "/api/embed", self.embed),
            ("POST", "/api/embeddings", self.embeddings_route),
            ("POST", "/api/pull", self.pull),
        ):
            app.route(method, path, handler, guard, error_response)
        for method, path in NOT_SERVED:
            app.route(method, path, self.not_served, guard, error_response)

    async def version(self, _: HttpRequest) -> Response:
        return Response({"version": OLLAMA_VERSION})

    async def tags(self, http: HttpRequest) -> Response:
        return Response({"models": self.cards.listed(key_owner(http))})

    async def ps(self, _: HttpRequest) -> Response:
        return Response({"models": self.cards.running()})

    async def show(self, http: HttpRequest) -> Response:
        body = http.json(ModelRequest)
        return Response(self.cards.show(self.cards.served_name(body.named())))

    async def pull(self, http: HttpRequest) -> Response | EventStream:
        """A model served here is pulled: downloaded now when it is a model on demand whose files are not here yet
        (`ollama.pull`), else there already; fetching a model not served here is not served yet (a 404 saying how
        models are added)."""
        body = http.json(PullRequest)
        name = body.named()
        try:
            served = self.cards.served_name(name)
        except ApiError:
            why = "models are added with `sagellm serve --model NAME=MODEL` (loaded on demand) or the management API"
            raise ApiError(404, f"pulling {name!r} is not served here yet: {why}", code="not_found") from None
        source = self.pulls.source_to_download(served)
        if source is None:
            statuses = [{"status": "pulling manifest"}, {"status": "success"}]
            return EventStream(_each(statuses), ndjson=True) if body.stream else Response(statuses[-1])
        download = self.pulls.start(source)
        if not body.stream:
            return Response(await self.pulls.finished(download))
        return EventStream(pull_lines(download), ndjson=True)

    async def not_served(self, http: HttpRequest) -> Response:
        why = "models are added with `sagellm serve --model NAME=MODEL` or the management API"
        raise ApiError(404, f"{http.method} {http.path} is not served here: {why}", code="not_found")

    async def chat_route(self, http: HttpRequest) -> Response | EventStream:
        body = http.json(ChatRequest)
        model = self.cards.served_name(body.model)
        refuse_unserved(body)
        self._check_thinking(model, body.think)
        unload = self._keep_alive(model, body.keep_alive)
        if not body.messages:  # Ollama's way to load a model (or, with keep_alive 0, to unload it): nothing to say
            return await self._loaded(model, ChatLines(body.model).line({"content": ""}), unload)
        chat = chat_of(body, model)
        names = [f"messages[{i}].images[{j}]" for i, m in enumerate(body.messages) for j in range(len(m.images or ()))]
        return await self._run_chat(http, chat, names, ChatLines(body.model), body.stream)

    async def generate(self, http: HttpRequest) -> Response | EventStream:
        body = http.json(GenerateRequest)
        model = self.cards.served_name(body.model)
        lines = GenerateLines(body.model)
        refuse_unserved(body)
        self._check_thinking(model, body.think)
        unload = self._keep_alive(model, body.keep_alive)
        if not body.prompt and not body.images:  # load the model (or unload it), as Ollama's empty generate does
            return await self._loaded(model, lines.line(""), unload)
        if not body.raw:
            names = [f"images[{j}]" for j in range(len(body.images or ()))]
            return await self._run_chat(http, generate_chat(body, model), names, lines, body.stream)
        engine_model = generation_model(self.core, model)
        (request,) = await self.completions.prepared(raw_completion(body, model), http, engine_model)
        return await self._run(request, ReplyPlan(), lines, body.stream)

    async def embed(self, http: HttpRequest) -> Response:
        body = http.json(EmbedRequest)
        model = self.core.embedding_model(self.cards.served_name(body.model))
        _embedding_options(body.options)
        self._keep_alive(model, body.keep_alive)
        inputs = [body.input] if isinstance(body.input, str) else list(body.input)
        if not inputs or not all(inputs):
            raise ApiError(400, "input: a non-empty string or list of non-empty strings", param="input")
        start = time.perf_counter()
        results = await self.embeddings.vectors(model, inputs, body.dimensions, key_owner(http), truncate=body.truncate)
        total = int((time.perf_counter() - start) * NS)
        return Response({"model": body.model, "embeddings": [r.vector for r in results], "total_duration": total,
                         "load_duration": 0, "prompt_eval_count": sum(r.prompt_tokens for r in results)})  # fmt: skip

    async def embeddings_route(self, http: HttpRequest) -> Response:
        body = http.json(EmbeddingsRequest)
        model = self.core.embedding_model(self.cards.served_name(body.model))
        _embedding_options(body.options)
        self._keep_alive(model, body.keep_alive)
        (result,) = await self.embeddings.vectors(model, [body.prompt], None, key_owner(http))
        return Response({"embedding": result.vector})

    # -------------------------------------------------------------------------------------------------- running
    def _check_thinking(self, model: str, think: bool | str | None) -> None:
        """Thinking asked of a model that cannot think is a 400, as Ollama's (`think: false` asks nothing); another
        server's model is left to say so itself."""
        if think in (None, False) or not self.cards.knows(model):
            return
        if "thinking" not in self.cards.capabilities(model):
            raise ApiError(400, f"think: {model!r} does not support thinking", param="think")

    def _keep_alive(self, model: str, value: str | float | None) -> bool:
        """A request's `keep_alive` applied to its model: a model on demand stays loaded that long once idle (0:
        unloaded as soon as its requests are done); the graph's own models stay loaded, so 0 is a 400 for them.
        Whether it asked for the model to be unloaded."""
        seconds = keep_alive_s(value)
        if seconds is None:
            return False
        pool = self.core.readiness.models_on_demand
        if pool is not None and model in pool.models:
            pool.keep_alive(model, seconds)
        elif seconds == 0:
            why = f"0 unloads a model loaded on demand; {model!r} is the graph's own and stays loaded"
            raise ApiError.unsupported("keep_alive", why)
        return seconds == 0

    async def _loaded(self, model: str, line: dict[str, Any], unload: bool) -> Response:
        """An empty chat or generate: the model loaded (a model on demand) and ready, `done_reason` "load"; with
        `unload` (keep_alive 0: `ollama stop`), left to unload once its requests are done, "unload"."""
        if unload:
            return Response({**line, "done": True, "done_reason": "unload"})
        engine_model = generation_model(self.core, model)
        await self.core.readiness.model_ready(engine_model)
        self.core.readiness.not_submitting(engine_model)
        return Response({**line, "done": True, "done_reason": "load"})

    async def _run_chat(
        self, http: HttpRequest, chat: ChatCompletionRequest, image_names: list[str], lines: Lines, stream: bool
    ) -> Response | EventStream:
        with images_named(chat, image_names):  # an image's refusal names it as the request did
            request, plan, _ = await self.chat.prepared_chat(chat, http.headers, key_owner(http))
        return await self._run(request, plan, lines, stream)

    async def _run(self, request: Request, plan: ReplyPlan, lines: Lines, stream: bool) -> Response | EventStream:
        if not stream:
            (choice,) = await collect_choices([self.core.submit(request)])
            reply = ReplyReader.whole(plan, choice.text) if plan.reads else Reply(None, choice.text or None, [])
            if isinstance(lines, ChatLines):
                return Response(lines.whole(choice, reply.reasoning, reply.content, reply.calls))
            return Response(lines.whole(choice, reply.reasoning, reply.content))
        items = self.core.submit(request)
        first = await first_or_raise(items)
        return EventStream(_lines(lines, first, items, ReplyReader(plan)), on_disconnect=items.cancel, ndjson=True)


async def _lines(lines: Lines, first: TokenDelta, items: ItemStream, reader: ReplyReader) -> AsyncIterator[Any]:
    """The reply's lines as its tokens come (read as the request's plan says: thinking, text, tool calls), the
    counts last; a failure after the start is a last line of its own, `{"error": ...}`, as Ollama's streams end."""
    choice = Choice(0)
    item: TokenDelta | RequestError = first
    while True:
        if isinstance(item, RequestError):
            yield LastEvents(({"error": api_error(item).message},))
            return
        choice.add(item)
        ready = rendered(reader.step(item.text, item.finished), lines)
        if item.finished:
            yield LastEvents((*ready, lines.last(choice)))
            return
        if ready:
            yield tuple(ready)
        try:
            item = await anext(items)
        except StopAsyncIteration:
            yield LastEvents((lines.last(choice),))
            return


async def _each(lines: list[dict[str, Any]]) -> AsyncIterator[Any]:
    yield LastEvents(tuple(lines))


def _embedding_options(options: dict[str, Any] | None) -> None:
    """An embed's options are Ollama's too (load options, which place the model): none changes a vector here, and
    a name Ollama does not take is a 400 (`sampling_fields` checks them)."""
    sampling_fields(options)
