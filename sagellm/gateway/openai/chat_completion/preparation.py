"""A chat made ready to run, whichever API it came in by: OpenAI's chat completions, the Responses API and the
Messages API all run their requests as chats, so admission, policy, routing, failover, guided decoding and reading the
reply for thinking and tool calls are the chat's own. What they share is this: the chat's pipeline request (its tools
planned and shown by the chat template, grounded in an index when it names one, a long prompt tokenized, its
constraint compiled, its part in disaggregated serving taken) and how its reply is read (`ReplyPlan`)."""

from __future__ import annotations

import json

from sagellm.common.errors import FieldError
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.indexes.store import IndexStore
from sagellm.gateway.media import MediaPolicy
from sagellm.gateway.media.by_uuid import MediaByUuid
from sagellm.gateway.openai.chat_completion.media_files import chat_media_files
from sagellm.gateway.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    audio_parts,
    chat_request,
    image_parts,
)
from sagellm.gateway.openai.generation.serving import generation_model, prepare
from sagellm.gateway.openai.generation.structured import guided_decoding
from sagellm.gateway.openai.kv_transfer.serving import KVHandOff
from sagellm.gateway.replies.chat_templates import (
    fallback_template,
    media_placeholders,
    rendering_template,
    takes_reasoning_effort,
)
from sagellm.gateway.replies.harmony import CALL, RETURN
from sagellm.gateway.replies.reader import ReplyPlan
from sagellm.gateway.replies.reasoning_parsers import default_parser, parser_class, starts_inside
from sagellm.gateway.replies.tool_parsers import parser_for
from sagellm.gateway.replies.tools import ToolUse, plan
from sagellm.gateway.serving.interface import ServingApi
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.engine.thinking import ThinkingBudget
from sagellm.runtime.pipeline.messages import Request

# Template settings that shape the prompt's end, not the reply's start (whether it opens inside the thinking)
_PROMPT_SHAPE = ("add_generation_prompt", "continue_final_message")
STARTS_THINKING_KEPT = 256  # (template, settings) pairs whose rendered opening is remembered


