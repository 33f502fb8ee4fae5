"""The control plane as a Python API: a thin face over the gateway's own pipeline, not a second system.

    from sagellm.control_plane import ControlPlaneManager, ExecutionInstance, RequestMetadata, RequestPriority

    cp = ControlPlaneManager(scheduling_policy="priority", routing_strategy="load_balanced")
    cp.register_instance(ExecutionInstance("vllm-1", "127.0.0.1", 8100, model_name="Qwen/Qwen2.5-0.5B-Instruct"))
    cp.start()
    cp.submit_request(RequestMetadata("r1", "What is a river?", priority=RequestPriority.HIGH, max_tokens=32))
    cp.wait("r1")                  # RequestStatus(state="completed", instance_id="vllm-1", text=..., ...)
    cp.get_metrics()
    cp.stop()

`start()` runs a gateway in this process (its trio loop in a thread, as the embedded client does) on a graph made
from the arguments: admission -> policy_sort (`scheduling_policy`) -> route (`routing_strategy`) -> metrics_sink.
Each registered instance is an `openai` engine of that gateway, so a request from `submit_request` and one from an
HTTP client of `cp.url` take the same path: admission, the policy queue, route among the healthy instances of its
model, failover and resume, metrics. `model=` adds engines of our own for that model (the shipped colocated graph);
`enable_pd_separation=True` serves it with the shipped prefill/decode graph instead (`pd_config` sets pd_split's
threshold, the route's strategy and each role's devices): the KV moves between sageLLM's own workers, so a server
registered by address runs whole requests and is registered as GENERAL."""

from __future__ import annotations

import enum
import functools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from sagellm import graphs
from sagellm.common.errors import InvalidInput
from sagellm.gateway.http.errors import ApiError
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.pipeline.messages import PRIORITY_CLASSES, Request, TokenDelta


class ExecutionInstanceType(enum.Enum):
    GENERAL = "general"  # runs whole requests
    PREFILLING = "prefilling"
    DECODING = "decoding"


class RequestPriority(enum.IntEnum):
    """Priority classes; lower runs first (the value is the request's `priority`)."""

    CRITICAL = PRIORITY_CLASSES["critical"]
    HIGH = PRIORITY_CLASSES["high"]
    NORMAL = PRIORITY_CLASSES["normal"]
    LOW = PRIORITY_CLASSES["low"]


@dataclass
class ExecutionInstance:
    """An OpenAI-compatible server (vLLM, llama.cpp, another sageLLM) the control plane sends requests to. Its
    parallelism fields describe how the server itself runs (they are shown, the server applies them)."""

    instance_id: str
    host: str
    port: int
    model_name: str  # the model's name at the server; requests ask for it by this name
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    expert_parallel_size: int = 1
    gpu_count: int = 0
    max_concurrent_requests: int | None = None  # more at once are refused as overloaded (429)
    instance_type: ExecutionInstanceType = ExecutionInstanceType.GENERAL
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass
class PDSeparationConfig:
    prefilling_threshold_input_tokens: int = 256  # uncached prompt tokens from which a request is split
    routing_policy: str = "load_balanced"  # the route's strategy among prefill and decode workers
    # Each role's own devices (`EngineConfig.device_ids`: GPU indexes, or CPU cores its threads are pinned to).
    prefill_device_ids: list[int] | None = None
    decode_device_ids: list[int] | None = None


@dataclass
class RequestMetadata:
    request_id: str
    prompt: str | None = None
    user_id: str | None = None
    priority: RequestPriority = RequestPriority.NORMAL
    slo_deadline_ms: float | None = None
    cost_budget: float | None = None
    max_tokens: int | None = 256
    model_name: str | None = None  # None: the control plane's own model, or the only model its instances serve
    messages: list[dict[str, Any]] | None = None  # a chat instead of a prompt
    temperature: float = 0.0
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None


@dataclass
class RequestStatus:
    request_id: str
    state: str  # queued | running | completed | failed | cancelled
    instance_id: str | None
    text: str = ""
    finish_reason: str | None = None
    error: dict[str, str] | None = None
    retries: int = 0


