"""Health, Prometheus metrics, and the admin routes that steer a running gateway.

`/health` (liveness) and `/ready` (readiness) say whether the graph can serve: "ok" when every engine is healthy,
"degraded" when some are not but a healthy engine can still run a request from its prompt to its last token (a lost
prefill worker: pd_split keeps requests colocated on the decode worker), "unavailable" when none can, with each
engine's state (ready, recovering: its worker is being restarted, lost: given up) in the body, so load balancers,
Kubernetes probes and `sagellm gateway status` can tell. `/ready` answers 503 whenever the graph is unavailable: send
no traffic. `/health` answers 503 only when it is unavailable and nothing is being restarted: a gateway waiting for its
workers to come back is alive, and restarting it would only lose that.
`/metrics` is the metrics sink's registry (TTFT, TPOT, e2e histograms, request counts) plus live gauges read
from the engines' stats at scrape time (running and waiting requests, KV cache usage, prefix cache hits), named as
vLLM names them with a `sagellm:` prefix, and the failover's retries. `/admin/set_policy` switches the scheduling
policy of the graph's queues while serving; `/admin/metrics` is the metrics snapshot as JSON."""

from __future__ import annotations

from typing import Any

import msgspec
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sagellm.gateway.http.app import App, Guard, HttpRequest, Response
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.core import ServingCore, metrics_snapshot
from sagellm.operators.route import ROLES_FOR_PHASE
from sagellm.runtime.pipeline.operator import InstanceStats, OperatorError

log = structlog.get_logger("sagellm.gateway")

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


# The engines' stats a scrape reads (InstanceStats fields), a family each, labelled by engine and named as vLLM names
# them after "sagellm:".
ENGINE_GAUGES = {  # field: (its name, help)
    "scheduled": ("num_requests_running", "Requests the engine is computing (not waiting)."),
    "waiting": ("num_requests_waiting", "Requests waiting in the engine."),
    "kv_cache_usage": ("kv_cache_usage_perc", "KV cache blocks in use (0-1)."),
    "threads": ("engine_threads", "Threads the engine computes with now: fewer while others use its cores."),
    "kv_offload_ram_bytes": ("kv_offload_ram_bytes", "KV blocks in the RAM tier under the prefix cache, bytes."),
    "kv_offload_disk_bytes": ("kv_offload_disk_bytes", "KV blocks in the disk tier under the prefix cache, bytes."),
}
ENGINE_COUNTERS = {  # field, also its name: help
    "prefix_cache_queries": "Prompt blocks looked up in the prefix cache.",
    "prefix_cache_hits": "Prompt blocks found in the prefix cache.",
    "spec_decode_num_drafts": "Speculative decoding: proposals verified.",
    "spec_decode_num_draft_tokens": "Speculative decoding: tokens proposed.",
    "spec_decode_num_accepted_tokens": "Speculative decoding: proposed tokens accepted.",
    "kv_offload_stored_blocks": "KV blocks (and recurrent checkpoints) put in the tiers under the prefix cache.",
    "kv_offload_loaded_blocks": "KV blocks (and recurrent checkpoints) loaded back from those tiers.",
}


class SetPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    policy: str
    policy_args: dict[str, float] | None = None


class EngineGauges:
    """A Prometheus collector over the engines' live stats (read at each scrape, so never stale)."""

    def __init__(self, core: ServingCore) -> None:
        self.core = core

    def collect(self) -> Any:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            field: GaugeMetricFamily(f"sagellm:{name}", text, labels=["engine"])
            for field, (name, text) in ENGINE_GAUGES.items()
        }
        for field, text in ENGINE_COUNTERS.items():
            families[field] = CounterMetricFamily(f"sagellm:{field}", text, labels=["engine"])
        acceptance = GaugeMetricFamily(
            "sagellm:spec_decode_acceptance_rate",
            "Speculative decoding: accepted / proposed tokens since start (engines that have proposed).",
            labels=["engine"],
        )
        for name, stats in self.core.registry.instances().items():
            for field, family in families.items():
                family.add_metric([name], getattr(stats, field))
            if stats.spec_decode_num_draft_tokens:
                acceptance.add_metric(
                    [name], stats.spec_decode_num_accepted_tokens / stats.spec_decode_num_draft_tokens
                )
        healthy = GaugeMetricFamily(
            "sagellm:engine_healthy", "1 when the engine is healthy.", labels=["engine", "role"]
        )
        for name, stats in self.core.registry.instances().items():
            healthy.add_metric([name, stats.role], float(stats.healthy))
        retries = CounterMetricFamily(
            "sagellm:request_retries",
            "Attempts started again after a failure (failover), by its code and whether tokens had been streamed.",
            labels=["code", "resumed"],
        )
        for (code, resumed), count in self.core.retries.items():
            retries.add_metric([code, str(resumed).lower()], count)
        yield from families.values()
        yield acceptance
        yield healthy
        yield retries
        yield GaugeMetricFamily(
            "sagellm:gateway_requests_in_flight", "Requests the gateway is answering.", value=self.core.in_flight
        )
        bound = GaugeMetricFamily(
            "sagellm:admission_bound",
            "Requests admission lets be in flight now (below its max_queue while it keeps a TTFT SLO).",
            labels=["node"],
        )
        for node_id, admission in self.core.nodes_of("admission").items():
            bound.add_metric([node_id], admission.bound())
        yield bound


