"""The OpenAI API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`, and sageLLM's
`/v1/requests/{id}` (a request's status).

A generation request becomes pipeline `Request`s submitted to the serving core, whichever instance serves its model
(the graph's engines, or servers attached to the registry); the reply is read from the request's stream. A streamed
request waits for its first item before answering, so a request the graph rejects up front (context too long,
overloaded, no healthy instance) gets its proper HTTP status instead of a 200 stream holding an error; a failure
after the first token ends the stream with an `error` event and `[DONE]`, never as text."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import msgspec
import numpy as np
import trio

from sagellm.common.errors import FieldError
from sagellm.gateway.config import KVTransferSettings
from sagellm.gateway.http.app import App, EventStream, Guard, HttpRequest, LastEvents, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.indexes.store import IndexStore
from sagellm.gateway.openai import kv_transfer
from sagellm.gateway.openai.chat_templates import fallback_template, rendering_template, takes_reasoning_effort
from sagellm.gateway.openai.choices import best_of, fan_out
from sagellm.gateway.openai.echo import Echo
from sagellm.gateway.openai.harmony import CALL, RETURN
from sagellm.gateway.openai.kv_peers import KVPeers
from sagellm.gateway.openai.kv_transfer import RemotePrefill
from sagellm.gateway.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    chat_request,
    completion_requests,
)
from sagellm.gateway.openai.reasoning_parsers import ReasoningEvent, default_parser, parser_class, starts_inside
from sagellm.gateway.openai.replies import (
    Choice,
    Envelope,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    prompt_logprobs_json,
    usage,
)
from sagellm.gateway.openai.reply_reader import ReplyPlan, ReplyReader
from sagellm.gateway.openai.structured import check_compiles, guided_decoding
from sagellm.gateway.openai.tool_parsers import ContentEvent, ToolCallEvent, parser_for
from sagellm.gateway.openai.tools import ToolUse, plan, tool_call_json
from sagellm.gateway.serving.choice_streams import ChoiceStreams
from sagellm.gateway.serving.core import ServingCore
from sagellm.gateway.serving.errors import api_error
from sagellm.gateway.serving.request_stream import RequestStream, embedded
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.engine.outputs import TokenLogprob
from sagellm.runtime.engine.request_limits import MAX_EMBEDDING_INPUTS
from sagellm.runtime.engine.thinking import ThinkingBudget
from sagellm.runtime.pipeline.messages import Request, RequestError, TokenDelta

DONE = b"[DONE]"
# Template settings that shape the prompt's end, not the reply's start (whether it opens inside the thinking)
_PROMPT_SHAPE = ("add_generation_prompt", "continue_final_message")
TEXT_PROBE = "\x00text\x00"  # stands for a delta's text in a chunk's template (no real text is a NUL-framed word)


# A streamed chat's first chunk: the assistant's role, before any content (as OpenAI's streams open).
CHAT_OPENING = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


class OpenAIRoutes:
    def __init__(
        self,
        core: ServingCore,
        indexes: IndexStore | None = None,
        to_core: Callable[[HttpRequest], Awaitable[Response]] | None = None,
        tool_call_parser: str | None = None,
        reasoning_parser: str | None = None,
        reasoning_budget: int | None = None,
        kv_transfer: KVTransferSettings | None = None,
    ) -> None:
        """`indexes`: the retrieval indexes chats may name (`"index"`); None in an API server's process, which
        passes such chats on to the gateway's core, that holds them (`to_core`). `tool_call_parser`: how tool calls
        are read from replies, `reasoning_parser` how thinking is (None: each chosen from the model's template);
        `reasoning_budget`: the thinking tokens of a request that sets no budget of its own (None: no bound);
        `kv_transfer`: this server's part in disaggregated serving across servers (None: none, `kv_transfer_params`
        refused; an API server's, whose core keeps no KV for other servers)."""
        self.core = core
        self.indexes = indexes
        self.to_core = to_core
        if tool_call_parser is not None:
            parser_for(tool_call_parser)  # an unknown name stops the start, naming the known ones
        self.tool_call_parser = tool_call_parser
        if reasoning_parser is not None:
            parser_class(reasoning_parser)  # as above
        self.reasoning_parser = reasoning_parser
        self.reasoning_budget = reasoning_budget
        self._starts_thinking: dict[tuple[str, str], bool] = {}  # (template, its settings) -> a reply opens inside
        self.created = int(time.time())
        self._kv_http: httpx.AsyncClient | None = None  # fetches prefills' KV from other servers, once one is asked
        self.kv_peers = KVPeers(kv_transfer)  # its listed prefill servers' names resolved now, once

    def register(self, app: App, guard: Guard | None) -> None:
        app.route("GET", "/v1/models", self.models, guard)
        self.register_generation(app, guard)
        app.route("GET", "/v1/requests/{request_id}", self.request_status, guard)

    def register_generation(self, app: App, guard: Guard | None) -> None:
        """The routes that run requests: all an API server answers itself (`api_server`)."""
        app.route("POST", "/v1/completions", self.completions, guard)
        app.route("POST", "/v1/chat/completions", self.chat, guard)
        app.route("POST", "/v1/embeddings", self.embeddings, guard)

    async def request_status(self, http: HttpRequest) -> Response:
        """Where a request is (queued, running, completed, failed, cancelled), by the `id` of its reply; only the API
        key that sent it reads it (another key gets the 404 of an unknown id)."""
        request_id = http.path_params["request_id"]
        status = self.core.request_status(request_id, key_owner(http))
        if status is None:
            raise ApiError(404, f"no request {request_id!r} here (or it ended long ago)", code="not_found")
        return Response(status)

    # -- models ---------------------------------------------------------------------------------------------------
    async def models(self, _: HttpRequest) -> Response:
        def card(name: str) -> dict[str, Any]:
            embedder = self.core.embedder(name)
            own = self.core.max_model_len if name == self.core.model_name else None
            length = {"max_model_len": embedder.max_length if embedder is not None else own}
            pool = getattr(self.core, "models_on_demand", None)  # (an API server's core loads none)
            status = {}
            if pool is not None:  # the graph's own models are loaded as long as it runs
                status = {"status": pool.status(name) if name in pool.models else {"value": "loaded"}}
            return {"id": name, "object": "model", "created": self.created, "owned_by": "sagellm", **length, **status}

        def adapter(name: str, path: str, parent: str) -> dict[str, Any]:  # vLLM's card of a LoRA adapter
            return {**card(parent), "id": name, "root": path, "parent": parent}

        adapters = [adapter(ref.name, ref.path, parent) for ref, parent in self.core.lora_adapters()]
        return Response({"object": "list", "data": [card(name) for name in self.core.models()] + adapters})

    # -- completions ----------------------------------------------------------------------------------------------
    async def completions(self, http: HttpRequest) -> Response | EventStream:
        body = http.json(CompletionRequest)
        model = self.core.instance_model(body.model)
        await self.core.model_ready(model)
        defaults = self.core.sampling_defaults(model)
        constraint = guided_decoding(body)
        guided = constraint[0] if constraint else None
        requests = completion_requests(body, http.headers, lambda: self.core.new_id("cmpl"), defaults, guided)
        for request in requests:
            request.model, request.owner, request.lora = model, key_owner(http), self.core.lora_of(body.model)
        if body.echo and model is not None:
            raise ApiError(400, f"echo: served for the graph's own model, not {model}", param="echo")
        count = body.best_of or body.n  # choices run per prompt
        await self._hand_off(body, requests, count)
        await self._prepare(requests, constraint, every_prompt=body.echo or count > 1)
        echoes = [Echo.of(r, self.core.tokenizer, body.max_tokens == 0) for r in requests] if body.echo else None
        new_id = lambda: self.core.new_id("cmpl")  # noqa: E731
        prompt_each = body.stream and body.echo  # each streamed choice shows the prompt it scored
        runs = [run for r in requests for run in fan_out(r, count, new_id, count > body.n, prompt_each)]
        envelope = Envelope(requests[0].request_id, model or self.core.model_name, "text_completion")
        wants_logprobs, ids = body.logprobs is not None, body.return_token_ids
        if body.stream:
            if len(requests) > 1:
                raise ApiError(400, "stream=true takes one prompt; send several requests", param="prompt")
            streams = ChoiceStreams(self.core.submit_all(runs))
            first = await first_or_raise(streams)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            echo = echoes[0] if echoes else None
            renders = [self._completion_render(i, wants_logprobs, echo) for i in range(len(runs))]
            events = _events(envelope, first, streams, renders, wants_logprobs, include_usage, ids=ids, echo=body.echo)
            return EventStream(events, on_disconnect=streams.cancel)
        ran = await collect_choices(self.core.submit_all(runs))
        kv = self._kv_reply(requests[0], http)
        scored_prompts = [ran[i].prompt_logprobs for i in range(0, len(ran), count)]  # each prompt's first choice's
        choices = best_of(ran, count, body.n, wants_logprobs) if count > body.n else ran
        body_fields = [
            self._completion_choice(
                c, echoes[c.index // body.n] if echoes else None, scored_prompts[c.index // body.n], wants_logprobs,
                body.prompt_logprobs is not None,
            ) | ({"token_ids": c.token_ids} if ids else {})
            for c in choices
        ]  # fmt: skip
        return Response(envelope.body(body_fields, usage=usage(ran, count), **kv))

    def _completion_choice(
        self,
        choice: Choice,
        echo: Echo | None,
        scored_prompt: list[TokenLogprob | None] | None,
        logprobs: bool,
        prompt_logprobs: bool,
    ) -> dict[str, Any]:
        """A whole completion's choice: rendered as a stream's one delta would be (after the prompt, with `echo`),
        and vLLM's prompt_logprobs when asked (`scored_prompt`: the prompt's, which its first choice carried)."""
        whole = TokenDelta(
            request_id="", token_ids=choice.token_ids, text=choice.text, finish_reason=choice.finish_reason,
            logprobs=choice.logprobs, prompt_logprobs=scored_prompt,
        )  # fmt: skip
        fields = self._completion_render(choice.index, logprobs, echo)(whole)
        if prompt_logprobs:
            fields["prompt_logprobs"] = prompt_logprobs_json(self.core.tokenizer, scored_prompt or [])
        return fields

    def _completion_render(
        self, index: int, logprobs: bool, echo: Echo | None
    ) -> Callable[[TokenDelta], dict[str, Any]]:
        """Streamed completion choice `index`'s fields for each delta (logprobs count their text offset along);
        with `echo`, its first shown delta comes after the prompt (scored by choice 0: its first delta's)."""
        offset = 0
        prompt = echo

        def render(item: TokenDelta) -> dict[str, Any]:
            nonlocal offset, prompt
            tokenizer = self.core.tokenizer
            if prompt is not None:
                text = prompt.text_with(item.text)
                lp = prompt.logprobs_with(tokenizer, item.prompt_logprobs, item.logprobs or []) if logprobs else None
                prompt = None
            else:
                text = item.text
                lp = completion_logprobs(tokenizer, item.logprobs or [], offset) if logprobs else None
            offset += len(text)
            reason = finish_reason(item.finish_reason)
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}

        return render

    # -- chat -----------------------------------------------------------------------------------------------------
    async def chat(self, http: HttpRequest) -> Response | EventStream:
        body = http.json(ChatCompletionRequest)
        if body.index is not None and self.indexes is None and self.to_core is not None and not body.stream:
            return await self.to_core(http)  # an API server: the core holds the indexes and answers it whole
        if not body.stream:
            return Response(await self.complete_chat(body, http.headers, key_owner(http), http))
        request, plan, sources = await self.prepared_chat(body, http.headers, key_owner(http))
        envelope = Envelope(request.request_id, request.model or self.core.model_name, "chat.completion.chunk")
        streams = ChoiceStreams(self.core.submit_all(self._chat_choices(request, body.n)))
        first = await first_or_raise(streams)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        renders = [self._chat_render(i, body.logprobs, plan) for i in range(body.n)]
        events = _events(envelope, first, streams, renders, body.logprobs, include_usage, opening=CHAT_OPENING,
                         ids=body.return_token_ids, sources=sources, parsed=plan.reads)  # fmt: skip
        return EventStream(events, on_disconnect=streams.cancel)

    def _chat_choices(self, request: Request, n: int) -> list[Request]:
        return fan_out(request, n, lambda: self.core.new_id("chatcmpl"))

    async def complete_chat(
        self, body: ChatCompletionRequest, headers: dict[str, str], owner: str = "", http: HttpRequest | None = None
    ) -> dict[str, Any]:
        """A whole chat completion as OpenAI's response body (the sessions route uses it too); `owner`: who may read
        its status; `http`: the call it answers (where a prefill's KV is fetched from, for kv_transfer_params)."""
        request, plan, sources = await self.prepared_chat(body, headers, owner)
        envelope = Envelope(request.request_id, request.model or self.core.model_name, "chat.completion")
        choices = await collect_choices(self.core.submit_all(self._chat_choices(request, body.n)))
        kv = self._kv_reply(request, http)
        fields = [self._chat_choice(c, plan, body.logprobs, body.return_token_ids) for c in choices]
        extra: dict[str, Any] = {"sources": sources} if sources is not None else {}
        if body.prompt_logprobs is not None:  # vLLM's, beside the choices
            extra["prompt_logprobs"] = prompt_logprobs_json(self.core.tokenizer, choices[0].prompt_logprobs or [])
        return envelope.body(fields, usage=usage(choices, len(choices)), **extra, **kv)

    def _chat_choice(self, choice: Choice, plan: ReplyPlan, logprobs: bool, ids: bool) -> dict[str, Any]:
        """A whole chat's choice: its message (thinking and tool calls read out of it as `plan` says), logprobs and
        token ids."""
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        reason = finish_reason(choice.finish_reason)
        if plan.reads:
            reply = ReplyReader.whole(plan, choice.text)
            message["content"] = reply.content
            if reply.reasoning is not None:
                message["reasoning_content"] = reply.reasoning  # vLLM's field
            if reply.calls:
                message["tool_calls"] = [tool_call_json(call) for call in reply.calls]
                reason = "tool_calls" if reason == "stop" else reason
        lp = chat_logprobs(self.core.tokenizer, choice.logprobs) if logprobs else None
        fields = {"index": choice.index, "message": message, "logprobs": lp, "finish_reason": reason}
        if ids:
            fields["token_ids"] = choice.token_ids
        return fields

    async def prepared_chat(
        self, body: ChatCompletionRequest, headers: dict[str, str], owner: str
    ) -> tuple[Request, ReplyPlan, list[dict[str, object]] | None]:
        """A chat's pipeline request ready to submit (grounded, tokenized if long, its constraint compiled), how its
        reply is read (thinking, tool calls), and a grounded chat's sources; `owner`: who may read its status."""
        await self.core.model_ready(self.core.instance_model(body.model))  # a model loaded on demand: loaded first
        request, constraint, tool_use = self._chat_request(body, headers)
        request.owner = owner
        await self._hand_off(body, [request], body.n)
        sources = await self._ground(request, body)
        await self._prepare([request], constraint)
        plan = self._reply_plan(request, tool_use)
        if plan.harmony:
            self._keep_harmony_markers(request)
        if body.thinking_token_budget is not None:
            request.sampling.thinking = self._thinking_budget(body.thinking_token_budget, plan, request)
        elif self.reasoning_budget is not None and plan.reasoning_parser is not None and not request.sampling.guided:
            request.sampling.thinking = self._thinking_budget(self.reasoning_budget, plan, request)
        return request, plan, sources

    def _keep_harmony_markers(self, request: Request) -> None:
        """A Harmony reply is read by its markers, which are special tokens: its text keeps them (the engine leaves
        special tokens out unless asked), and it ends at `<|return|>` or `<|call|>` even when the model's config
        does not list both as end tokens (a GGUF's lists only one)."""
        request.sampling.skip_special_tokens = False
        tokenizer = self.core.tokenizer
        ends = [tokenizer.convert_tokens_to_ids(marker) for marker in (RETURN, CALL)]
        known = [t for t in ends if isinstance(t, int) and t != tokenizer.unk_token_id]
        request.sampling.stop_token_ids = list(dict.fromkeys([*request.sampling.stop_token_ids, *known]))

    def _thinking_budget(self, budget: int, plan: ReplyPlan, request: Request) -> ThinkingBudget:
        """The engine's side of a thinking budget: the reasoning parser's tags, the tokens that close the thinking
        (the parser's `closing`), and whether the reply starts inside it."""
        if plan.reasoning_parser is None:
            message = "thinking_token_budget: this model's replies are not read for thinking (no reasoning parser)"
            raise ApiError(400, message, param="thinking_token_budget")
        if request.sampling.guided is not None:
            message = "thinking_token_budget: a thinking budget and a constrained reply cannot go together"
            raise ApiError(400, message, param="thinking_token_budget")
        parser = parser_class(plan.reasoning_parser)
        closing = self.core.tokenizer.encode(parser.closing(), add_special_tokens=False)
        try:
            return ThinkingBudget(budget, closing, parser.OPEN, parser.CLOSE, plan.starts_thinking)
        except FieldError as error:
            raise ApiError(400, str(error), param="thinking_token_budget") from None

    def _reply_plan(self, request: Request, tool_use: ToolUse | None) -> ReplyPlan:
        """How the reply is read: tool calls by the tool-call parser the chat's tools chose; thinking by the reasoning
        parser of the gateway's model (`--reasoning-parser`, else the one its template implies), starting inside the
        thinking when the rendered generation prompt opened it. Another server's model reads its own thinking."""
        tool_parser = tool_use.parser if tool_use is not None else None
        tokenizer = self.core.tokenizer
        if request.model is not None or tokenizer is None:
            return ReplyPlan(tool_parser=tool_parser)
        template = request.chat_template or getattr(tokenizer, "chat_template", None)
        reasoning = self.reasoning_parser or default_parser(self._rendering_template())
        if reasoning is None:
            return ReplyPlan(tool_parser=tool_parser)
        settings = {k: v for k, v in (request.template_kwargs or {}).items() if k not in _PROMPT_SHAPE}
        key = (template or "", json.dumps(settings, sort_keys=True, default=str))
        if key not in self._starts_thinking:
            self._starts_thinking[key] = starts_inside(tokenizer, template, settings)
        inside = self._starts_thinking[key]
        return ReplyPlan(tool_parser=tool_parser, reasoning_parser=reasoning, starts_thinking=inside)

    async def _ground(self, request: Request, body: ChatCompletionRequest) -> list[dict[str, object]] | None:
        """A chat that names an index is answered from it (`IndexStore.ground`); -> its sources, or None."""
        if body.index is None:
            return None
        if self.indexes is None:
            message = "index: a chat that names an index is answered whole by the gateway's core: stream=false"
            raise ApiError(400, message, param="index")
        return await self.indexes.ground(request, body.index, body.index_k)

    def _chat_request(
        self, body: ChatCompletionRequest, headers: dict[str, str]
    ) -> tuple[Request, tuple[GuidedDecoding, str] | None, ToolUse | None]:
        """The chat's pipeline request, its constraint with the field it came in, and how it uses its tools."""
        model = self.core.instance_model(body.model)
        defaults = self.core.sampling_defaults(model)
        constraint = guided_decoding(body)
        template = self._chat_template(model) if body.tools else None
        tool_use = plan(body.tools, body.tool_choice, body.parallel_tool_calls, template, self.tool_call_parser)
        if tool_use is not None and tool_use.constraint is not None:
            if constraint is not None:
                message = f"tool_choice: a required tool call and {constraint[1]} both constrain the reply: give one"
                raise ApiError(400, message, param="tool_choice")
            constraint = (tool_use.constraint, "tools")
        guided = constraint[0] if constraint else None
        request = chat_request(body, headers, self.core.new_id("chatcmpl"), defaults, guided)
        if tool_use is not None:
            request.tools, request.chat_template = tool_use.tools, tool_use.chat_template
            if tool_use.forwarded is not None:
                request.tool_choice, request.parallel_tool_calls = tool_use.forwarded
        request.model, request.lora = model, self.core.lora_of(body.model)
        if model is None and request.chat_template is None and self.core.served is not None:
            request.chat_template = fallback_template(self.core.tokenizer, self.core.served.config)
        if body.reasoning_effort is not None:
            if not self.honours_effort(body.model):
                why = "this model's chat template takes no reasoning effort (gpt-oss's Harmony template does)"
                raise ApiError.unsupported("reasoning_effort", why)
            request.template_kwargs = (request.template_kwargs or {}) | {"reasoning_effort": body.reasoning_effort}
        return request, constraint, tool_use

    def honours_effort(self, name: str | None) -> bool:
        """Whether a chat for the model `name` (None: the graph's) honours a reasoning effort: its template reads it
        (gpt-oss's, Harmony's). Not another server's model, whose template is not here: the effort would be lost."""
        return self.core.instance_model(name) is None and takes_reasoning_effort(self._rendering_template())

    def _rendering_template(self) -> str:
        """The template the graph's model's chats are rendered with ("" when none): its own, else the gateway's
        fallback for its family (Harmony's for gpt-oss)."""
        served = self.core.served
        return rendering_template(served.tokenizer, served.config) if served is not None else ""

    def _chat_template(self, model: str | None) -> str | None:
        """The chat template tools are shown with: the graph's model's ("" when it has none); None for a model
        another server serves (it is given the tools). A 400 for another model whose engines are ours: its front is
        not here to show and enforce them."""
        if model is not None:
            if self.core.engines_of_ours(model):
                message = f"tools: served for the graph's own model and attached servers' models, not for {model}"
                raise ApiError(400, message, param="tools")
            return None
        return self._rendering_template() if self.core.tokenizer is not None else None

    async def _hand_off(self, body: Any, requests: list[Request], choices: int) -> None:
        """A request's part in disaggregated serving across servers (`kv_transfer_params`, vLLM's protocol): marked
        to prefill for a decode server ("export"), or given the KV a prefill server made for it: the one place a KV
        made elsewhere enters this server's engine, and its prefix cache shared by every user, so only one fetched
        from a prefill server the operator listed (`kv_peers`; the engine checks it is this prompt's tokens)."""
        params, count = body.kv_transfer_params, len(requests)
        asked = kv_transfer.handoff(params, self.kv_peers, stream=body.stream, choices=choices, prompts=count)
        if body.prompt_logprobs is not None and asked is not None:
            raise ApiError.unsupported("prompt_logprobs", "not scored in a request split across servers")
        if asked == "export":
            requests[0].kv_export = True
        elif isinstance(asked, RemotePrefill):
            requests[0].prefilled = await kv_transfer.fetch(asked, self._kv_client())

    def _kv_reply(self, request: Request, http: HttpRequest | None) -> dict:
        """A prefill's reply field: where its KV waits for the decode server."""
        if not request.kv_export or http is None:
            return {}
        params = kv_transfer.reply_params(self.core.kv_outbox, request.request_id, http, self.core.boot_id)
        return {"kv_transfer_params": params}

    def _kv_client(self) -> httpx.AsyncClient:
        if self._kv_http is None:
            self._kv_http = httpx.AsyncClient()
        return self._kv_http

    async def _prepare(
        self, requests: list[Request], constraint: tuple[GuidedDecoding, str] | None, every_prompt: bool = False
    ) -> None:
        """What is done before requests enter the graph, off the event loop: long prompts tokenized (`every_prompt`:
        all, for a reply that shows their tokens), and a constraint compiled for the graph's model (a 400 naming its
        field when it cannot be)."""
        await self.core.tokenize_prompts(requests, every=every_prompt)
        if constraint is not None and requests[0].model is None:
            await check_compiles(self.core.served, *constraint)

    def _chat_render(self, index: int, logprobs: bool, plan: ReplyPlan) -> Callable[[TokenDelta], dict[str, Any]]:
        """Streamed chat choice `index`'s fields for each delta; when the reply is read (`plan`), its text read by
        the reader: thinking as `reasoning_content`, content it releases, and each tool call whole as it completes (a
        delta holding back a tag's text shows nothing: an empty `delta`)."""
        reader = ReplyReader(plan) if plan.reads else None
        called = False

        def render(item: TokenDelta) -> dict[str, Any]:
            nonlocal called
            lp = chat_logprobs(self.core.tokenizer, item.logprobs or []) if logprobs else None
            reason = finish_reason(item.finish_reason)
            if reader is None:
                delta = {"content": item.text} if item.text else {}
                return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
            events = reader.step(item.text, item.finished)
            thinking = "".join(e.text for e in events if isinstance(e, ReasoningEvent))
            content = "".join(e.text for e in events if isinstance(e, ContentEvent))
            calls = [{"index": e.index, **tool_call_json(e.call)} for e in events if isinstance(e, ToolCallEvent)]
            called = called or bool(calls)
            delta: dict[str, Any] = ({"reasoning_content": thinking} if thinking else {}) | (
                {"content": content} if content else {}) | ({"tool_calls": calls} if calls else {})  # fmt: skip
            reason = "tool_calls" if reason == "stop" and called else reason
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}

        return render

    # -- embeddings -----------------------------------------------------------------------------------------------
    async def embeddings(self, http: HttpRequest) -> Response:
        body = http.json(EmbeddingRequest)
        model = self.core.embedding_model(body.model)
        inputs = _embedding_inputs(body.input)
        embedder = self.core.embedder(model)
        if body.dimensions is not None and (embedder is None or body.dimensions != embedder.dim):
            has = f"has {embedder.dim}" if embedder is not None else "is served elsewhere; its size is not asked for"
            raise ApiError(400, f"dimensions: {model} {has}, got {body.dimensions}", param="dimensions")
        now = time.time()
        requests = [
            Request(
                request_id=self.core.new_id("embd"),
                phase="embed",
                model=model,
                user=body.user,
                arrival_time=now,
                owner=key_owner(http),
                **({"prompt": item} if isinstance(item, str) else {"prompt_token_ids": item}),
            )  # fmt: skip
            for item in inputs
        ]
        results = await embedded(self.core.submit_all(requests))
        data = [
            {"object": "embedding", "index": i, "embedding": _encode_vector(r.vector, body.encoding_format)}
            for i, r in enumerate(results)
        ]
        tokens = sum(r.prompt_tokens for r in results)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return Response({"object": "list", "data": data, "model": model, "usage": usage})


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
    first: tuple[int, TokenDelta],
    streams: ChoiceStreams,
    renders: list[Callable[[TokenDelta], dict[str, Any]]],
    logprobs: bool,
    include_usage: bool,
    opening: dict[str, Any] | None = None,
    ids: bool = False,
    sources: list[dict[str, object]] | None = None,
    parsed: bool = False,
    echo: bool = False,
) -> AsyncIterator[Any]:
    """The SSE events of a streamed request's choices: `renders[i]` turns choice i's delta into its fields (and its
    token ids are added when asked: `ids`); deltas with nothing to show (a token that ends mid-character, unless
    its token ids are asked for) are skipped; a failure is an `error` event (the other choices are cancelled); usage
    last when asked. Events that are ready together (the opening and the first delta, deltas the engine made while
    the client's last write went out, the final delta with usage and [DONE]) come as one tuple: one write.
    `parsed`: a render reads the text (a tool-call parser), so every delta goes through it and one that shows
    nothing is skipped; `echo`: the first shown delta comes after the prompt, so every delta goes through its
    render."""
    choices = [Choice(i) for i in range(len(renders))]
    extra = {"usage": None} if include_usage else {}
    opening_extra = extra | ({"sources": sources} if sources is not None else {})  # a grounded chat's, first
    openings = [{**opening, "index": i} for i in range(len(renders))] if opening is not None else []
    ready = [envelope.body(openings, **opening_extra)] if openings else []  # events sent in one write
    plain = not (logprobs or ids or parsed or echo)
    text_events = [_text_event(envelope, render, extra) for render in renders] if plain else None
    index, item = first
    unfinished = len(renders)
    corked = False
    while True:
        if isinstance(item, RequestError):
            ready.append(api_error(item).body())
            streams.cancel()
            break
        choices[index].add(item)
        if text_events is not None and item.text and not item.finished:
            ready.append(text_events[index](item.text))
        elif item.text or item.finished or (logprobs and item.logprobs) or (ids and item.token_ids):
            fields = renders[index](item)
            # a parser may hold a delta's text back: then it shows nothing, unless it ends the stream or has ids or
            # logprobs to show
            if not parsed or fields["delta"] or item.finished or ids or logprobs:
                ready.append(envelope.body([{**fields, "token_ids": item.token_ids} if ids else fields], **extra))
        unfinished -= item.finished
        if not unfinished:
            break
        if ready and not streams.has_ready():
            if not corked:  # corked for one turn of the event loop: a delta made meanwhile goes in the same write
                await trio.lowlevel.checkpoint()
                corked = True
            if not streams.has_ready():
                yield tuple(ready)
                ready, corked = [], False
        try:
            index, item = await anext(streams)
        except StopAsyncIteration:
            break
    if include_usage and all(c.finish_reason is not None for c in choices):
        ready.append(envelope.body([], usage=usage(choices, len(choices))))
    yield LastEvents((*ready, DONE))


def _text_event(
    envelope: Envelope, render: Callable[[TokenDelta], dict[str, Any]], extra: dict[str, Any]
) -> Callable[[str], bytes]:
    """A delta's event when it carries only text (no logprobs, token ids or finish): the encoded chunk of a probe
    delta, split where its text goes, so a token costs one string encode instead of building and encoding the whole
    chunk. The bytes are the same as the chunk's."""
    probe = envelope.body([render(TokenDelta(request_id="", token_ids=[], text=TEXT_PROBE))], **extra)
    head, tail = msgspec.json.encode(probe).split(msgspec.json.encode(TEXT_PROBE))
    return lambda text: head + msgspec.json.encode(text) + tail


async def first_or_raise(stream: Any) -> Any:
    """A streamed request's first item (a `RequestStream`'s, or `ChoiceStreams`' with its choice's index); a request
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


async def collect_choices(streams: list[RequestStream]) -> list[Choice]:
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
        raise api_error(failure)
    return choices
