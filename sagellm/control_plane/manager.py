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
from pathlib import Path
from typing import Any

import anyio
import msgspec
import trio

from sagellm.common.errors import InvalidInput
from sagellm.control_plane import convert
from sagellm.control_plane.gpus import GpuReader, allotted_gpus, gpu_utilization
from sagellm.control_plane.graph import control_plane_graph
from sagellm.control_plane.instances import attach_instance, served_model
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
        self._ended: dict[str, trio.Event] = {}  # of those, set as each ends (its stream's end, or a refusal)
        self._refused: dict[str, dict[str, str]] = {}  # requests the gateway refused before queueing them
        self._state_dir: tempfile.TemporaryDirectory | None = None
        self._gpu_reader = GpuReader()

    @property
    def routing_strategy(self) -> str:
        return self.router.routing_strategy

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
        """The result of a request submitted here once it has ended (completed, failed or cancelled), or as it is at
        `timeout_s`; woken by its end, not polled. A caller cancelled leaves the thread it waits in waiting, idle,
        until then."""
        return await anyio.to_thread.run_sync(self.sync.wait, request_id, timeout_s, abandon_on_cancel=True)

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
            instance.model_name = served_model(instance)
        self._instances[instance.instance_id] = instance
        if self._gateway is not None:
            attach_instance(self._gateway, instance, self._gpu_reader)

    def unregister_instance(self, instance_id: str, *, force: bool = False) -> None:
        """Drains the instance (its requests in flight finish; `force`: they move or fail now) and forgets it."""
        if self._gateway is not None:
            self._gateway.wait(functools.partial(self._gateway.gateway.engines.stop, instance_id, force=force))
        self._instances.pop(instance_id, None)

    def get_instances(self) -> list[ExecutionInstance]:
        """The registered instances, their live fields (health, running requests, load, and for an engine started
        here on GPUs their utilization) read now."""
        stats = self._gateway.call(self._gateway.core.registry.instances) if self._gateway is not None else {}
        allotted = self._gateway.call(allotted_gpus, self._gateway) if self._gateway is not None else {}
        gpus = self._gpu_reader.gpus() if any(allotted.values()) else []
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
        allotted = gateway.call(allotted_gpus, gateway)
        gpus = self._gpu_reader.gpus() if any(allotted.values()) else []
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
        self._gpu_reader.read_into(metrics)
        return metrics

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
        graph = control_plane_graph(
            m.model,
            m.scheduling_policy,
            m.routing_strategy,
            m.pd_config,
            pd_separation=m.enable_pd_separation,
            monitoring=m.enable_monitoring,
        )
        m._gateway = GatewayThread(graph, config, name="sagellm-control-plane")
        for instance in m._instances.values():
            attach_instance(m._gateway, instance, m._gpu_reader)

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
        model = m._gateway.call(core.instance_model, request.model_name or self._only_model())
        pipeline_request = convert.pipeline_request(request, model=model)
        m._texts[request.request_id], m._ended[request.request_id] = "", trio.Event()
        m._gateway.start_soon(self._follow, pipeline_request)
        return request.request_id

    def _only_model(self) -> str | None:
        """The model a request without one asks for: our own, else the one model the instances serve."""
        if self._m.model is not None:
            return None
        served = self._m._gateway.call(self._m._gateway.core.models)  # no engine of our own: all are instances
        if len(served) == 1:
            return served[0]
        raise InvalidInput(f"model_name: this control plane serves {served}; say which")

    async def _follow(self, request: Request) -> None:
        """Runs a request submitted here (`_run`); its end, however it comes, wakes whoever `wait`s for it."""
        try:
            await self._run(request)
        finally:
            self._m._ended[request.request_id].set()

    async def _run(self, request: Request) -> None:
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
        # read on the gateway's thread, where `_follow` moves the request into the core: read from here, a request
        # could be unknown to the core at the first look and in `_in_core` at the second, and be called unknown
        return self._m._running().call(self._result, request_id)

    def _result(self, request_id: str) -> RequestResult | None:
        m = self._m
        status = m._gateway.core.request_status(request_id, "")  # submitted without a key
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
        ended = self._m._ended.get(request_id)
        if ended is None:
            raise KeyError(request_id)
        self._m._running().wait(_until_set, ended, timeout_s)
        result = self.get_request_result(request_id)
        assert result is not None  # submitted here: known for good
        return result

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


async def _until_set(event: trio.Event, timeout_s: float) -> None:
    with trio.move_on_after(timeout_s):
        await event.wait()
