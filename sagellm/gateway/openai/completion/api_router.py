"""`POST /v1/completions`: OpenAI's legacy completions (vLLM's too), a prompt or a batch of them, each run as its
`n` choices (or `best_of`, the best `n` kept), answered whole or streamed; with `echo`, each choice shows its prompt
first (`echo`). A streamed request waits for its first item before answering, so one the graph rejects up front gets
its proper HTTP status; a failure after the first token ends the stream with an `error` event and `[DONE]`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sagellm.gateway.http.app import App, EventStream, Guard, HttpRequest, Response
from sagellm.gateway.http.auth import key_owner
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.completion.echo import Echo
from sagellm.gateway.openai.completion.protocol import CompletionRequest, completion_requests
from sagellm.gateway.openai.generation.choices import best_of, fan_out
from sagellm.gateway.openai.generation.reply_bodies import (
    Envelope,
    completion_logprobs,
    finish_reason,
    prompt_logprobs_json,
)
from sagellm.gateway.openai.generation.serving import generation_model, prepare
from sagellm.gateway.openai.generation.stream import choice_events
from sagellm.gateway.openai.generation.structured import guided_decoding
from sagellm.gateway.openai.kv_transfer.serving import KVHandOff
from sagellm.gateway.replies.choice import Choice, collect_choices, first_or_raise
from sagellm.gateway.serving.choice_streams import ChoiceStreams
from sagellm.gateway.serving.interface import ServingApi
from sagellm.runtime.engine.outputs import TokenLogprob
from sagellm.runtime.pipeline.messages import Request, TokenDelta


class CompletionRoutes:
    def __init__(self, core: ServingApi, hand_off: KVHandOff, per_request_metrics: bool = False) -> None:
        """`hand_off`: the server's part in disaggregated serving across servers; `per_request_metrics`: replies
        carry vLLM's per-request `metrics`."""
        self.core, self.hand_off, self.per_request_metrics = core, hand_off, per_request_metrics

    def register(self, app: App, guard: Guard | None) -> None:
        app.route("POST", "/v1/completions", self.completions, guard)

    async def completions(self, http: HttpRequest) -> Response | EventStream:
        body = http.json(CompletionRequest)
        model = generation_model(self.core, body.model)
        count = body.best_of or body.n  # choices run per prompt
        requests = await self.prepared(body, http, model)
        echoes = [Echo.of(r, self.core.tokenizer, body.max_tokens == 0) for r in requests] if body.echo else None
        new_id = lambda: self.core.new_id("cmpl")  # noqa: E731
        prompt_each = body.stream and body.echo  # each streamed choice shows the prompt it scored
        runs = [run for r in requests for run in fan_out(r, count, new_id, count > body.n, prompt_each)]
        envelope = Envelope(requests[0].request_id, model or self.core.model_name, "text_completion",
                            with_metrics=self.per_request_metrics)  # fmt: skip
        wants_logprobs, ids = body.logprobs is not None, body.return_token_ids
        if body.stream:
            streams = ChoiceStreams(self.core.submit_all(runs))
            first = await first_or_raise(streams)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            echo = echoes[0] if echoes else None
            renders = [self._render(i, wants_logprobs, echo) for i in range(len(runs))]
            events = choice_events(
                envelope, first, streams, renders, wants_logprobs, include_usage, ids=ids, echo=body.echo
            )
            return EventStream(events, on_disconnect=streams.cancel)
        ran = await collect_choices(self.core.submit_all(runs))
        kv = self.hand_off.reply(requests[0], http)
        scored_prompts = [ran[i].prompt_logprobs for i in range(0, len(ran), count)]  # each prompt's first choice's
        choices = best_of(ran, count, body.n, wants_logprobs) if count > body.n else ran
        body_fields = [
            self._choice(
                c, echoes[c.index // body.n] if echoes else None, scored_prompts[c.index // body.n], wants_logprobs,
                body.prompt_logprobs is not None,
            ) | ({"token_ids": c.token_ids} if ids else {})
            for c in choices
        ]  # fmt: skip
        return Response(envelope.body(body_fields, **envelope.usage_fields(ran, count), **kv))

    async def prepared(self, body: CompletionRequest, http: HttpRequest, model: str | None) -> list[Request]:
        """The prompts' pipeline requests, ready to submit: `model` (a model on demand) loaded first and held busy
        for them, unless they are refused (or the client leaves) before they are submitted. Ollama's raw
        `/api/generate` runs its prompt through here too."""
        await self.core.readiness.model_ready(model)
        try:
            requests = await self._prepared(body, http, model, body.best_of or body.n)
            if body.stream and len(requests) > 1:
                raise ApiError(400, "stream=true takes one prompt; send several requests", param="prompt")
        except BaseException:  # refused, or the client left, before they were submitted: the model is not held
            self.core.readiness.not_submitting(model)
            raise
        return requests

    async def _prepared(
        self, body: CompletionRequest, http: HttpRequest, model: str | None, count: int
    ) -> list[Request]:
        """The prompts' pipeline requests (`count` choices each): tokenized, checked, their constraint compiled, a
        prefill's KV fetched for a decode server."""
        defaults = self.core.sampling_defaults(model)
        constraint = guided_decoding(body)
        guided = constraint[0] if constraint else None
        requests = completion_requests(body, http.headers, lambda: self.core.new_id("cmpl"), defaults, guided)
        for request in requests:
            request.model, request.owner, request.lora = model, key_owner(http), self.core.lora_of(body.model)
        if body.echo and model is not None:
            raise ApiError(400, f"echo: served for the graph's own model, not {model}", param="echo")
        await self.hand_off.take(body, requests, count)
        await prepare(self.core, requests, constraint, every_prompt=body.echo or count > 1)
        return requests

    def _choice(
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
        fields = self._render(choice.index, logprobs, echo)(whole)
        if prompt_logprobs:
            fields["prompt_logprobs"] = prompt_logprobs_json(self.core.tokenizer, scored_prompt or [])
        return fields

    def _render(self, index: int, logprobs: bool, echo: Echo | None) -> Callable[[TokenDelta], dict[str, Any]]:
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
