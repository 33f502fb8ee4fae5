"""The control plane's types as SAGE applications write them: the names, fields, defaults and order of the seed
sageLLM's `control_plane.types` (instances, requests, PD settings, metrics), with what sageLLM adds after them.

An instance type or a priority may be given as the enum or its name/value as a string ("prefilling", "DECODING");
a value the API does not have is refused at construction, naming the values it has."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sagellm.common.errors import FieldError
from sagellm.runtime.engine.priority_classes import PRIORITY_CLASSES

DEFAULT_MAX_TOKENS = 512  # a request that sets none: the seed's executors send `max_tokens or 512`


class RequestPriority(enum.IntEnum):
    """Priority classes; lower runs first (the value is the pipeline request's `priority`)."""

    CRITICAL = PRIORITY_CLASSES["critical"]
    HIGH = PRIORITY_CLASSES["high"]
    NORMAL = PRIORITY_CLASSES["normal"]
    LOW = PRIORITY_CLASSES["low"]
    BACKGROUND = PRIORITY_CLASSES["low"] + 1


class RequestStatus(enum.Enum):
    PENDING = "pending"
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ExecutionInstanceType(enum.Enum):
    GENERAL = "general"  # runs whole requests
    PREFILLING = "prefilling"
    DECODING = "decoding"
    HYBRID = "hybrid"  # prefills and decodes: runs whole requests too


ENGINE_KINDS = ("llm", "vllm", "sglang", "llamacpp")  # engines the control plane starts (`engine_kind`)
PD_ROLES = {
    ExecutionInstanceType.GENERAL: "colocated",
    ExecutionInstanceType.HYBRID: "colocated",
    ExecutionInstanceType.PREFILLING: "prefill",
    ExecutionInstanceType.DECODING: "decode",  # a decode server runs whole requests too
}


def _enum_member(kind: type[enum.Enum], value: Any, name: str) -> Any:
    """`value` as a member of `kind`: the member, its value, or its name in any case."""
    if isinstance(value, kind):
        return value
    for member in kind:
        if value == member.value or (isinstance(value, str) and value.upper() == member.name):
            return member
    names = ", ".join(m.name for m in kind)
    raise FieldError(name, f"{name}: {value!r} is not one of {names} (or their lower-case values)")


@dataclass
class PrefillingConfig:
    """How a prefill instance should run (the seed's fields). A server registered by address runs as its own flags
    say: these describe it."""

    target_batch_size: int = 64
    target_throughput_tokens_per_sec: float = 1000.0
    tensor_parallel_size: int = 4
    pipeline_parallel_size: int = 1
    enable_kv_cache: bool = True
    enable_chunked_prefill: bool = True
    max_chunk_size_tokens: int = 4096
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class DecodingConfig:
    """How a decode instance should run (the seed's fields): `max_parallel_requests` bounds the requests the control
    plane sends it at once; the rest describe it (a server registered by address runs as its own flags say)."""

    target_latency_ms: float = 50.0
    target_tokens_per_sec_per_gpu: float = 100.0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_prefix_caching: bool = True
    max_parallel_requests: int = 200
    kv_cache_memory_fraction: float = 0.85
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExecutionInstance:
    """An OpenAI-compatible server (vLLM, llama.cpp, another sageLLM) the control plane sends requests to. Its
    parallelism fields describe how the server itself runs; `model_name` "" is the one the server lists first (asked
    at registration). The live fields (`is_healthy` ... `active_requests`) are filled by `get_instances()`."""

    instance_id: str
    host: str = "localhost"
    port: int = 8000
    model_name: str = ""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    instance_type: ExecutionInstanceType | str = ExecutionInstanceType.GENERAL
    prefilling_config: PrefillingConfig | None = None
    decoding_config: DecodingConfig | None = None
    gpu_count: int = 1
    gpu_memory_gb: float = 0.0
    gpu_utilization: float | None = None
    is_available: bool = True
    is_healthy: bool = True
    current_load: float = 0.0  # requests running / max_concurrent_requests
    avg_latency_ms: float = 0.0
    throughput_tokens_per_sec: float = 0.0
    active_requests: int = 0
    max_concurrent_requests: int = 100  # sent to it at once; more wait in the policy queue
    expert_parallel_size: int = 1
    api_key: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # None: a server that runs already, at host:port; "llm" (ours), "vllm", "sglang", "llamacpp": the control plane
    # starts that engine's server for `model_name` and supervises it (its host and port are then where it listens)
    engine_kind: str | None = None

    def __post_init__(self) -> None:
        self.instance_type = _enum_member(ExecutionInstanceType, self.instance_type, "instance_type")
        if not self.instance_id:
            raise FieldError("instance_id", "instance_id: give the instance a name")
        if self.engine_kind is not None and self.engine_kind not in ENGINE_KINDS:
            kinds = ", ".join(ENGINE_KINDS)
            raise FieldError("engine_kind", f"engine_kind: {self.engine_kind!r} is not one of {kinds}")
        if self.engine_kind is not None and not self.model_name:
            raise FieldError("model_name", "model_name: the model an engine started here serves")
        if self.decoding_config is not None:
            self.max_concurrent_requests = min(self.max_concurrent_requests, self.decoding_config.max_parallel_requests)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pd_role(self) -> str:
        """What the server does in the gateway: whole requests, or one half of PD across servers."""
        return PD_ROLES[self.instance_type]


PD_ROUTING_POLICIES = ("adaptive", "threshold")


@dataclass
class PDSeparationConfig:
    """When a request is split into prefill and decode (the seed's fields): "threshold" splits a prompt of more
    than `prefilling_threshold_input_tokens` uncached tokens; "adaptive" also one whose prompt is more than
    `prefilling_threshold_ratio` times its expected output. sageLLM adds each role's own devices."""

    enabled: bool = True
    routing_policy: str = "adaptive"
    prefilling_threshold_input_tokens: int = 800
    prefilling_threshold_ratio: float = 4.0
    # Each role's own devices (`EngineConfig.device_ids`: GPU indexes, or CPU cores its threads are pinned to).
    prefill_device_ids: list[int] | None = None
    decode_device_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.routing_policy not in PD_ROUTING_POLICIES:
            raise FieldError(
                "routing_policy",
                f"routing_policy: {self.routing_policy!r} is not one of {', '.join(PD_ROUTING_POLICIES)}",
            )
        if self.prefilling_threshold_input_tokens < 0 or self.prefilling_threshold_ratio <= 0:
            raise FieldError("prefilling_threshold_input_tokens", "the thresholds must be >= 0 tokens and > 0")

    def pd_split_params(self) -> dict[str, Any]:
        """The `pd_split` operator's parameters this config stands for: the threshold, and for "adaptive" the ratio
        (0: "threshold" splits on prompt length alone)."""
        ratio = self.prefilling_threshold_ratio if self.routing_policy == "adaptive" else 0.0
        return {"threshold_tokens": self.prefilling_threshold_input_tokens, "ratio": ratio}


@dataclass
class RequestMetadata:
    """One request (the seed's fields first): a prompt, or sageLLM's `messages` for a chat. An empty `request_id`
    gets a new one."""

    request_id: str = ""
    prompt: str | None = None
    user_id: str | None = None
    priority: RequestPriority | str = RequestPriority.NORMAL
    slo_deadline_ms: float | None = None  # the whole request, from its arrival
    max_tokens: int | None = None  # None: 512, as the seed's
    temperature: float = 1.0
    top_p: float = 1.0
    model_name: str | None = None  # None: the control plane's own model, or the only model its instances serve
    cost_budget: float | None = None
    tbt_slo_ms: float | None = None  # time between tokens (sageLLM's TPOT SLO)
    tags: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] | None = None  # a chat instead of a prompt
    ttft_slo_ms: float | None = None
    arrival_time: datetime = field(default_factory=datetime.now)

    def __post_init__(self) -> None:
        self.request_id = self.request_id or f"req-{uuid.uuid4().hex}"
        self.priority = _enum_member(RequestPriority, self.priority, "priority")


