"""The control plane as a Python API, as SAGE applications write it: a thin face over the gateway's own pipeline,
not a second system.

    from sagellm.control_plane import ControlPlaneManager, ExecutionInstance, RequestMetadata, RequestPriority

    async def main():
        manager = ControlPlaneManager(scheduling_policy="priority", routing_strategy="load_balanced")
        manager.register_instance(ExecutionInstance("vllm-1", "127.0.0.1", 8100, model_name="Qwen/Qwen2.5-0.5B"))
        await manager.start()
        request_id = await manager.submit_request(RequestMetadata(prompt="What is a river?", max_tokens=32,
                                                                  priority=RequestPriority.HIGH))
        result = await manager.wait(request_id)   # RequestResult(status=RequestStatus.COMPLETED, text=..., ...)
        print(manager.get_metrics().avg_latency_ms)
        await manager.stop()

The same calls without `await` are on `manager.sync` (and `with ControlPlaneManager() as cp:` starts and stops it).
`start()` runs a gateway in this process (its trio loop in a thread, as the embedded client does) on a graph made
from the arguments: admission -> policy_sort (`scheduling_policy`) -> pd_split (`pd_config`) -> route
(`routing_strategy`) -> metrics_sink. Each registered instance is an `openai` engine of that gateway, so a request
from `submit_request` and one from an HTTP client of `url` take the same path: admission, the policy queue, route
among the healthy instances of its model, failover and resume, metrics. PREFILLING and DECODING instances are the
two halves of PD across servers (vLLM's `kv_transfer_params`): a request pd_split sends to prefill runs its prompt
on the one and continues on the other; a DECODING server also runs the requests kept whole.
`model=` adds engines of our own for that model (the shipped colocated graph);
with PD separation on (the default, `pd_config.enabled`) they are the shipped prefill/decode graph, pd_split
deciding by `pd_config` (its threshold, and for "adaptive" its ratio) and each role on its own devices."""

from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import msgspec

from sagellm import graphs
from sagellm.common.errors import InvalidInput
from sagellm.control_plane import convert
from sagellm.control_plane.parallelism import ParallelismOptimizer
from sagellm.control_plane.policies import SchedulingPolicy, policy_name
from sagellm.control_plane.routing import LoadBalancer, PDRoutingStrategy, RequestRouter
from sagellm.control_plane.types import (
    ExecutionInstance,
    PDSeparationConfig,
    PerformanceMetrics,
    RequestMetadata,
    RequestResult,
    RequestStatus,
)
from sagellm.gateway.http.errors import ApiError
from sagellm.runtime.pipeline.messages import Request, TokenDelta

# The seed's constructor settings sageLLM does not take (its own health checks and restarts apply): each is accepted
# at the seed's default and refused otherwise, naming it.
SEED_DEFAULTS: dict[str, Any] = {
    "enable_auto_scaling": False,
    "autoscaler_config": None,
    "auto_restart": True,
    "max_restart_attempts": 3,
    "health_check_interval": 10.0,
    "health_check_timeout": 5.0,
    "restart_backoff_base": 1.0,
    "consecutive_failures_threshold": 2,
}
PROBE_TIMEOUT_S = 10.0  # start() and register_instance() wait this long for a server to answer its first probe