class ChatPreparation:
    def __init__(
        self,
        core: ServingApi,
        hand_off: KVHandOff,
        indexes: IndexStore | None = None,
        tool_call_parser: str | None = None,
        reasoning_parser: str | None = None,
        reasoning_budget: int | None = None,
        media: MediaPolicy | None = None,
        per_request_metrics: bool = False,
    ) -> None:
        """`hand_off`: the server's part in disaggregated serving across servers; `indexes`: the retrieval indexes
        chats may name (`"index"`; None in an API server's process, whose core holds them). `tool_call_parser`: how
        tool calls are read from replies, `reasoning_parser` how thinking is (None: each chosen from the model's
        template); `reasoning_budget`: the thinking tokens of a request that sets no budget of its own (None: no
        bound); `media`: where a chat's images may be fetched from (None: data URLs only); `per_request_metrics`:
        replies (chats, responses) carry vLLM's per-request `metrics`."""
        self.core = core
        self.hand_off = hand_off
        self.indexes = indexes
        if tool_call_parser is not None:
            parser_for(tool_call_parser)  # an unknown name stops the start, naming the known ones
        self.tool_call_parser = tool_call_parser
        if reasoning_parser is not None:
            parser_class(reasoning_parser)  # as above
        self.reasoning_parser = reasoning_parser
        self.reasoning_budget = reasoning_budget
        self.per_request_metrics = per_request_metrics
        self.media = media or MediaPolicy()
        self._media_placeholders: dict[str, str] | None = None  # what the model's template writes for media parts
        self.media_by_uuid = MediaByUuid()  # the files senders named (a part's `uuid`), for parts giving the name alone
        self._starts_thinking: dict[tuple[str, str], bool] = {}  # (template, its settings) -> a reply opens inside

    async def prepared_chat(
        self, body: ChatCompletionRequest, headers: dict[str, str], owner: str
    ) -> tuple[Request, ReplyPlan, list[dict[str, object]] | None]:
        """A chat's pipeline request ready to submit (grounded, tokenized if long, its constraint compiled), how its
        reply is read (thinking, tool calls), and a grounded chat's sources; `owner`: who may read its status."""
        model = generation_model(self.core, body.model)
        await self.core.readiness.model_ready(model)  # a model on demand: loaded first, and held busy for this chat
        try:
            return await self._prepared(body, headers, owner)
        except BaseException:  # refused, or the client left, before it was submitted: the model is not held for it
            self.core.readiness.not_submitting(model)
            raise

    async def _prepared(
        self, body: ChatCompletionRequest, headers: dict[str, str], owner: str
    ) -> tuple[Request, ReplyPlan, list[dict[str, object]] | None]:
        request, constraint, tool_use = self._chat_request(body, headers)
        request.owner = owner
        if parts := image_parts(body):  # checked before any image is fetched
            self._check_sees_images(request, [part.param for part in parts])
        if clips := audio_parts(body):
            self._check_hears_audio(request, clips[0].param)
        if parts or clips:  # each file fetched or decoded and checked under the operator's policy, or recalled
            images, audios = await chat_media_files(body, self.media, self.media_by_uuid, owner)
            request.images, request.audios = images or None, audios or None
        await self.hand_off.take(body, [request], body.n)
        sources = await self._ground(request, body)
        await prepare(self.core, [request], constraint)
        plan = self._reply_plan(request, tool_use)
        if plan.harmony:
            self._keep_harmony_markers(request)
        if body.thinking_token_budget is not None:
            request.sampling.thinking = self._thinking_budget(body.thinking_token_budget, plan, request)
        elif self.reasoning_budget is not None and plan.reasoning_parser is not None and not request.sampling.guided:
            request.sampling.thinking = self._thinking_budget(self.reasoning_budget, plan, request)
        return request, plan, sources

    def _check_sees_images(self, request: Request, params: list[str]) -> None:
        """Images go to the graph's own model where it has a vision encoder, as many as its engines take (checked
        here, before any is fetched); a 400 naming the first image part otherwise, or the first one too many (a model
        served by another server is sent text only, for now)."""
        served, param = self.core.served, params[0]
        if request.model is not None or served is None or served.config.vision is None:
            name = request.model or self.core.model_name
            raise ApiError(400, f"{param}: model {name!r} takes no images (it has no vision encoder here)", param=param)
        if served.max_images is not None and len(params) > served.max_images:
            extra = params[served.max_images]
            message = (f"{extra}: at most {served.max_images} image(s) may be given in one prompt "
                       f"(limit_mm_per_prompt); this one has {len(params)}")  # fmt: skip
            raise ApiError(400, message, param=extra)

    def _check_hears_audio(self, request: Request, param: str) -> None:
        """Audio goes to the graph's own model where it has an audio encoder; a 400 naming the first audio part
        otherwise (the engine counts a prompt's clips against its limit_mm_per_prompt)."""
        served = self.core.served
        if request.model is not None or served is None or served.config.audio is None:
            name = request.model or self.core.model_name
            raise ApiError(400, f"{param}: model {name!r} takes no audio (it has no audio encoder here)", param=param)

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
        inside = self._starts_thinking.get(key)
        if inside is None:
            if len(self._starts_thinking) >= STARTS_THINKING_KEPT:  # callers choose the settings: keep the newest
                del self._starts_thinking[next(iter(self._starts_thinking))]
            inside = self._starts_thinking[key] = starts_inside(tokenizer, template, settings)
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
            if tool_use.chat_template is not None and model is None:
                request.template_kwargs = self._with_media_placeholders(request.template_kwargs)
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

    def _with_media_placeholders(self, kwargs: dict[str, object] | None) -> dict[str, object] | None:
        """`kwargs` with what the graph's model's own template writes for a picture or a clip, which the fallback
        tool template writes in their place (a model that sees or hears); `kwargs` for any other model."""
        served = self.core.served
        if served is None or not served.config.takes_media:
            return kwargs
        if self._media_placeholders is None:
            self._media_placeholders = media_placeholders(self.core.tokenizer)
        return (kwargs or {}) | {"media_placeholders": self._media_placeholders}

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
