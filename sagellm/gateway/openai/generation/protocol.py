"""What completions and chat completions share in their request bodies, and its reading into a pipeline `Request`.

Bodies decode with msgspec into Structs (a wrong type is a 400 naming the field). Fields OpenAI or vLLM define that
sageLLM cannot honour are refused with a 400 naming them (vLLM's in `vllm_fields.py`) rather than silently ignored, and
so is a field the bodies do not have (`forbid_unknown_fields`), as OpenAI's API refuses it: vLLM's way, a warning in
its log and a 200, turns `temprature` into a reply sampled at the default without a word to the client. The 400 names
every unknown field, each with the one it was probably meant to be (`http.unknown_fields`). OpenAI's penalties and
`logit_bias` (token ids as string keys, as the openai SDK sends them), vLLM's extensions (`top_k`, `min_p`,
`ignore_eos`, `stop_token_ids`, `repetition_penalty`, `min_tokens`, `bad_words`, `allowed_token_ids`,
`prompt_logprobs`, ...), sageLLM's scheduling fields (`priority` by number or class name, SLOs, `cost_budget`; also as
`X-Request-Priority` / `X-SLO-Deadline-Ms` headers) and failover timeouts are accepted in the body. Every list or map
a body holds has a cap (`request_limits`): the sampling fields' are SamplingParams' to check, the rest are declared on
the types (`msgspec.Meta`), so an oversized body is a 400 naming the field before any of its work is done. Each
endpoint's own fields are in its room's `protocol.py`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.openai.generation.vllm_fields import VllmFields, refuse_unserved
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.engine.priority_classes import PRIORITY_CLASSES
from sagellm.runtime.engine.sampling_params import MAX_CHOICES, SamplingParams
from sagellm.runtime.pipeline.messages import Priority, TokenId

_PRIORITY_MIN, _PRIORITY_MAX = -(2**31), 2**31 - 1  # Priority's bounds, for the header that bypasses the struct
PriorityName = Literal["critical", "high", "normal", "low"]
# A request's own failover timeout, seconds: under a second it would only turn a busy moment into a 504.
Timeout = Annotated[float, msgspec.Meta(ge=1, le=86_400)]


# The body's fields that are SamplingParams' of the same name and meaning, taken as sent.
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "ignore_eos", "skip_special_tokens",
    "include_stop_str_in_output", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
    "min_tokens", "bad_words", "allowed_token_ids",
)  # fmt: skip


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class GenerationRequest(VllmFields, kw_only=True, forbid_unknown_fields=True):
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
    kv_transfer_params: dict[str, Any] | None = None  # vLLM's PD across servers (`kv_transfer/`)
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


def refuse(name: str, why: str) -> None:
    raise ApiError.unsupported(name, why)


def check_unsupported(body: GenerationRequest, *, chat: bool) -> None:
    """A 400 for a number of choices out of range, or a vLLM field this server does not serve (`chat`: the body is a
    chat's, whose own vLLM fields are refused too)."""
    if not 1 <= body.n <= MAX_CHOICES:
        raise ApiError(400, f"n: must be in [1, {MAX_CHOICES}], got {body.n}", param="n")
    refuse_unserved(body, chat=chat)


def sampling_params(
    body: GenerationRequest,
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
        refuse("prompt_logprobs", "not available with stream=true (as vLLM's)")
    as_sent = {name: getattr(body, name) for name in SAMPLING_FIELDS}
    try:
        return SamplingParams.with_defaults(
            defaults,
            **as_sent,
            max_tokens=max_tokens,
            stop_token_ids=body.stop_token_ids or [],
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs if prompt_logprobs is not None else body.prompt_logprobs,
            guided=guided,
        )
    except ValueError as exc:
        raise ApiError.from_value_error(exc) from None


def scheduling(body: GenerationRequest, headers: dict[str, str], now: float) -> dict[str, Any]:
    """Priority and SLOs from the body or the `X-Request-Priority` / `X-SLO-Deadline-Ms` headers (body first), and
    the request's own failover timeouts."""
    priority = body.priority if body.priority is not None else _header_priority(headers)
    priority = PRIORITY_CLASSES[priority] if isinstance(priority, str) else priority
    if priority is not None and not _PRIORITY_MIN <= priority <= _PRIORITY_MAX:
        refuse("priority", f"must be in [{_PRIORITY_MIN}, {_PRIORITY_MAX}], got {priority}")
    deadline_ms = body.slo_deadline_ms
    if deadline_ms is None:
        deadline_ms = _header_number(headers, "x-slo-deadline-ms", float)
    slos = (("ttft_slo_ms", body.ttft_slo_ms), ("tpot_slo_ms", body.tpot_slo_ms), ("slo_deadline_ms", deadline_ms))
    for name, value in slos:
        if value is not None and not value > 0:
            refuse(name, f"must be > 0, got {value}")
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
