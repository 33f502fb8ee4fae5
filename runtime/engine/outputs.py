"""What the engine hands back per request per step (vLLM-compatible names).

`text`/`token_ids` are cumulative; `text_delta`/`token_ids_delta` are what this step added, for streaming."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec


class TokenLogprob(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """One token's log-probability (under the raw logits) and its most likely alternatives: an output token's, or a
    prompt token's given the tokens before it (`prompt_logprobs`, which also rank it)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = msgspec.field(default_factory=list)  # (token id, logprob), most likely first
    rank: int | None = None  # 1 + how many tokens were likelier; reported for prompt tokens, as vLLM does

    def to_dict(self) -> dict[str, Any]:
        """By name, for a results file (the struct itself encodes as an array)."""
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}


class RequestMetrics(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """One request's timeline and token counts: what the engine reports, what the pipeline's items carry across
    processes, what the metrics sink and the benchmarks aggregate. Times are wall clock (`time.time()`), so stamps
    taken in different processes compare; None where the request never got that far. Every latency anyone reports is
    derived here, so TTFT means the same in the offline API, a graph, the gateway and a benchmark."""

    arrival_time: float | None = None
    first_scheduled_time: float | None = None  # it left the queue: first scheduled by an engine, or dispatched
    first_token_time: float | None = None
    finished_time: float | None = None  # the last token (or the error)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from a prefix cache, or computed by a prefill worker
    num_preemptions: int = 0
    slo_met: bool | None = None  # None: the request set no SLO
    # PD: the prefill worker's first token to the decode worker's (KV gathered, sent, copied into decode's cache)
    kv_handover_s: float | None = None
    # Of `num_cached_tokens`, those found where: "pages" (the KV cache), "ram", "disk" (the tiers under it, kv_tiers/),
    # "peer" (fetched from another instance); None without tiers. (Last: the struct travels as an array.)
    cached_tokens_by_tier: dict[str, int] | None = None

    @property
    def queue_s(self) -> float | None:
        return _between(self.arrival_time, self.first_scheduled_time)

    @property
    def ttft_s(self) -> float | None:
        return _between(self.arrival_time, self.first_token_time)

    @property
    def e2e_s(self) -> float | None:
        return _between(self.arrival_time, self.finished_time)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        span = _between(self.first_token_time, self.finished_time)
        return None if span is None or self.num_output_tokens < 2 else span / (self.num_output_tokens - 1)

    def latencies(self) -> dict[str, float | None]:
        """queue_s, ttft_s, tpot_s and e2e_s by name."""
        return {name: getattr(self, name) for name in LATENCIES}

    def to_dict(self) -> dict[str, Any]:
        """Every stamp and count, and the latencies derived from them, by name: a request's line in a JSONL file."""
        return {**msgspec.structs.asdict(self), **self.latencies()}


LATENCIES = ("queue_s", "ttft_s", "tpot_s", "e2e_s")


def _between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


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
    # waiting long prompts that start only once a running one is through: they hold no seat of the running batch yet
    num_waiting_long: int = 0
    spec_decode_num_drafts: int = 0  # speculative decoding, since start: verifications of proposed tokens
    spec_decode_num_draft_tokens: int = 0  # ... tokens proposed
    spec_decode_num_accepted_tokens: int = 0  # ... and accepted
    num_threads: int = 0  # the threads its steps compute with now (fewer while other programs use its cores)
    kv_offload: KvOffloadStats | None = None  # the tiers under its prefix cache, where it has them


@dataclass
class KvOffloadStats:
    """What the tiers under an engine's prefix cache hold and have done (kv_tiers/)."""

    ram_bytes: int = 0
    disk_bytes: int = 0  # this instance's estimate of the shared directory's bytes
    stored_blocks: int = 0  # blocks (and recurrent checkpoints) put in the tiers, since start
    loaded_blocks: int = 0  # ... and loaded back into the KV cache


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprob] | None = None
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
    # With `prompt_logprobs`: one per prompt token, None for the first (nothing comes before it), as vLLM's.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    kv: Any = None  # prefill-only requests (finish reason "prefilled"): the prompt's KV, [layers, 2, len, Hk, D]
    states: Any = None  # ... and a model with recurrent layers' states after the prompt (ModelRunner.read_states)
    error: str | None = None  # finish reason "error": what made a step fail for this request alone
    error_code: str = "internal"  # ... as a RequestError's code ("invalid_request": its constraints left no token)