class ControlPlaneManager:
    def __init__(
        self,
        scheduling_policy: str | SchedulingPolicy = "adaptive",
        routing_strategy: str = "load_balanced",
        enable_auto_scaling: bool = False,
        enable_monitoring: bool = True,
        enable_pd_separation: bool = True,
        pd_config: PDSeparationConfig | None = None,
        autoscaler_config: Any = None,
        mode: str = "http",
        *,
        model: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        **seed_settings: Any,
    ) -> None:
        """The seed's settings (`scheduling_policy` one of sageLLM's five policies by name or by the seed's class,
        or a `SchedulingPolicy` of your own; `routing_strategy` a route strategy; `mode` "http": instances are
        servers reached over HTTP), and sageLLM's: `model` also serves that model on engines of our own;
        `enable_monitoring=False` leaves the metrics sink out; `host`/`port`: where the HTTP twin listens (0: any
        port). The seed's autoscaler and restart settings are taken at their defaults."""
        if mode != "http":
            raise InvalidInput(
                f'mode {mode!r}: instances are servers reached over HTTP ("http"); model=... runs one here'
            )
        seed_settings |= {"enable_auto_scaling": enable_auto_scaling, "autoscaler_config": autoscaler_config}
        for name, value in seed_settings.items():
            if name not in SEED_DEFAULTS:
                raise TypeError(f"ControlPlaneManager() got an unexpected keyword argument {name!r}")
            if value != SEED_DEFAULTS[name]:
                raise InvalidInput(
                    f"{name}={value!r}: not taken here (sageLLM's own health checks and restarts apply; autoscaling is "
                    f"`sagellm serve --autoscale`); leave it at {SEED_DEFAULTS[name]!r}"
                )
        policy_name(scheduling_policy)  # a bad one is refused now
        self.scheduling_policy = scheduling_policy
        self.enable_pd_separation, self.pd_config = enable_pd_separation, pd_config or PDSeparationConfig()
        # The seed's helpers, answering as the gateway's route and pd_split would (a bad strategy is refused now)
        self.router = RequestRouter(routing_strategy)
        self.load_balancer = LoadBalancer()
        self.pd_router = PDRoutingStrategy(self.pd_config) if enable_pd_separation else None
        self.parallelism_optimizer = ParallelismOptimizer()
        self.enable_monitoring, self.model, self.host, self.port = enable_monitoring, model, host, port
        self.sync = SyncControlPlane(self)
        self._instances: dict[str, ExecutionInstance] = {}  # registered, by id (before start: registered at start)
        self._gateway: Any = None
        self._texts: dict[str, str] = {}  # what the requests submitted here produced so far
        self._in_core: set[str] = set()  # of those, the ones the serving core has taken (it reports on them)
        self._refused: dict[str, dict[str, str]] = {}  # requests the gateway refused before queueing them
        self._state_dir: tempfile.TemporaryDirectory | None = None
        self._no_gpu = False  # NVML found none once: not asked again

    @property
    def routing_strategy(self) -> str:
        return self.router.routing_strategy

    @property
    def pd_on(self) -> bool:
        """PD separation runs: on, and engines of our own to split between (`model=`)."""
        return self.enable_pd_separation and self.pd_config.enabled and self.model is not None

    # -- lifecycle (async; `sync` has them without await) -----------------------------------------------------------
    async def start(self) -> None:
        """Starts the gateway (engines of our own load now) and registers the instances given so far; returns once
        each has answered a probe or been found unreachable."""
        await anyio.to_thread.run_sync(self.sync.start)

    async def stop(self) -> None:
        """Graceful: requests in flight finish, then the gateway and its engines stop."""
        await anyio.to_thread.run_sync(self.sync.stop)

    async def __aenter__(self) -> ControlPlaneManager:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def __enter__(self) -> ControlPlaneManager:
        self.sync.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.sync.stop()

    @property
    def url(self) -> str:
        """The HTTP twin: the OpenAI API, `/v1/requests/{id}`, the management API (admin key: `admin_key`)."""
        return self._running().url

    @property
    def admin_key(self) -> str:
        return self._running().gateway.admin_key

    # -- requests ---------------------------------------------------------------------------------------------------
    async def submit_request(self, request: RequestMetadata) -> str:
        """Queues the request; returns its id at once."""
        return await anyio.to_thread.run_sync(self.sync.submit_request, request)

    async def get_request_status(self, request_id: str) -> RequestStatus | None:
        """Where the request is (QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED); None for an id not known here."""
        return await anyio.to_thread.run_sync(self.sync.get_request_status, request_id)

    async def get_request_result(self, request_id: str) -> RequestResult | None:
        """Its status with its instance, text so far, finish reason or error, and retries."""
        return await anyio.to_thread.run_sync(self.sync.get_request_result, request_id)

    async def wait(self, request_id: str, timeout_s: float = 600.0) -> RequestResult:
        """The request's result once it has ended (completed, failed or cancelled), or as it is at `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = await self.get_request_result(request_id)
            if result is None:
                raise KeyError(request_id)
            if result.ended or time.monotonic() > deadline:
                return result
            await anyio.sleep(0.02)

    async def cancel_request(self, request_id: str) -> bool:
        """Cancels the request wherever it is; False when it is unknown or already ended."""
        return await anyio.to_thread.run_sync(self.sync.cancel_request, request_id)

    # -- instances --------------------------------------------------------------------------------------------------
    def register_instance(self, instance: ExecutionInstance) -> None:
        """Adds a server (its `model_name` asked of it when ""); before `start()` it is registered when the control
        plane starts, after it the call returns once the server has answered a probe or been found unreachable."""
        if instance.instance_id in self._instances:
            raise InvalidInput(f"an instance named {instance.instance_id!r} is registered")
        if not instance.model_name:
            instance.model_name = _served_model(instance)
        self._instances[instance.instance_id] = instance
        if self._gateway is not None:
            self._attach(instance)

    def _attach(self, instance: ExecutionInstance) -> None:
        from sagellm.gateway.control.engine_spec import STARTING, EngineSpec

        label = (
            f"tp{instance.tensor_parallel_size} pp{instance.pipeline_parallel_size} dp{instance.data_parallel_size} "
            f"ep{instance.expert_parallel_size} gpus{instance.gpu_count}"
        )
        common = dict(model=instance.model_name, max_concurrent=instance.max_concurrent_requests, label=label)
        engines = self._gateway.gateway.engines
        if instance.engine_kind is None:  # a server that runs already
            role = instance.pd_role
            spec = EngineSpec(kind="openai", url=instance.url, api_key=instance.api_key, role=role, **common)
            self._gateway.wait(engines.start, spec, instance.instance_id)
            self._gateway.wait(engines.health_check, instance.instance_id)  # its first probe: ready, or unreachable
            return
        gpus = instance.gpu_count > 0 and bool(self._gpus())
        spec = EngineSpec(
            kind=instance.engine_kind, tensor_parallel=instance.tensor_parallel_size, use_gpu=gpus,
            engine=engine_settings(instance), role=instance.pd_role if instance.engine_kind != "llm" else "colocated",
            **common,
        )  # fmt: skip
        self._gateway.wait(engines.start, spec, instance.instance_id)
        engine = self._gateway.call(engines.get, instance.instance_id)
        while self._gateway.call(lambda: engine.state) == STARTING:  # loading its model: minutes, for some
            time.sleep(0.2)
        address = urlsplit(engine.url)
        instance.host, instance.port = address.hostname or instance.host, address.port or instance.port

    def unregister_instance(self, instance_id: str, *, force: bool = False) -> None:
        """Drains the instance (its requests in flight finish; `force`: they move or fail now) and forgets it."""
        if self._gateway is not None:
            self._gateway.wait(functools.partial(self._gateway.gateway.engines.stop, instance_id, force=force))
        self._instances.pop(instance_id, None)

    def get_instances(self) -> list[ExecutionInstance]:
        """The registered instances, their live fields (health, running requests, load, and for an engine started
        here on GPUs their utilization) read now."""
        stats = self._gateway.call(self._gateway.core.registry.instances) if self._gateway is not None else {}
        allotted = self._gateway.call(self._allotted_gpus) if self._gateway is not None else {}
        gpus = self._gpus() if any(allotted.values()) else []
        instances = []
        for instance in self._instances.values():
            live = stats.get(instance.instance_id)
            if live is not None:
                instance.is_healthy = instance.is_available = live.healthy
                instance.active_requests = live.running
                instance.current_load = live.running / max(instance.max_concurrent_requests, 1)
            instance.gpu_utilization = gpu_utilization(gpus, allotted.get(instance.instance_id, []))
            instances.append(instance)
        return instances

    def _allotted_gpus(self) -> dict[str, list[int]]:
        """The GPUs the gateway gave each engine it started (none for a server registered by address)."""
        return {engine_id: engine.gpus for engine_id, engine in self._gateway.gateway.engines.engines.items()}

    async def health_check_all(self) -> dict[str, bool]:
        """Probes every registered instance now: its id -> whether it answered."""
        return await anyio.to_thread.run_sync(self.sync.health_check_all)

    def health_check(self, instance_id: str) -> dict[str, Any]:
        """Probes the instance now: {"id", "healthy", "state", "latency_ms"}."""
        self._running()
        return self._gateway.wait(self._gateway.gateway.engines.health_check, instance_id)

    # -- metrics and policy -----------------------------------------------------------------------------------------
    def get_metrics(self) -> PerformanceMetrics:
        """The pipeline's request counts, end-to-end latencies, rates and SLO compliance, GPU use (None without a
        GPU), and in `metadata` each instance's state, load and GPUs (those given to an engine started here, and
        their utilization) and the failover's retries."""
        gateway = self._running()

        from sagellm.gateway.serving.core import metrics_snapshot  # (with the gateway: not on `import sagellm`)

        def read() -> tuple[Any, dict[str, Any], int]:
            core = gateway.core
            instances = {
                name: {"model": s.model, "state": s.state, "running": s.running, "waiting": s.waiting}
                for name, s in core.registry.instances().items()
            }
            queued = sum(len(queue) for queue in core.nodes_of("policy_sort").values())
            extra = {"instances": instances, "retries": sum(core.retries.values()), "in_flight": core.in_flight}
            return metrics_snapshot(core), extra, queued

        snapshot, extra, queued = gateway.call(read)
        allotted = gateway.call(self._allotted_gpus)
        gpus = self._gpus() if any(allotted.values()) else []
        for name, instance in extra["instances"].items():
            instance["gpus"] = allotted.get(name, [])
            instance["gpu_utilization"] = gpu_utilization(gpus, instance["gpus"])
        metrics = PerformanceMetrics(queued_requests=queued, metadata=extra)
        if snapshot is not None:
            e2e = snapshot.e2e
            metrics.total_requests, metrics.completed_requests = snapshot.total, snapshot.completed
            metrics.failed_requests, metrics.active_requests = snapshot.failed, snapshot.active
            metrics.avg_latency_ms, metrics.p50_latency_ms = e2e.avg_ms, e2e.p50_ms
            metrics.p95_latency_ms, metrics.p99_latency_ms = e2e.p95_ms, e2e.p99_ms
            metrics.tokens_per_second, metrics.requests_per_second = (
                snapshot.output_tokens_per_s,
                snapshot.requests_per_s,
            )
            metrics.slo_violations = snapshot.slo_violations
            metrics.slo_compliance_rate = snapshot.slo_compliance if snapshot.slo_compliance is not None else 1.0
            metrics.avg_ttft_ms, metrics.avg_tpot_ms = snapshot.ttft.avg_ms, snapshot.tpot.avg_ms
            metrics.metadata["pipeline"] = msgspec.structs.asdict(snapshot)
        self._read_gpus(metrics)
        return metrics

    def _gpus(self) -> list[Any]:
        """The GPUs NVML sees (asked once more each time while there are some)."""
        if self._no_gpu:
            return []
        from sagellm.runtime.comm.topology import gpu_inventory

        gpus = gpu_inventory().gpus
        self._no_gpu = not gpus
        return gpus

    def _read_gpus(self, metrics: PerformanceMetrics) -> None:
        """GPU utilization and memory from NVML, averaged over the GPUs it sees; left None where there is none."""
        gpus = self._gpus()
        if not gpus:
            return
        utilizations = [g.utilization_percent for g in gpus if g.utilization_percent is not None]
        metrics.avg_gpu_utilization = sum(utilizations) / len(utilizations) if utilizations else None
        metrics.total_gpu_memory_gb = sum(g.memory_total_mib for g in gpus) / 1024
        metrics.used_gpu_memory_gb = sum(g.memory_used_mib for g in gpus) / 1024

    def get_status(self) -> dict[str, Any]:
        """The seed's summary: running, policy, strategy, requests pending and running, instances registered and
        available, and the metrics."""
        running = self._gateway is not None
        metrics = self.get_metrics() if running else PerformanceMetrics()
        instances = self.get_instances()
        policy = self.scheduling_policy
        return {
            "running": running,
            "scheduling_policy": policy if isinstance(policy, str) else policy.name,
            "routing_strategy": self.routing_strategy,
            "pending_requests": metrics.queued_requests,
            "running_requests": metrics.active_requests,
            "registered_instances": len(instances),
            "available_instances": sum(i.is_available and i.is_healthy for i in instances),
            "metrics": metrics,
        }

    def update_policy(self, policy: str | SchedulingPolicy) -> None:
        """Switches the scheduling policy now (a name or a policy object); what waits in the queue stays, in the
        new policy's order."""
        name = policy_name(policy)
        self.scheduling_policy = policy
        if self._gateway is not None:

            def switch() -> None:
                for queue in self._gateway.core.nodes_of("policy_sort").values():
                    queue.switch_policy(name, None)

            self._gateway.call(switch)

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
            graph = load_pipeline(graphs.find("pd" if self.pd_on else "colocated"))
            graph.attrs["model"] = self.model
        else:
            graph = load_pipeline(graphs.find("control_plane"))
        for node in graph.nodes.values():
            if node.op == "policy_sort":
                node.params["policy"] = policy_name(self.scheduling_policy)
            elif node.op == "route":
                node.params["strategy"] = self.routing_strategy
            elif node.op == "pd_split":
                node.params.update(self.pd_config.pd_split_params())
            elif node.op in ("prefill", "decode"):
                devices = getattr(self.pd_config, f"{node.op}_device_ids")
                if devices is not None:
                    node.params["device_ids"] = devices
        if not self.enable_pd_separation or not self.pd_config.enabled:
            for node_id in [n.id for n in graph.nodes.values() if n.op == "pd_split"]:
                _bypass(graph, node_id)
        if not self.enable_monitoring:
            for node_id in [n.id for n in graph.nodes.values() if n.op == "metrics_sink"]:
                graph.remove_node(node_id)
        return graph


