"""The OpenAI request bodies the gateway accepts, and their translation into pipeline `Request`s.

Bodies decode with msgspec into these Structs (a wrong type is a 400 naming the field). Fields OpenAI or vLLM define
that sageLLM cannot honour are refused with a 400 naming them (suffix, vLLM's in `vllm_fields.py`) rather
than silently ignored; fields of neither are ignored, as vLLM does, because SDKs add new ones all the time. OpenAI's
penalties and `logit_bias` (token ids as string keys, as the openai SDK sends them), completions' `echo`, vLLM's
extensions (`top_k`, `min_p`, `ignore_eos`, `stop_token_ids`, `repetition_penalty`, `min_tokens`, `bad_words`,
`allowed_token_ids`, `prompt_logprobs`, the chat template's settings, ...), sageLLM's scheduling fields (`priority`
by number or class name, SLOs, `cost_budget`; also as `X-Request-Priority` / `X-SLO-Deadline-Ms` headers) and
failover timeouts are accepted in the body. Every list or map a body holds has a cap (`request_limits`): the
sampling fields' are SamplingParams' to check, the rest are declared here on the types (`msgspec.Meta`), so an
oversized body is a 400 naming the field before any of its work is done."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import msgspec

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.tools import Tool, ToolChoice
from sagellm.gateway.openai.vllm_fields import UNSET as NOT_SENT
from sagellm.gateway.openai.vllm_fields import VllmFields, refuse_unserved
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.engine.request_limits import (
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_PROMPTS,
    MAX_TEMPLATE_KWARGS,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
)
from sagellm.runtime.engine.sampling_params import MAX_CHOICES, MAX_LOGPROBS, SamplingParams
from sagellm.runtime.pipeline.messages import PRIORITY_CLASSES, Priority, Request, TokenId

Unset = msgspec.UnsetType
UNSET = msgspec.UNSET
COMPLETIONS_MAX_TOKENS = 16  # a completion that sets no max_tokens: the OpenAI API's default
_PRIORITY_MIN, _PRIORITY_MAX = -(2**31), 2**31 - 1  # Priority's bounds, for the header that bypasses the struct
PriorityName = Literal["critical", "high", "normal", "low"]
# A request's own failover timeout, seconds: under a second it would only turn a busy moment into a 504.
Timeout = Annotated[float, msgspec.Meta(ge=1, le=86_400)]
# The capped lists and maps the APIs share (`request_limits`): a longer one is a 400 naming it, from the decoder.
ContentParts = Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_CONTENT_PARTS)]
ToolCalls = Annotated[list[dict[str, Any]], msgspec.Meta(max_length=MAX_TOOL_CALLS)]
TemplateKwargs = Annotated[dict[str, Any], msgspec.Meta(max_length=MAX_TEMPLATE_KWARGS)]


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _Generation(VllmFields, kw_only=True):
    """What completions and chat completions share (structured output's fields among them, and vLLM's that are
    refused unless they ask for nothing: `vllm_fields.py`)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (a string, JSON's keys are) -> bias
    # vLLM's sampling extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # each choice also carries its output token ids (what a resume elsewhere needs)
    prompt_logprobs: int | None = None  # vLLM's: every prompt token's logprob given the ones before (and top-N)
    kv_transfer_params: dict[str, Any] | None = None  # vLLM's PD across servers (`kv_transfer.py`)
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks shared only with requests of the same salt
    thinking_token_budget: int | None = None  # vLLM's: a reasoning model's thinking closed after this many tokens
    # sageLLM's scheduling fields
    priority: Priority | PriorityName | None = None  # a number (lower runs first) or a class name
    cost_budget: Annotated[float, msgspec.Meta(ge=0)] | None = None  # most it may cost, in the instances' price unit
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    slo_deadline_ms: float | None = None
    # sageLLM's failover timeouts, seconds (None: the gateway's defaults)
    first_token_timeout: Timeout | None = None
    token_timeout: Timeout | None = None


class CompletionRequest(_Generation, kw_only=True):
    prompt: str | list[Any]  # a batch of strings, token ids, or a batch of token-id lists (checked by _prompts)
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | ContentParts | None = None
    name: str | None = None
    tool_calls: ToolCalls | None = None  # an assistant's calls, as its reply gave them
    reasoning_content: str | None = None  # vLLM's: an assistant's thinking, as its reply gave it (Harmony keeps it)
    tool_call_id: str | None = None  # a tool message: the call it answers


Messages = Annotated[list[ChatMessage], msgspec.Meta(max_length=MAX_MESSAGES)]
Tools = Annotated[list[Tool], msgspec.Meta(max_length=MAX_TOOLS)]


class ChatCompletionRequest(_Generation, kw_only=True):
    messages: Messages
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: Tools | None = None
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, as OpenAI's
    parallel_tool_calls: bool = True
    echo: bool = False  # vLLM's: refused (a chat's prompt is its messages)
    # vLLM's template settings, rendered with the messages (by the model's template, or the server a chat goes to)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: TemplateKwargs | None = None
    # OpenAI's: how hard a reasoning model thinks, for a model whose chat template takes it (gpt-oss's Harmony)
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    # vLLM's that are refused unless they ask for nothing (`vllm_fields.CHAT_ONLY`)
    documents: Any = NOT_SENT
    chat_template: Any = NOT_SENT
    media_io_kwargs: Any = NOT_SENT
    mm_processor_kwargs: Any = NOT_SENT
    return_prompt_text: Any = NOT_SENT
    include_reasoning: Any = NOT_SENT
    index: str | None = None  # sageLLM: answer from this retrieval index (/admin/index), its sources in the reply
    index_k: int = 4  # chunks retrieved from it


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    input: str | list[Any]  # like `prompt`
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def _refuse(name: str, why: str) -> None:
    raise ApiError.unsupported(name, why)


def _check_unsupported(body: _Generation) -> None:
    if not 1 <= body.n <= MAX_CHOICES:
        raise ApiError(400, f"n: must be in [1, {MAX_CHOICES}], got {body.n}", param="n")
    refuse_unserved(body, chat=isinstance(body, ChatCompletionRequest))


def sampling_params(
    body: _Generation,
    max_tokens: int | None,
    logprobs: int | None,
    defaults: dict[str, Any] | None,
    guided: GuidedDecoding | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """Where the body is silent, the served model's `defaults` (its generation config; None for another model's
    request), else SamplingParams' (OpenAI's: temperature 1, top_p 1); a bad value is a 400 naming it. `guided`:
    the body's constraint (`structured.guided_decoding`); `prompt_logprobs`: the body's, or what echo asks for."""
    if body.stream and body.prompt_logprobs is not None:
        _refuse("prompt_logprobs", "not available with stream=true (as vLLM's)")
    args: dict[str, Any] = dict(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        seed=body.seed,
        stop=body.stop,
        stop_token_ids=body.stop_token_ids or [],
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs if prompt_logprobs is not None else body.prompt_logprobs,
        skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
        guided=guided,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repetition_penalty=body.repetition_penalty,
        logit_bias=body.logit_bias,
        min_tokens=body.min_tokens,
        bad_words=body.bad_words,
        allowed_token_ids=body.allowed_token_ids,
    )
    try:
        return SamplingParams.with_defaults(defaults, **args)
    except ValueError as exc:
        raise ApiError.from_value_error(exc) from None


def scheduling(body: _Generation, headers: dict[str, str], now: float) -> dict[str, Any]:
    """Priority and SLOs from the body or the `X-Request-Priority` / `X-SLO-Deadline-Ms` headers (body first), and
    the request's own failover timeouts."""
    priority = body.priority if body.priority is not None else _header_priority(headers)
    priority = PRIORITY_CLASSES[priority] if isinstance(priority, str) else priority
    if priority is not None and not _PRIORITY_MIN <= priority <= _PRIORITY_MAX:
        _refuse("priority", f"must be in [{_PRIORITY_MIN}, {_PRIORITY_MAX}], got {priority}")
    deadline_ms = body.slo_deadline_ms
    if deadline_ms is None:
        deadline_ms = _header_number(headers, "x-slo-deadline-ms", float)
    slos = (("ttft_slo_ms", body.ttft_slo_ms), ("tpot_slo_ms", body.tpot_slo_ms), ("slo_deadline_ms", deadline_ms))
    for name, value in slos:
        if value is not None and not value > 0:
            _refuse(name, f"must be > 0, got {value}")
    return dict(
        priority=priority or 0,
        user=body.user,
        cost_budget=body.cost_budget,
        cache_salt=body.cache_salt,
        ttft_slo_ms=body.ttft_slo_ms,
        tpot_slo_ms=body.tpot_slo_ms,
        deadline=now + deadline_ms / 1000 if deadline_ms is not None else None,
        first_token_timeout_s=body.first_token_timeout,
        token_timeout_s=body.token_timeout,
    )


def _header_priority(headers: dict[str, str]) -> int | str | None:
    raw = headers.get("x-request-priority")
    return (
        raw.lower()
        if raw is not None and raw.lower() in PRIORITY_CLASSES
        else _header_number(headers, "x-request-priority", int)
    )


def _header_number(headers: dict[str, str], name: str, kind: type) -> Any:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise ApiError(400, f"header {name}: expected a number, got {raw!r}", param=name) from None


def completion_requests(
    body: CompletionRequest,
    headers: dict[str, str],
    new_id: Any,
    defaults: dict[str, Any] | None,
    guided: GuidedDecoding | None = None,
) -> list[Request]:
    """One pipeline request per prompt (OpenAI accepts a batch of prompts: one choice each); `defaults`: the model's
    sampling defaults; `guided`: the output's constraint. `max_tokens` is 16 when left out, the OpenAI API's default
    for completions (vLLM's too). With `echo`, `max_tokens: 0` asks for the prompt alone: one token is generated
    after it (the prompt's logits are computed by the step that samples it) and left out of the reply, as vLLM
    does; `logprobs` then also scores the prompt's tokens."""
    _check_unsupported(body)
    if body.max_tokens == 0 and not body.echo:
        _refuse("max_tokens", "0 only with echo=true (the prompt alone)")
    if body.suffix:
        _refuse("suffix", "not supported")
    if body.best_of is not None and not body.n <= body.best_of <= MAX_CHOICES:
        raise ApiError(400, f"best_of: must be in [n, {MAX_CHOICES}], got {body.best_of}", param="best_of")
    if body.stream and (body.best_of or body.n) > body.n:
        _refuse("best_of", "picks the best choices once all are done: not with stream=true")
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
        _refuse("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {body.logprobs}")
    prompts = _prompts(body.prompt)
    max_tokens = COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens or 1
    echoed = body.logprobs if body.echo else None  # the echoed prompt's tokens are scored like the output's
    params = sampling_params(body, max_tokens, body.logprobs, defaults, guided, echoed)
    now = time.time()
    extra = scheduling(body, headers, now)
    return [
        Request(
            request_id=new_id(),
            sampling=params,
            model=body.model,
            arrival_time=now,
            **({"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p}),
            **extra,
        )
        for p in prompts
    ]


def _prompts(prompt: Any) -> list[str | list[int]]:
    """A completion's prompts: a text, texts, token ids or token-id lists (at most MAX_PROMPTS of them), checked by
    msgspec rather than a Python loop: a body may hold a million token ids (the vocabulary is checked at admission)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        _refuse("prompt", "must not be empty")
    first = prompt[0]
    if type(first) is not int and len(prompt) > MAX_PROMPTS:
        message = f"prompt: {len(prompt)} prompts in one request, more than {MAX_PROMPTS}: send several requests"
        raise ApiError(400, message, param="prompt", code="invalid_request")
    shape = list[TokenId] if type(first) is int else list[str] if isinstance(first, str) else list[list[TokenId]]
    try:
        prompts = msgspec.convert(prompt, shape)
    except msgspec.ValidationError:
        _refuse("prompt", "must be a string, a list of strings, a list of token ids or a list of token-id lists")
    if type(first) is int:
        return [prompts]
    if not all(prompts):
        _refuse("prompt", "no prompt in the list may be empty")
    return prompts


def chat_request(
    body: ChatCompletionRequest,
    headers: dict[str, str],
    request_id: str,
    defaults: dict[str, Any] | None,
    guided: GuidedDecoding | None = None,
) -> Request:
    """The pipeline request of a chat; `defaults`: the model's sampling defaults; `guided`: the reply's constraint.
    Without `max_tokens` (or `max_completion_tokens`) the reply is bounded by the context alone, as OpenAI's and
    vLLM's chats are."""
    _check_unsupported(body)
    if body.echo:
        _refuse("echo", "completions echo their prompt; a chat's is its messages")
    if not body.messages:
        _refuse("messages", "must hold at least one message")
    if body.top_logprobs is not None and not (body.logprobs and 0 <= body.top_logprobs <= MAX_LOGPROBS):
        _refuse("top_logprobs", f"needs logprobs=true and a value in [0, {MAX_LOGPROBS}]")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, logprobs, defaults, guided)
    now = time.time()
    messages = [_message_dict(m, i) for i, m in enumerate(body.messages)]
    return Request(
        request_id=request_id,
        messages=messages,
        template_kwargs=_chat_template_kwargs(body),
        sampling=params,
        model=body.model,
        arrival_time=now,
        **scheduling(body, headers, now),
    )


def _chat_template_kwargs(body: ChatCompletionRequest) -> dict[str, Any] | None:
    if body.continue_final_message and body.messages[-1].role != "assistant":
        _refuse("continue_final_message", "the last message must be the assistant's, to continue")
    return template_kwargs(body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs)


def template_kwargs(
    add_generation_prompt: bool, continue_final_message: bool, extra: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """What a chat's messages are rendered with besides them (vLLM's two switches, and its `chat_template_kwargs`:
    `extra`), for a served chat and for /tokenize alike; None for the default (the generation prompt added). A 400
    for settings that contradict each other."""
    if continue_final_message and add_generation_prompt:
        _refuse("continue_final_message", "continues the last message: set add_generation_prompt false with it")
    kwargs = dict(extra or {})
    for name in ("add_generation_prompt", "continue_final_message", "tools", "chat_template", "messages"):
        if name in kwargs:
            _refuse("chat_template_kwargs", f"{name} is a field of the request, not of chat_template_kwargs")
    if not add_generation_prompt:
        kwargs["add_generation_prompt"] = False
    if continue_final_message:
        kwargs["continue_final_message"] = True
    return kwargs or None


def _message_dict(message: ChatMessage, index: int) -> dict[str, Any]:
    """Text content as the chat template wants it; content parts of type text are joined, others refused."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                _refuse(f"messages[{index}].content", "only text content parts are supported")
            texts.append(part["text"])
        content = "".join(texts)
    out: dict[str, Any] = {"role": message.role, "content": content or ""}
    for name in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
        if getattr(message, name) is not None:
            out[name] = getattr(message, name)
    return out
