"""The items that flow along a pipeline graph's edges, in one process or across ZeroMQ links.

They are msgspec Structs so the same objects are passed by reference between trio tasks and encoded without pickle
between processes (`array_like` keeps them compact on the wire, `omit_defaults` skips unset fields). Each is tagged,
so a receiver decodes the union `Message` without being told which one arrives. Tensors (the KV blocks) are not
encoded in the struct: the wire layer sends them as extra zero-copy frames (`sagellm.runtime.comm.wire`).

Times are wall-clock seconds (`time.time()`), because a request's stamps are compared across processes and hosts.
Every request ends with exactly one terminal item: a `TokenDelta` with `finish_reason` set, an `Embedding` (an embed
request's result), or a `RequestError`."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import msgspec

from sagellm.common.tracing import TraceContext
from sagellm.runtime.engine.lora_request import LoRARequest
from sagellm.runtime.engine.outputs import RequestMetrics, TokenLogprob
from sagellm.runtime.engine.peer_prefix import PeerPrefix
from sagellm.runtime.engine.sampling_params import SamplingParams

Phase = Literal["colocated", "prefill", "decode", "embed"]  # embed: the prompt's vector, from an embedding model
# Bounded integers for what a client writes: whatever decodes into them also fits the wire's 64-bit msgpack integers,
# so no value a client sends can fail to encode when its request crosses processes.
Priority = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # the model's vocabulary is checked at admission


class _Message(msgspec.Struct, tag=True, array_like=True, omit_defaults=True, kw_only=True):
    """Base of every pipeline item: `request_id` is what the executor tracks in-flight work by."""

    request_id: str


class EncodedImage(msgspec.Struct, array_like=True, kw_only=True):
    """One picture of a prompt (an image, or one of its tiles) an `encode` node ran through the vision encoder: its
    placeholders' place in the expanded prompt, the hash that keys its KV blocks, and its embeddings, which the
    engine puts in place of those placeholders' token embeddings. `embeds` [length, text hidden] travels as a frame."""

    hash: bytes
    offset: int
    length: int
    embeds: Any = None  # torch.Tensor; None where only its place and key are needed (a decode worker's copy)
    grid: tuple[int, int, int] | None = None  # a Qwen-VL picture's token grid (MediaFeature.grid)


class Request(_Message):
    """A request as it enters the graph with one of `prompt`, `prompt_token_ids` or `messages`; admission fills
    `prompt_token_ids`, pd_split `phase`, route `instance`."""

    prompt: str | None = None
    prompt_token_ids: list[TokenId] | None = None
    pair: str | None = None  # an embed request's second text: a cross-encoder scores the pair (prompt, pair)
    truncate: bool = False  # an embed request's input over the model's length is cut to it (Ollama's), not refused
    pair_max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None  # `pair` cut to its first N tokens (Cohere's)
    messages: list[dict[str, Any]] | None = None  # a chat: admission renders it with the model's chat template
    tools: list[dict[str, Any]] | None = None  # the chat's tools (OpenAI's `tools`), rendered by the template too
    # For a model another server serves, which reads the tools itself: the chat's `tool_choice` (None: its default)
    # and whether its calls may come several at once, as the client gave them.
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template: str | None = None  # renders `messages` instead of the model's (tools the model's cannot show)
    # What else the template is rendered with (None: the generation prompt added): add_generation_prompt,
    # continue_final_message and the chat's own chat_template_kwargs (Qwen3's enable_thinking, say)
    template_kwargs: dict[str, Any] | None = None
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    group: str | None = None  # a request's choices (n) share this: one engine prefills their prompt once
    priority: Priority = 0  # lower runs first (vLLM's convention); W6 classes: 0 high, 1 normal, 2 low
    user: str | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    deadline: float | None = None  # wall-clock time by which the request should be finished
    cost_budget: float | None = None  # most this request may cost, in the instances' price unit per 1k tokens
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks shared only with requests of the same salt
    model: str | None = None
    arrival_time: float = msgspec.field(default_factory=time.time)
    phase: Phase = "colocated"
    instance: str | None = None  # the engine node route chose
    exclude: list[str] = msgspec.field(default_factory=list)  # instances that failed it: route avoids them if it can
    resumed_tokens: int = 0  # a resume: the prompt ends with this many tokens of the request's output so far
    retry: int = 0  # attempts before this one (failover): admitted once, it is not shed again for load
    first_token_timeout_s: float | None = None  # the gateway's failover reads these (None: its defaults)
    token_timeout_s: float | None = None
    admitted_time: float | None = None
    dispatched_time: float | None = None  # when it left the policy queue
    owner: str = ""  # who may read its status: a digest of the API key that sent it ("" for none)
    # Disaggregated serving across servers (vLLM's `kv_transfer_params`). This server prefills only: its last delta
    # carries the prompt's KV, which the gateway keeps for the decode server that fetches it (`do_remote_decode`).
    kv_export: bool = False
    prefilled: Prefilled | None = None  # another server prefilled it: decode from there (`do_remote_prefill`)
    decode_instance: str | None = None  # a prefill on an attached server: the server route chose to decode it
    peer_prefix: PeerPrefix | None = None  # route: another instance holds more of its prefix (fetched from there)
    lora: LoRARequest | None = None  # the LoRA adapter a request's `model` names (vLLM's --lora-modules)
    images: list[bytes] | None = None  # a chat's images, their files as sent, one per placeholder in prompt order
    # Its images encoded by an `encode` node (the EPD graph): `prompt_token_ids` is then the expanded prompt
    encoded_images: list[EncodedImage] | None = None
    audios: list[bytes] | None = None  # a chat's audio clips, their WAV files, one per placeholder in prompt order
    trace: TraceContext | None = None  # a traced request: where its spans go (sagellm/common/tracing.py)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids or ())

    def slo_met(self, metrics: RequestMetrics) -> bool | None:
        """Whether the finished request met every target it set (None: it set none)."""
        checks = []
        if self.ttft_slo_ms is not None:
            checks.append(metrics.ttft_s is not None and metrics.ttft_s * 1000 <= self.ttft_slo_ms)
        if self.tpot_slo_ms is not None:
            checks.append(metrics.tpot_s is None or metrics.tpot_s * 1000 <= self.tpot_slo_ms)
        if self.deadline is not None:
            checks.append(metrics.finished_time is not None and metrics.finished_time <= self.deadline)
        return all(checks) if checks else None