def engine_settings(instance: ExecutionInstance) -> dict[str, Any]:
    """The settings an engine started for `instance` runs with, from its configs: a prefill instance's batch size and
    chunk are its `max_num_seqs` and `max_num_batched_tokens`, a decode instance's parallel requests its
    `max_num_seqs` and its prefix caching its own; only those its kind of engine has a setting for."""
    from sagellm.gateway.control import third_party
    from sagellm.runtime.engine.config import ENGINE_FIELDS

    wanted: dict[str, Any] = {}
    if instance.pipeline_parallel_size > 1:
        wanted["pipeline_parallel_size"] = instance.pipeline_parallel_size
    if (prefill := instance.prefilling_config) is not None:
        wanted |= {"max_num_seqs": prefill.target_batch_size, "max_num_batched_tokens": prefill.max_chunk_size_tokens}
    if (decode := instance.decoding_config) is not None:
        wanted |= {"max_num_seqs": decode.max_parallel_requests, "enable_prefix_caching": decode.enable_prefix_caching}
    known = ENGINE_FIELDS if instance.engine_kind == "llm" else third_party.KINDS[instance.engine_kind].settings
    return {name: value for name, value in wanted.items() if name in known}


def gpu_utilization(gpus: list[Any], allotted: list[int]) -> float | None:
    """The mean utilization (%) NVML reports for the GPUs an engine was given; None when it was given none, or NVML
    reports none of them."""
    values = [g.utilization_percent for g in gpus if g.index in allotted and g.utilization_percent is not None]
    return sum(values) / len(values) if values else None


