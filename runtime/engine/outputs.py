"""What the engine hands back per request per step (vLLM-compatible names).

`text`/`token_ids` are cumulative; `text_delta`/`token_ids_delta` are what this step added, for streaming."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sagellm.runtime.engine.sampler import TokenLogprobs


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.finished_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of one engine's load, which route, pd_split and the policies weigh engines by."""

    num_waiting: int  # requests not yet scheduled (vLLM's num_requests_waiting)
    num_running: int
    kv_cache_usage: float  # fraction of KV cache blocks in use
    prefix_cache_queries: int  # prompt blocks looked up in the prefix cache, since start
    prefix_cache_hits: int  # ... and found there
    pending_prefill_tokens: int  # prompt tokens still to compute
    pending_decode_tokens: int  # expected output tokens still to generate (none for a prefill worker's requests)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprobs] | None = None
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    kv: Any = None  # prefill-only requests (finish reason "prefilled"): the prompt's KV, [layers, 2, len, Hk, D]