class KVBlocks(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """A request's prompt KV, layer-major, out of the prefill worker's paged cache.

    `data` is [num_layers, 2 (k, v), num_tokens, num_kv_heads, head_dim] (layers of smaller heads, as Gemma 4's,
    padded to the widest: kv_cache.read_tokens); on the wire it travels as a frame, as do
    `states`: a model with recurrent layers' states after the prompt (Qwen3.5's, flat; ModelRunner.read_states)."""

    num_tokens: int
    data: Any  # torch.Tensor; typed Any so msgspec leaves it to the wire layer's hooks
    states: Any = None


class Prefilled(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """A prompt another server prefilled: the tokens it prefilled, its first token and their KV."""

    prompt_token_ids: list[TokenId]
    first_token: TokenId
    kv: KVBlocks


class PrefillDone(_Message):
    """Prefill's product for one request: its first token and its KV, ready for a decode worker."""

    request: Request
    first_token: int
    first_token_time: float
    kv: KVBlocks
    num_cached_tokens: int = 0
    first_logprob: TokenLogprob | None = None  # when the request asked for logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # when it asked for prompt_logprobs


class TokenDelta(_Message):
    """New output of one request; the last one of a request has `finish_reason` and its `metrics`."""

    token_ids: list[int]
    text: str = ""
    time: float = msgspec.field(default_factory=time.time)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # with "stop": the stop token id or stop string that ended it (vLLM's)
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for logprobs
    # A request's first delta, when it asked for prompt_logprobs: one per prompt token, None for the first
    prompt_logprobs: list[TokenLogprob | None] | None = None
    metrics: RequestMetrics | None = None
    kv: KVBlocks | None = None  # a `kv_export` request's last delta: its prompt's KV

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Embedding(_Message):
    """An embed request's result: the prompt's vector (and its token count, special tokens included)."""

    vector: list[float]
    prompt_tokens: int
    time: float = msgspec.field(default_factory=time.time)
    metrics: RequestMetrics | None = None


ErrorCode = Literal[
    "invalid_request",
    "not_found",
    "context_length_exceeded",
    "overloaded",
    "rate_limited",
    "rate_limit_exceeded",
    "model_not_found",
    "unavailable",
    "instance_lost",
    "timeout",
    "queue_timeout",
    "internal",
]


class LimitReached(msgspec.Struct, array_like=True, kw_only=True):
    """The limit of its key a `rate_limited` refusal met (the gateway's keys file): what a client's
    `x-ratelimit-*` headers say."""

    kind: Literal["requests", "tokens", "concurrent"]
    limit: int
    remaining: int
    reset_s: float  # until the request would fit


class RequestError(_Message):
    """A request's terminal failure. `code` maps to an HTTP status at the gateway (`HTTP_STATUS`)."""

    code: ErrorCode
    message: str
    retryable: bool = False
    time: float = msgspec.field(default_factory=time.time)
    metrics: RequestMetrics | None = None
    retry_after_s: float | None = None  # a shed request: when a retry may find room (the queue's expected drain)
    limit: LimitReached | None = None  # a key's limit that refused it


HTTP_STATUS: dict[str, int] = {
    "invalid_request": 400,
    "not_found": 404,  # something the request names is not there (a LoRA adapter's directory)
    "context_length_exceeded": 400,
    "overloaded": 429,
    "rate_limited": 429,
    "rate_limit_exceeded": 429,  # a key's limit (OpenAI's code)
    "model_not_found": 404,  # a model its key may not use
    "unavailable": 503,  # no healthy instance can take it now
    "instance_lost": 503,
    "timeout": 504,
    "queue_timeout": 503,  # waited longer than the gateway's --queue-timeout for an engine: try later
    "internal": 500,
}

Message = Request | PrefillDone | TokenDelta | Embedding | RequestError


def is_terminal(item: object) -> bool:
    """True for the one item that ends a request."""
    return isinstance(item, (RequestError, Embedding)) or (isinstance(item, TokenDelta) and item.finished)
