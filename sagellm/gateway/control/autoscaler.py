"""The gateway's autoscaler: replicas of the graph's engine, added and removed as the load asks (`autoscale:` in the
graph file, or `sagellm serve --autoscale MIN:MAX`).

Every `interval_s` it reads the instances serving the graph's own model (the graph's engines and the replicas it
added), the policy queues, and the SLO outcomes since its last reading, and applies `common.autoscale`'s decision. Up
starts one more engine process of the same model with the graph's engine settings, through the engine manager (on
a Ray node when the graph has a `cluster:`, placed by its `replicas` group's resources): an
`llm` engine served under the gateway's model name, so it is a replica (admission tokenizes for it, route picks it
beside the graph's engines, failover moves requests between them). Down drains the least-loaded replica it added
(route sends it nothing new, what runs there finishes: no request is lost) and then stops it; the graph's own engines
are never removed. A replica that fails to start is forgotten, and the next decision may try again after the
cool-down. Each decision that changes something is logged (`autoscale`) and counted
(`sagellm:autoscaler_decisions_total{direction}`); `sagellm:autoscaler_replicas{state}` shows what it runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import structlog
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sagellm.common.autoscale import Autoscale, AutoscaleSettings, Decision, Signals
from sagellm.common.errors import InvalidInput
from sagellm.gateway.control.engine_spec import DRAINING, FAILED, READY, STARTING, STOPPED, EngineSpec
from sagellm.gateway.http.errors import ApiError
from sagellm.operators.remote_engine import UNLIMITED
from sagellm.runtime.engine.config import ENGINE_FIELDS

if TYPE_CHECKING:
    from sagellm.gateway.control.engines import EngineManager
    from sagellm.gateway.serving.core import ServingCore

log = structlog.get_logger("sagellm.gateway")
SHORT_NAMES = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size"}
REPLICA_GROUP = "replicas"  # the `cluster.groups` entry that places replicas on a Ray cluster


class Autoscaler:
    def __init__(self, core: ServingCore, engines: EngineManager, settings: AutoscaleSettings) -> None:
        self.core, self.engines = core, engines
        self.policy = Autoscale(settings)
        self.template: EngineSpec | None = None  # what a replica is, known once the graph runs
        self.replicas: list[str] = []  # the engine ids it started, oldest first
        self.decisions: Counter[str] = Counter()  # "up" / "down" -> how many
        self._slo_seen = (0, 0)  # (checked, violations) at the last reading

    @property
    def settings(self) -> AutoscaleSettings:
        return self.policy.settings

    async def run(self) -> None:
        """Reads and decides every `interval_s` until cancelled (the gateway stops its replicas with the manager).
        Raises ValueError for a graph it cannot copy an engine of."""
        self.template = replica_spec(self.core, on_ray=self.engines.ray is not None)
        log.info("autoscaler_started", settings=vars(self.settings), replica=self.template.engine)
        async with trio.open_nursery() as nursery:
            while True:
                decision = self.policy.decide(self.signals(), trio.current_time())
                if decision.delta:
                    await self._apply(decision, nursery)
                await trio.sleep(self.settings.interval_s)

    def signals(self) -> Signals:
        self._forget_gone()
        managed = self.engines.engines
        starting_ids = {i for i in self.replicas if managed[i].state == STARTING}
        own = [s for s in self.core.registry.instances().values() if s.model is None and s.role == "colocated"]
        ready = [s for s in own if s.healthy]
        starting = [s for s in own if s.on_its_way or (not s.healthy and s.name in starting_ids)]
        waiting = sum(len(queue) for queue in self.core.nodes_of("policy_sort").values())
        load = self.core.local.load if self.core.local is not None else None
        checked, violations = (load.slo_checked, load.slo_violations) if load is not None else (0, 0)
        new_checked, new_violations = checked - self._slo_seen[0], violations - self._slo_seen[1]
        self._slo_seen = (checked, violations)
        assert self.template is not None and self.template.slots is not None
        seqs = self.template.slots  # a joined server's slots, which its own stats do not say, count as a replica's
        return Signals(
            ready=len(ready),
            starting=len(starting),
            removable=sum(1 for i in self.replicas if managed[i].state == READY),
            waiting=waiting + sum(s.waiting for s in ready),
            running=sum(s.running for s in ready),
            slots=sum(s.max_running if s.max_running < UNLIMITED else seqs for s in ready),
            slo_violation_rate=new_violations / new_checked if new_checked else 0.0,
        )

    async def _apply(self, decision: Decision, nursery: trio.Nursery) -> None:
        direction = "up" if decision.delta > 0 else "down"
        if decision.delta > 0:
            assert self.template is not None
            try:
                engine = await self.engines.start(self.template)
            except ApiError as error:
                log.warning("autoscale_failed", direction=direction, reason=decision.reason, error=error.message)
                return
            self.replicas.append(engine.id)
            target = engine.id
        else:
            target = self._least_loaded()
            nursery.start_soon(self._drain, target)
        self.decisions[direction] += 1
        log.info("autoscale", direction=direction, engine=target, reason=decision.reason)

    def _least_loaded(self) -> str:
        ready = [i for i in self.replicas if self.engines.engines[i].state == READY]
        return min(reversed(ready), key=lambda i: self.engines.engines[i].in_flight)  # ties: the newest

    async def _drain(self, engine_id: str) -> None:
        try:
            await self.engines.stop(engine_id)
        except ApiError as error:  # stopped meanwhile by hand
            log.info("autoscale_drain_skipped", engine=engine_id, error=error.message)
        if engine_id in self.replicas:
            self.replicas.remove(engine_id)

    def _forget_gone(self) -> None:
        """Replicas stopped by hand, or given up on (a start that failed for good), are not the autoscaler's."""
        managed = self.engines.engines
        for engine_id in list(self.replicas):
            engine = managed.get(engine_id)
            if engine is None or engine.state in (FAILED, STOPPED):
                self.replicas.remove(engine_id)

    def collect(self) -> Iterator[Any]:
        """Its Prometheus families (a collector, read at each scrape)."""
        about = "Replicas the autoscaler added (up) or drained (down)."
        decisions = CounterMetricFamily("sagellm:autoscaler_decisions", about, labels=["direction"])
        for direction in ("up", "down"):
            decisions.add_metric([direction], self.decisions[direction])
        yield decisions
        replicas = GaugeMetricFamily("sagellm:autoscaler_replicas", "Its replicas by state.", labels=["state"])
        states = Counter(self.engines.engines[i].state for i in self.replicas if i in self.engines.engines)
        for state in (STARTING, READY, DRAINING):
            replicas.add_metric([state], states[state])
        yield replicas