def _bypass(graph: Any, node_id: str) -> None:
    """Takes a one-input node out of the graph, its readers reading its input instead."""
    from sagellm.runtime.execution_graph.graph import Value

    into = next(e for e in graph.edges if e.dst == node_id)
    graph.redirect(Value(node_id, 0), Value(into.src, into.src_port))
    graph.remove_node(node_id)


def _served_model(instance: ExecutionInstance) -> str:
    """The model a server lists first (`GET /v1/models`): an instance registered without its model's name."""
    headers = {"authorization": f"Bearer {instance.api_key}"} if instance.api_key else {}
    try:
        reply = httpx.get(f"{instance.url}/v1/models", headers=headers, timeout=PROBE_TIMEOUT_S)
        reply.raise_for_status()
        return reply.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as error:
        raise InvalidInput(
            f"{instance.instance_id}: model_name is empty and {instance.url}/v1/models did not name one ({error}); "
            "give model_name"
        ) from None


class SyncControlPlane:
    """`ControlPlaneManager`'s calls without `await` (`manager.sync`), for scripts and threads."""

    def __init__(self, manager: ControlPlaneManager) -> None:
        self._m = manager

    def start(self) -> None:
        from sagellm.gateway.config import GatewayConfig
        from sagellm.gateway.server import GatewayThread

        m = self._m
        if m._gateway is not None:
            raise RuntimeError("the control plane is already running")
        m._state_dir = tempfile.TemporaryDirectory(prefix="sagellm-control-plane-")
        config = GatewayConfig(host=m.host, port=m.port, state_dir=Path(m._state_dir.name))
        m._gateway = GatewayThread(m._graph(), config, name="sagellm-control-plane")
        for instance in m._instances.values():
            m._attach(instance)

    def stop(self) -> None:
        m = self._m
        if m._gateway is not None:
            m._gateway.stop()
            m._gateway = None
        if m._state_dir is not None:
            m._state_dir.cleanup()
            m._state_dir = None

    def submit_request(self, request: RequestMetadata) -> str:
        m = self._m
        core = m._running().core
        if request.request_id in m._texts:
            raise InvalidInput(f"request id {request.request_id!r} is in use")
        model = m._gateway.call(core.instance_model, request.model_name or m._only_model())
        pipeline_request = convert.pipeline_request(request, model=model)
        m._texts[request.request_id] = ""
        m._gateway.start_soon(self._follow, pipeline_request)
        return request.request_id

    async def _follow(self, request: Request) -> None:
        m = self._m
        core = m._gateway.core
        try:
            await core.tokenize_prompts([request])
            stream = core.submit(request)
            m._in_core.add(request.request_id)
        except (ApiError, ValueError) as error:  # refused before it was queued: its status says why
            m._refused[request.request_id] = {"code": getattr(error, "code", "invalid_request"), "message": str(error)}
            return
        async for item in stream:
            if isinstance(item, TokenDelta):
                m._texts[request.request_id] += item.text

    def get_request_status(self, request_id: str) -> RequestStatus | None:
        result = self.get_request_result(request_id)
        return result.status if result is not None else None

    def get_request_result(self, request_id: str) -> RequestResult | None:
        m = self._m
        status = m._running().call(m._gateway.core.request_status, request_id, "")  # submitted without a key
        if status is None:
            refused = m._refused.get(request_id)
            if refused is not None:
                return RequestResult(request_id, RequestStatus.FAILED, None, error=refused)
            # submitted, and not yet in the core (its prompt is being tokenized): queued, not unknown
            waiting = request_id in m._texts and request_id not in m._in_core
            return RequestResult(request_id, RequestStatus.QUEUED, None) if waiting else None
        return RequestResult(
            request_id=request_id,
            status=RequestStatus(status["status"]),
            instance_id=status["instance"],
            text=m._texts.get(request_id, ""),
            finish_reason=status["finish_reason"],
            error=status["error"],
            retries=status["retries"],
        )

    def wait(self, request_id: str, timeout_s: float = 600.0) -> RequestResult:
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.get_request_result(request_id)
            if result is None:
                raise KeyError(request_id)
            if result.ended or time.monotonic() > deadline:
                return result
            time.sleep(0.02)

    def cancel_request(self, request_id: str) -> bool:
        result = self.get_request_result(request_id)
        if result is None or result.ended:
            return False
        self._m._gateway.call(self._m._gateway.core.cancel, request_id)
        return True

    def health_check_all(self) -> dict[str, bool]:
        m = self._m
        m._running()
        return {instance_id: m.health_check(instance_id)["healthy"] for instance_id in list(m._instances)}
