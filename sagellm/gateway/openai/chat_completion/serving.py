"""`POST /v1/chat/completions` served: a prepared chat (`preparation`) run as its `n` choices, answered whole as
OpenAI's chat completion (sessions complete their turns so too) or streamed as its chunks, its thinking as vLLM's
`reasoning_content` and its tool calls as `tool_calls`, read out of its text as the plan says."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sagellm.gateway.http.app import EventStream, HttpRequest
from sagellm.gateway.openai.chat_completion.preparation import ChatPreparation
from sagellm.gateway.openai.chat_completion.protocol import ChatCompletionRequest
from sagellm.gateway.openai.generation.choices import fan_out
from sagellm.gateway.openai.generation.reply_bodies import (
    Envelope,
    chat_logprobs,
    finish_reason,
    prompt_logprobs_json,
)
from sagellm.gateway.openai.generation.stream import choice_events
from sagellm.gateway.replies.choice import Choice, collect_choices, first_or_raise
from sagellm.gateway.replies.events import ContentEvent, ReasoningEvent, ToolCallEvent
from sagellm.gateway.replies.reader import ReplyPlan, ReplyReader
from sagellm.gateway.replies.tools import tool_call_json
from sagellm.gateway.serving.choice_streams import ChoiceStreams
from sagellm.runtime.pipeline.messages import Request, TokenDelta

# A streamed chat's first chunk: the assistant's role, before any content (as OpenAI's streams open).
CHAT_OPENING = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


class ChatServing:
    def __init__(self, preparation: ChatPreparation) -> None:
        self.preparation = preparation
        self.core = preparation.core

    async def complete(
        self, body: ChatCompletionRequest, headers: dict[str, str], owner: str = "", http: HttpRequest | None = None
    ) -> dict[str, Any]:
        """A whole chat completion as OpenAI's response body (the sessions route uses it too); `owner`: who may read
        its status; `http`: the call it answers (where a prefill's KV is fetched from, for kv_transfer_params)."""
        request, plan, sources = await self.preparation.prepared_chat(body, headers, owner)
        envelope = Envelope(request.request_id, request.model or self.core.model_name, "chat.completion",
                            with_metrics=self.preparation.per_request_metrics)  # fmt: skip
        choices = await collect_choices(self.core.submit_all(self._choices(request, body.n)))
        kv = self.preparation.hand_off.reply(request, http)
        fields = [self._choice(c, plan, body.logprobs, body.return_token_ids) for c in choices]
        extra: dict[str, Any] = {"sources": sources} if sources is not None else {}
        if body.prompt_logprobs is not None:  # vLLM's, beside the choices
            extra["prompt_logprobs"] = prompt_logprobs_json(self.core.tokenizer, choices[0].prompt_logprobs or [])
        return envelope.body(fields, **envelope.usage_fields(choices, len(choices)), **extra, **kv)

    async def stream(self, body: ChatCompletionRequest, headers: dict[str, str], owner: str) -> EventStream:
        """A streamed chat completion: its choices' chunks as they come (`generation.stream`), opened with the
        assistant's role, its thinking and tool calls read out of its text as they complete (`_render`)."""
        request, plan, sources = await self.preparation.prepared_chat(body, headers, owner)
        envelope = Envelope(request.request_id, request.model or self.core.model_name, "chat.completion.chunk",
                            with_metrics=self.preparation.per_request_metrics)  # fmt: skip
        streams = ChoiceStreams(self.core.submit_all(self._choices(request, body.n)))
        first = await first_or_raise(streams)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        renders = [self._render(i, body.logprobs, plan) for i in range(body.n)]
        events = choice_events(envelope, first, streams, renders, body.logprobs, include_usage, opening=CHAT_OPENING,
                              ids=body.return_token_ids, sources=sources, parsed=plan.reads)  # fmt: skip
        return EventStream(events, on_disconnect=streams.cancel)

    def _choices(self, request: Request, n: int) -> list[Request]:
        return fan_out(request, n, lambda: self.core.new_id("chatcmpl"))

    def _choice(self, choice: Choice, plan: ReplyPlan, logprobs: bool, ids: bool) -> dict[str, Any]:
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

    def _render(self, index: int, logprobs: bool, plan: ReplyPlan) -> Callable[[TokenDelta], dict[str, Any]]:
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