def service_status(instances: list[InstanceStats]) -> str:
    """ok | degraded | unavailable: can some healthy engine run a request whole (a colocated request's roles, or an
    embedding)?"""
    whole = [s for s in instances if s.healthy and s.role in ROLES_FOR_PHASE["colocated"] | ROLES_FOR_PHASE["embed"]]
    if not whole:
        return "unavailable"
    return "ok" if all(s.healthy for s in instances) else "degraded"


class AdminRoutes:
    def __init__(self, core: ServingCore, collectors: tuple[Any, ...] = ()) -> None:
        """`collectors`: more Prometheus collectors /metrics shows (the autoscaler's)."""
        self.core = core
        self.engine_registry = CollectorRegistry()
        for collector in (EngineGauges(core), *collectors):
            self.engine_registry.register(collector)

    def register(self, app: App, admin: Guard | None) -> None:
        app.route("GET", "/health", self.health)
        app.route("GET", "/ready", self.ready)
        app.route("GET", "/metrics", self.metrics)
        app.route("POST", "/admin/set_policy", self.set_policy, admin)
        app.route("GET", "/admin/metrics", self.admin_metrics, admin)

    async def health(self, _: HttpRequest) -> Response:
        body = self._status()
        on_its_way = any(engine["state"] in ("starting", "recovering") for engine in body["engines"])
        return Response(body, 503 if body["status"] == "unavailable" and not on_its_way else 200)

    async def ready(self, _: HttpRequest) -> Response:
        body = self._status()
        return Response(body, 503 if body["status"] == "unavailable" else 200)

    def _status(self) -> dict[str, Any]:
        instances = list(self.core.registry.instances().values())
        status = service_status(instances)
        if status == "unavailable" and self.core.readiness.models_on_demand is not None:
            status = "ok"  # no model loaded, and a request loads the one it names
        return {
            "status": status,
            "model": self.core.model_name,
            "engines": [
                {"name": s.name, "role": s.role, "state": s.state, "healthy": s.healthy, "running": s.running}
                for s in instances
            ],
            "in_flight": self.core.in_flight,
            "boot_id": self.core.boot_id,
        }

    async def metrics(self, _: HttpRequest) -> Response:
        text = generate_latest(self.engine_registry)
        for sink in self.core.nodes_of("metrics_sink").values():
            text += generate_latest(sink.prometheus.registry)
        return Response(text, content_type=PROMETHEUS_TEXT)

    async def set_policy(self, http: HttpRequest) -> Response:
        body = http.json(SetPolicy)
        queues = self.core.nodes_of("policy_sort")
        if not queues:
            raise ApiError(400, "the served graph has no policy_sort node", param="policy")
        try:
            for queue in queues.values():  # what waits in each queue stays, in the new order
                queue.switch_policy(body.policy, body.policy_args)
        except (OperatorError, ValueError) as exc:
            raise ApiError(400, str(exc), param="policy") from None
        log.info("policy_set", policy=body.policy, nodes=list(queues))
        return Response({"policy": body.policy, "nodes": list(queues)})

    async def admin_metrics(self, _: HttpRequest) -> Response:
        snapshot = metrics_snapshot(self.core)
        if snapshot is None:
            raise ApiError(404, "the served graph has no metrics_sink node")
        return Response(msgspec.to_builtins(snapshot))