class ControlPlaneManager:
    def __init__(
        self,
        scheduling_policy: str = "fifo",
        routing_strategy: str = "load_balanced",
        enable_pd_separation: bool = False,
        pd_config: PDSeparationConfig | None = None,
        enable_monitoring: bool = True,
        *,
        model: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """`model`: also serve this model on engines of our own; `enable_monitoring=False` leaves the metrics sink
        out (get_metrics then has no latency figures); `host`/`port`: where the HTTP twin listens (0: any port)."""
        if enable_pd_separation and model is None:
            raise InvalidInput(
                "enable_pd_separation runs sageLLM's own prefill and decode workers: give the model they serve "
                "(model=...); servers registered by address run whole requests"
            )
        self.scheduling_policy, self.routing_strategy = scheduling_policy, routing_strategy
        self.enable_pd_separation, self.pd_config = enable_pd_separation, pd_config or PDSeparationConfig()
        self.enable_monitoring, self.model, self.host, self.port = enable_monitoring, model, host, port
        self._pending: list[ExecutionInstance] = []
        self._gateway: Any = None
        self._texts: dict[str, str] = {}  # what the requests submitted here produced so far
        self._in_core: set[str] = set()  # of those, the ones the serving core has taken (it reports on them)
        self._refused: dict[str, dict[str, str]] = {}  # requests the gateway refused before queueing them
        self._state_dir: tempfile.TemporaryDirectory | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the gateway (engines of our own load now) and registers the instances given so far."""
        from sagellm.gateway.config import GatewayConfig
        from sagellm.gateway.server import GatewayThread

        if self._gateway is not None:
            raise RuntimeError("the control plane is already running")
        self._state_dir = tempfile.TemporaryDirectory(prefix="sagellm-control-plane-")
        config = GatewayConfig(host=self.host, port=self.port, state_dir=Path(self._state_dir.name))
        self._gateway = GatewayThread(self._graph(), config, name="sagellm-control-plane")
        pending, self._pending = self._pending, []
        for instance in pending:
            self.register_instance(instance)

    def stop(self) -> None:
        """Graceful: requests in flight finish, then the gateway and its engines stop."""
        if self._gateway is not None:
            self._gateway.stop()
            self._gateway = None
        if self._state_dir is not None:
            self._state_dir.cleanup()
            self._state_dir = None

    def __enter__(self) -> ControlPlaneManager:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The HTTP twin: the OpenAI API, `/v1/requests/{id}`, the management API (admin key: `admin_key`)."""
        return self._running().url

    @property
    def admin_key(self) -> str:
        return self._running().gateway.admin_key

    # -- instances --------------------------------------------------------------------------------------------------
    def register_instance(self, instance: ExecutionInstance) -> None:
        """Adds a server; before `start()` it is registered when the control plane starts."""
        if instance.instance_type is not ExecutionInstanceType.GENERAL:
            raise InvalidInput(
                f"{instance.instance_id}: a server registered by address runs whole requests (GENERAL); prefill and "
                "decode workers are sageLLM's own (enable_pd_separation=True with model=...): the KV moves between them"
            )
        if self._gateway is None:
            self._pending.append(instance)
            return
        from sagellm.gateway.control.engine_spec import EngineSpec

        spec = EngineSpec(
            model=instance.model_name,
            kind="openai",
            url=instance.url,
            api_key=instance.api_key,
            max_concurrent=instance.max_concurrent_requests,
            label=f"tp{instance.tensor_parallel_size} pp{instance.pipeline_parallel_size} "
            f"dp{instance.data_parallel_size} ep{instance.expert_parallel_size} gpus{instance.gpu_count}",
        )
        self._gateway.wait(self._gateway.gateway.engines.start, spec, instance.instance_id)

    def unregister_instance(self, instance_id: str, *, force: bool = False) -> None:
        """Drains the instance (its requests in flight finish; `force`: they move or fail now) and forgets it."""
        self._running()
        self._gateway.wait(functools.partial(self._gateway.gateway.engines.stop, instance_id, force=force))

    def health_check(self, instance_id: str) -> dict[str, Any]:
        """Probes the instance now: {"id", "healthy", "state", "latency_ms"}."""
        self._running()
        return self._gateway.wait(self._gateway.gateway.engines.health_check, instance_id)

    def health_check_all(self) -> list[dict[str, Any]]:
        return [self.health_check(instance_id) for instance_id in list(self._gateway.gateway.engines.engines)]

    # -- requests ---------------------------------------------------------------------------------------------------
    def submit_request(self, request: RequestMetadata) -> str:
        """Queues the request; returns its id at once (`get_request_status` and `wait` follow it)."""
        core = self._running().core
        if request.request_id in self._texts:
            raise InvalidInput(f"request id {request.request_id!r} is in use")
        model = self._gateway.call(core.instance_model, request.model_name or self._only_model())
        now = time.time()
        pipeline_request = Request(
            request_id=request.request_id,
            prompt=request.prompt if request.messages is None else None,
            messages=request.messages,
            sampling=SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature),
            priority=int(request.priority),
            user=request.user_id,
            ttft_slo_ms=request.ttft_slo_ms,
            tpot_slo_ms=request.tpot_slo_ms,
            deadline=now + request.slo_deadline_ms / 1000 if request.slo_deadline_ms is not None else None,
            cost_budget=request.cost_budget,
            model=model,
            arrival_time=now,
        )
        self._texts[request.request_id] = ""
        self._gateway.start_soon(self._follow, pipeline_request)
        return request.request_id

    async def _follow(self, request: Request) -> None:
        core = self._gateway.core
        try:
            await core.tokenize_prompts([request])
            stream = core.submit(request)
            self._in_core.add(request.request_id)
        except (ApiError, ValueError) as error:  # refused before it was queued: its status says why
            self._refused[request.request_id] = {
                "code": getattr(error, "code", "invalid_request"),
                "message": str(error),
            }
            return
        async for item in stream:
            if isinstance(item, TokenDelta):
                self._texts[request.request_id] += item.text

    def get_request_status(self, request_id: str) -> RequestStatus | None:
        """Where the request is; None for an id this control plane does not know."""
        status = self._running().call(self._gateway.core.request_status, request_id, "")  # submitted without a key
        if status is None:
            refused = self._refused.get(request_id)
            if refused is not None:
                return RequestStatus(request_id, "failed", None, error=refused)
            # submitted, and not yet in the core (its prompt is being tokenized): queued, not unknown
            waiting = request_id in self._texts and request_id not in self._in_core
            return RequestStatus(request_id, "queued", None) if waiting else None
        return RequestStatus(
            request_id=request_id,
            state=status["status"],
            instance_id=status["instance"],
            text=self._texts.get(request_id, ""),
            finish_reason=status["finish_reason"],
            error=status["error"],
            retries=status["retries"],
        )

    def wait(self, request_id: str, timeout_s: float = 600.0) -> RequestStatus:
        """The request's status once it has ended (completed, failed or cancelled)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.get_request_status(request_id)
            if status is None:
                raise KeyError(request_id)
            if status.state in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
                return status
            time.sleep(0.02)

    def get_metrics(self) -> dict[str, Any]:
        """The pipeline's metrics (requests, latencies, SLO compliance), each instance's load and health, and the
        failover's retries."""
        gateway = self._running()

        from sagellm.gateway.serving.core import metrics_snapshot  # (with the gateway: not on `import sagellm`)

        def read() -> dict[str, Any]:
            core = gateway.core
            snapshot = metrics_snapshot(core)
            return {
                "pipeline": msgspec.structs.asdict(snapshot) if snapshot is not None else None,
                "instances": {
                    name: {"model": s.model, "state": s.state, "running": s.running, "waiting": s.waiting}
                    for name, s in core.registry.instances().items()
                },
                "retries": sum(core.retries.values()),
                "in_flight": core.in_flight,
            }

        return gateway.call(read)

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _running(self) -> Any:
        if self._gateway is None:
            raise RuntimeError("the control plane is not running: call start() first")
        return self._gateway

    def _only_model(self) -> str | None:
        """The model a request without one asks for: our own, else the one model the instances serve."""
        if self.model is not None:
            return None
        served = self._gateway.call(self._gateway.core.models)  # no engine of our own: all are instances
        if len(served) == 1:
            return served[0]
        raise InvalidInput(f"model_name: this control plane serves {served}; say which")

    def _graph(self) -> Any:
        from sagellm.runtime.pipeline.yaml_io import load_pipeline

        if self.model is not None:
            graph = load_pipeline(graphs.find("pd" if self.enable_pd_separation else "colocated"))
            graph.attrs["model"] = self.model
        else:
            graph = load_pipeline(graphs.find("control_plane"))
        for node in graph.nodes.values():
            if node.op == "policy_sort":
                node.params["policy"] = self.scheduling_policy
            elif node.op == "route":
                pd_route = self.enable_pd_separation
                node.params["strategy"] = self.pd_config.routing_policy if pd_route else self.routing_strategy
            elif node.op == "pd_split":
                node.params["threshold_tokens"] = self.pd_config.prefilling_threshold_input_tokens
            elif node.op in ("prefill", "decode"):
                devices = getattr(self.pd_config, f"{node.op}_device_ids")
                if devices is not None:
                    node.params["device_ids"] = devices
        if not self.enable_monitoring:
            for node_id in [n.id for n in graph.nodes.values() if n.op == "metrics_sink"]:
                graph.remove_node(node_id)
        return graph