@dataclass
class RequestResult:
    """A request's outcome so far: its status, the instance serving it, its text, and why it ended."""

    request_id: str
    status: RequestStatus
    instance_id: str | None
    text: str = ""
    finish_reason: str | None = None
    error: dict[str, str] | None = None
    retries: int = 0

    @property
    def ended(self) -> bool:
        return self.status in (RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.CANCELLED)


@dataclass
class PerformanceMetrics:
    """What `get_metrics()` returns (the seed's attributes): request counts, end-to-end latencies, rates, SLOs and
    GPU use. A figure nothing measured is None (no GPU: `avg_gpu_utilization` None, not 0)."""

    timestamp: datetime = field(default_factory=datetime.now)
    total_requests: int = 0
    completed_requests: int = 0
    failed_requests: int = 0
    active_requests: int = 0
    queued_requests: int = 0
    avg_latency_ms: float | None = None
    p50_latency_ms: float | None = None
    p95_latency_ms: float | None = None
    p99_latency_ms: float | None = None
    tokens_per_second: float | None = None
    requests_per_second: float | None = None
    avg_gpu_utilization: float | None = None  # percent, over the GPUs NVML sees
    total_gpu_memory_gb: float | None = None
    used_gpu_memory_gb: float | None = None
    slo_violations: int = 0
    slo_compliance_rate: float = 1.0  # met / checked (1.0 while no request had an SLO)
    avg_ttft_ms: float | None = None
    avg_tpot_ms: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # each instance's state and load, retries
