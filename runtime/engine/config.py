"""The engine's settings, in one struct that every way of configuring an engine derives from: `LLM(**kwargs)`, the
engine operators' graph parameters (`engine`, `prefill`, `decode`), a managed engine's `engine` settings (the
management API and presets) and the CLI's engine flags. Each value is checked here, once, and a bad one raises
`FieldError` naming its field, so a graph file reports it at its line and an HTTP API as its `param`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from sagellm.common.errors import FieldError
from sagellm.common.hints import conforms, describe
from sagellm.runtime.engine.kv_events.config import parse_kv_events_config
from sagellm.runtime.engine.speculative.config import parse_speculative_config


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = _help("model path (a .gguf file or an HF directory); engine operators take the graph's", None)
    # llama.cpp's --mmproj: a GGUF model's vision encoder, in the file llama.cpp's converter writes beside it
    # (runtime/models/mmproj/reader.py); engine and encode operators take the graph's, as they take its model.
    mmproj: str | None = _help("a GGUF model's multimodal projector file (llama.cpp's --mmproj): it sees images", None)
    # vLLM's --language-model-only: a checkpoint that sees images or hears audio served as its text model alone, its
    # encoders neither loaded nor run, media refused (engine operators take the graph's, as they take its model)
    language_model_only: bool = _help("serve a multimodal model's text model alone: no encoders, no media", False)
    backend: str = _help("hardware backend: auto, cpu, cuda, ascend, cambricon, hygon", "auto")
    max_num_seqs: int = _help("requests the engine runs at once", 16)
    # 512, not vLLM-CPU's server's 2,048: through the server (W1-c16, `vllm bench serve`, AVX2 EPYC, session 56)
    # 1,024 made no more output tok/s (110.4 against 116.8, two rounds) at nearly twice the TTFT p50 (3.8 s against
    # 2.1), though offline, where every prompt waits from the start, its larger GEMMs made 1.1x.
    max_num_batched_tokens: int = _help("token budget of one step; chunked prefill cuts prompts to fit", 512)
    # vLLM's --long-prefill-token-threshold, --max-num-partial-prefills and --max-long-partial-prefills
    # (runtime/engine/long_prefills.py): a prompt with more tokens than the threshold left to compute is long and
    # computes that many a step (fewer deeper in, where attention costs more), and a step scores that many prompt
    # positions for prompt logprobs at most; at most max_num_partial_prefills prompts are prefilled across steps at
    # once, max_long_partial_prefills of them long, and shorter prompts waiting behind the others start ahead of
    # them, in a step of their own. So a short chat's first token waits for steps of about the threshold's tokens,
    # not for whole long prompts. By default (None) a prompt is long past the step's budget (max_num_batched_tokens:
    # prompts that take several steps anyway; a prompt scored for logprobs past AUTO_SCORED_TOKENS) and computes
    # AUTO_CHUNK_TOKENS a step (the whole budget while nothing else runs or waits), scoring AUTO_SCORED_TOKENS
    # positions, sized on a 2-core CPU (`sagellm bench fairness`): prompts that fit a step keep their speed (W1's);
    # 0 turns it off.
    long_prefill_token_threshold: int | None = _help(
        "a prompt with more tokens left is long: it computes this many a step, fewer deeper in (default: prompts "
        "over the step's budget, 48 tokens a step beside other requests, the step's budget alone; scored for "
        "logprobs, over 32, 32 a step; 0: off)",
        None,
    )
    max_num_partial_prefills: int = _help("prompts prefilled across steps at once (the rest wait)", 1)
    max_long_partial_prefills: int = _help(
        "long prompts prefilled at once; shorter ones waiting behind more start ahead of them", 1
    )
    max_model_len: int | None = _help("context length (default: the model's, capped by the KV cache)", None)
    block_size: int = _help("tokens per KV cache block", 16)
    # vLLM's --kv-cache-memory-bytes, in GiB. None: what max_num_seqs sequences of max_model_len tokens need, at most
    # 40% of the memory free when the engine starts (runtime/engine/kv_budget.py).
    kv_cache_memory_gb: float | None = _help(
        "memory for the KV cache, GiB (default: max_num_seqs x max_model_len tokens, at most 0.4 of free memory)", None
    )
    num_kv_blocks: int | None = _help("KV cache blocks, overriding kv_cache_memory_gb", None)
    enable_prefix_caching: bool = _help("share the KV of equal prompt prefixes between requests", True)
    kv_offload_ram_gb: float = _help(
        "RAM under the prefix cache, GiB: blocks evicted from the KV cache are kept there (least recently used out) "
        "and loaded back for a prompt that starts with them (0: none)",
        0.0,
    )
    kv_offload_dir: str | None = _help(
        "a directory for the disk tier under the RAM one: blocks are kept there across restarts, shared by every "
        "instance on the host that names it",
        None,
    )
    kv_offload_disk_gb: float | None = _help(
        "the disk tier's size, GiB (default: 32, or half the free space of its file system where that is less)", None
    )
    kv_events_config: dict[str, Any] | None = _help(
        'KV cache events, vLLM\'s JSON: {"enable_kv_cache_events": true, "endpoint": "tcp://*:5557", '
        '"replay_endpoint": "tcp://*:5558"}: every block the engine caches or drops, in its pages, RAM or disk',
        None,
    )
    # vLLM's --scheduling-policy. fcfs: waiting requests start in arrival order, and when the KV cache runs out the
    # most recently admitted is preempted. priority: a request's `priority` (lower first, the pipeline's convention)
    # orders the waiting queue, the lowest running request is preempted first, and a waiting request preempts running
    # ones below it that hold the seat or the blocks it needs (runtime/engine/scheduler.py).
    scheduling_policy: str = _help(
        "fcfs (arrival order) or priority (requests' priority, lower first; low ones preempted for high ones)", "fcfs"
    )
    num_threads: int | None = _help(
        "torch intra-op threads on the CPU (default: OMP_NUM_THREADS where set, else the cores this process may use)",
        None,
    )
    # Each step's parallel regions wait for their slowest thread, and a thread sharing its core with another busy
    # program waits a time slice at a time: the engine runs fewer threads while others use its cores
    # (runtime/engine/thread_governor.py), never more than num_threads. False: num_threads all the time.
    adaptive_threads: bool = _help(
        "run fewer threads while other programs keep the cores busy (at most num_threads)", True
    )
    # A GGUF file's blocks (Q4_0/Q4_1/Q5_0/Q8_0 and the K-quants) as the linears' one form on a backend whose kernels
    # read them: the same weight values in a fraction of the memory and of the bytes per step. False: the weights
    # dequantized to fp32 at load, everywhere.
    quantized_weights: bool = _help("keep a GGUF's quantized blocks as the weights (else dequantize to fp32)", True)
    # llama.cpp's numerics for the linears on Q4_0/Q4_1 blocks (the default model's) and Q4_K/Q5_K/Q6_K (a Q4_K_M
    # file's): each input row rounded per 32 values to a scale and int8 (its Q8_1), the blocks' dot products in int8
    # (backends/native/block_q8.c): SmolLM2's layer linears 1.5-2.1x the exact kernels at every row count on AVX2, a
    # 7B Q4_K's 1.7x at 512 rows; a row's floats the same whatever it is batched with. Off: x as it is, exact against
    # transformers to fp32's rounding; on: exact against the fp32 linear on x so rounded (each value within 2^-8 of
    # its block's largest). Refused where no linear can take it.
    int8_activations: bool = _help(
        "round the 4-bit and K-quant linears' inputs to int8 per 32 values as llama.cpp does: faster prefill (opt-in)",
        False,
    )
    # vLLM's --dtype. auto and float32 compute everything in fp32. bfloat16 is opt-in, on a CPU with AVX512-BF16 or
    # AMX: the linears oneDNN runs (prefill-sized batches, and decode of weights without GGUF blocks) take bf16
    # weights and inputs and sum in fp32 (twice fp32's rate); attention, norms, the KV cache and the linears on GGUF
    # blocks stay fp32. Its accuracy cost is measured by `sagellm bench numerics`.
    dtype: str = _help("auto or float32 (exact), or bfloat16: prefill's linears in bf16 (opt-in)", "auto")
    # vLLM's --seed: the process's random state, from which requests without a seed of their own draw.
    seed: int | None = _help("random seed of the engine: unseeded requests sample the same way every run", None)
    # The KV cache is allocated untouched (no start-up cost) and its pages mapped a window ahead of the blocks in use
    # (runtime/engine/kv_prefault.py), so it costs resident memory as requests fill it. On: all of it is mapped in the
    # background from the start, as vLLM touches its cache at start-up: no fresh page costs a step, and the whole
    # reservation is resident (`sagellm serve` did so while the cache was a fixed 1 GiB).
    prefault_kv_cache: bool = _help("map the whole KV cache in the background from the start", False)
    # vLLM's --tensor-parallel-size: the model's heads, MLP and vocabulary split over this many ranks, one process
    # (and one device) each, every layer's two partial sums joined by an all-reduce.
    # Unset (None, the default) with pipeline_parallel_size: the planner's choice for this model on this machine's
    # devices when the engine starts (runtime/parallel/engine.py; 1 on a CPU the model fits).
    tensor_parallel_size: int | None = _help(
        "ranks (processes, devices) each layer is split over: tensor parallelism (default: the planner's)", None
    )
    # vLLM's --pipeline-parallel-size: the layers split into this many stages, one process group each, the hidden
    # state passed from stage to stage; with tensor parallelism, tp x pp processes.
    pipeline_parallel_size: int | None = _help(
        "stages the model's layers are split into: pipeline parallelism (default: the planner's)", None
    )
    # Where the engine runs: GPU (or NPU, MLU) indexes on an accelerator, one per tensor parallel rank; CPU cores on
    # the cpu backend, shared out among its ranks, its threads pinned there (a prefill and a decode engine apart).
    device_ids: list[int] | None = _help(
        "the engine's devices: accelerator indexes, or CPU cores on the cpu backend", None
    )
    # vLLM's --speculative-config (runtime/engine/speculative): {"method": "ngram", "num_speculative_tokens": k,
    # "prompt_lookup_max": n, "prompt_lookup_min": m}. Each decoding sequence's next k tokens guessed and checked in
    # one forward pass; greedy output is unchanged, sampled output distributed as without.
    speculative_config: dict[str, Any] | None = _help(
        'speculative decoding, vLLM\'s JSON: {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}',
        None,
    )
    # vLLM's --limit-mm-per-prompt: {"image": n, "audio": n} caps the images and clips one prompt may carry (0: none)
    # and a modality not named has no cap beyond the context.
    limit_mm_per_prompt: dict[str, int] | None = _help(
        'the most media of each kind one prompt may carry, vLLM\'s JSON: {"image": 2} (default: no cap)', None
    )
    # vLLM's --enable-lora, --max-loras, --max-lora-rank: requests may name a PEFT LoRA adapter (LoRARequest), and
    # rows of up to max_loras adapters and of none share a step (runtime/engine/lora_slots.py).
    enable_lora: bool = _help("serve LoRA adapters: requests name one, and adapters and the base share batches", False)
    max_loras: int = _help("LoRA adapters a step may mix (each a slot of the engine's adapter weights)", 1)
    max_lora_rank: int = _help("the largest rank of a LoRA adapter the engine takes", 16)

    # vLLM's --distributed-executor-backend: how the ranks other than 0 are started. mp: processes on this host,
    # sharing memory for the CPU's all-reduces. ray: Ray actors, one per rank, in a placement group spread over the
    # cluster's nodes (RAY_ADDRESS, else the cluster `ray start` made here), gloo over TCP between them.
    distributed_executor_backend: str = _help("where ranks 1.. run: mp (processes here) or ray (a Ray cluster)", "mp")

    def __post_init__(self) -> None:
        for name, (hint, _, _) in ENGINE_FIELDS.items():
            value = getattr(self, name)
            if not conforms(value, hint):
                raise FieldError(name, f"{name} must be {describe(hint)}, got {type(value).__name__} {value!r}")
        _at_least(self, "max_num_seqs", 1)
        _at_least(self, "max_num_batched_tokens", 1)
        _at_least(self, "block_size", 1)
        if self.long_prefill_token_threshold is not None:
            _at_least(self, "long_prefill_token_threshold", 0)
        _at_least(self, "max_num_partial_prefills", 1)
        _at_least(self, "max_long_partial_prefills", 1)
        if self.max_long_partial_prefills > self.max_num_partial_prefills:
            long, partial = self.max_long_partial_prefills, self.max_num_partial_prefills
            raise FieldError("max_long_partial_prefills", f"max_long_partial_prefills ({long}) must be <= "
                             f"max_num_partial_prefills ({partial}): the long ones are among them")  # fmt: skip
        _at_least(self, "max_loras", 1)
        _at_least(self, "max_lora_rank", 1)
        for name in ("max_model_len", "num_kv_blocks", "num_threads", "tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) is not None:
                _at_least(self, name, 1)
        if self.device_ids is not None and (not self.device_ids or min(self.device_ids) < 0):
            raise FieldError("device_ids", f"device_ids must be device numbers >= 0, got {self.device_ids!r}")
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise FieldError("distributed_executor_backend", f"distributed_executor_backend must be one of "
                             f"{', '.join(EXECUTOR_BACKENDS)}, got {self.distributed_executor_backend!r}")  # fmt: skip
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise FieldError("scheduling_policy", f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                             f"got {self.scheduling_policy!r}")  # fmt: skip
        if self.dtype not in DTYPES:
            raise FieldError("dtype", f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        parse_speculative_config(self.speculative_config)  # a bad one is an error now, not at the first request
        parse_kv_events_config(self.kv_events_config)
        for kind, most in (self.limit_mm_per_prompt or {}).items():
            if kind not in MEDIA_KINDS or not isinstance(most, int) or isinstance(most, bool) or most < 0:
                raise FieldError("limit_mm_per_prompt", f"limit_mm_per_prompt takes {{kind: count >= 0}} for kinds "
                                 f"{', '.join(MEDIA_KINDS)}; got {kind!r}: {most!r}")  # fmt: skip
        if not self.kv_offload_ram_gb >= 0:
            raise FieldError("kv_offload_ram_gb", f"kv_offload_ram_gb must be >= 0, got {self.kv_offload_ram_gb}")
        if self.kv_offload_disk_gb is not None and not self.kv_offload_disk_gb > 0:
            raise FieldError("kv_offload_disk_gb", f"kv_offload_disk_gb must be > 0, got {self.kv_offload_disk_gb}")
        if self.kv_offload_dir is not None and not self.kv_offload_dir.strip():
            raise FieldError("kv_offload_dir", "kv_offload_dir must name a directory")
        if self.kv_tiers and not self.enable_prefix_caching:
            raise FieldError("enable_prefix_caching", "the KV offload tiers keep the prefix cache's blocks: they need "
                             "enable_prefix_caching")  # fmt: skip
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise FieldError("kv_cache_memory_gb", f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")

    @property
    def world_size(self) -> int:
        """The engine's processes: a rank for each tensor parallel slice of each pipeline stage (an unset size is
        1 here; `start_engine` sets it from the planner first)."""
        return (self.tensor_parallel_size or 1) * (self.pipeline_parallel_size or 1)

    @property
    def kv_tiers(self) -> bool:
        """Whether blocks leaving the KV cache go to a RAM or disk tier (kv_tiers/)."""
        return self.kv_offload_ram_gb > 0 or self.kv_offload_dir is not None

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


DTYPES = ("auto", "float32", "bfloat16")  # auto is float32
MEDIA_KINDS = ("image", "audio", "video")  # limit_mm_per_prompt's keys, vLLM's modalities
EXECUTOR_BACKENDS = ("mp", "ray")
SCHEDULING_POLICIES = ("fcfs", "priority")  # the scheduler's queues: runtime/engine/request_queue.py QUEUES

# vLLM's short names of two settings: `-tp` / `--tp` on command lines, `tp:` in graph files.
SHORT_NAMES = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size"}


def _fields() -> dict[str, tuple[Any, Any, str]]:
    hints = get_type_hints(EngineConfig)
    return {f.name: (hints[f.name], f.default, f.metadata["help"]) for f in dataclasses.fields(EngineConfig)}


# name -> (type hint, default, help) of every setting: what the graph parameters, a managed engine's settings and the
# CLI flags are made of.
ENGINE_FIELDS: dict[str, tuple[Any, Any, str]] = _fields()


def _at_least(config: EngineConfig, name: str, low: int) -> None:
    value = getattr(config, name)
    if value < low:
        raise FieldError(name, f"{name} must be >= {low}, got {value!r}")