def replica_spec(core: ServingCore, *, on_ray: bool = False) -> EngineSpec:
    """One more engine like the graph's: its model, served under the gateway's model name (a replica), with the
    settings of the graph's first engine node; `on_ray`: placed on the gateway's Ray cluster as its `replicas` group
    says. Raises InvalidInput for a graph it cannot copy."""
    model = core.served.path if core.served is not None else None
    nodes = [n for n in core.graph.nodes.values() if n.op == "engine"]
    if model is None or not nodes:
        raise InvalidInput("autoscale needs a graph with an engine node and a model: it adds replicas of that engine")
    if any(stats.role != "colocated" for stats in core.registry.instances().values() if stats.model is None):
        raise InvalidInput("autoscale adds colocated replicas; this graph splits prefill and decode")
    params = {SHORT_NAMES.get(k, k): v for k, v in nodes[0].params.items()}
    tensor_parallel = int(params.pop("tensor_parallel_size", 1) or 1)
    engine = {k: v for k, v in params.items() if k in ENGINE_FIELDS and k != "model"}
    return EngineSpec(model=str(model), served_model_name=core.model_name, tensor_parallel=tensor_parallel,
                      engine=engine, label="autoscaled",
                      placement=f"ray:{REPLICA_GROUP}" if on_ray else None)  # fmt: skip
