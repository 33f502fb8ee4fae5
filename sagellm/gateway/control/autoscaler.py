"""The gateway's autoscalers: replicas of a model's engine, added and removed as the load asks (`autoscale:` in the
graph file, or `sagellm serve --autoscale MIN:MAX`), one autoscaler for the graph's own model and, with `--autoscale`,
one for each model loaded on demand while it is loaded (`control.model_pool`).

Every `interval_s` it reads the instances serving its model (the graph's engines, or the model's loaded engine, and
the replicas it added), the requests of that model the gateway holds beyond what those instances run, and (for the
graph's model) the SLO outcomes since its last reading, and applies `common.autoscale`'s decision. Up starts one more
engine process of the same model with the same engine settings, through the engine manager (on a Ray node when the
graph has a `cluster:`, placed by its `replicas` group's resources): an `llm` engine served under the model's name, so
it is a replica (admission tokenizes for it, route picks it beside the others, failover moves requests between
them). Down drains the least-loaded replica it added (route sends it nothing new, what runs there finishes: no
request is lost) and then stops it; the instances it did not add are never removed. A replica that fails to start is
forgotten, and the next decision may try again after the cool-down. Each decision that changes something is logged
(`autoscale`) and counted (`sagellm:autoscaler_decisions_total{direction,model}`); `sagellm:autoscaler_replicas
{model,state}` shows what each runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
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
UNSAID_SLOTS = 16  # the requests a server runs at once when neither it nor its spec says (the presets' max_concurrent)


class Autoscaler:
    def __init__(
        self,
        core: ServingCore,
        engines: EngineManager,
        settings: AutoscaleSettings,
        *,
        model: str | None = None,
        template: EngineSpec | None = None,
        hold: Callable[[], bool] = lambda: False,
    ) -> None:
        """`model`: the `Request.model` it scales (None: the graph's own, its replica copied from the graph once it
        runs); `template`: what a replica of another model is; `hold()`: true while nothing may change (its model
        drains)."""
        self.core, self.engines = core, engines
        self.policy = Autoscale(settings)
        self.model, self.template, self.hold = model, template, hold
        self.replicas: list[str] = []  # the engine ids it started, oldest first
        self.decisions: Counter[str] = Counter()  # "up" / "down" -> how many
        self._running, self._closing, self._ended = False, trio.Event(), trio.Event()
        self._slo_seen = (0, 0)  # (checked, violations) at the last reading

    @property
    def settings(self) -> AutoscaleSettings:
        return self.policy.settings

    async def run(self) -> None:
        """Reads and decides every `interval_s` until cancelled (the gateway stops its replicas with the manager) or
        closed. Raises ValueError for a graph it cannot copy an engine of."""
        self._running = True
        try:
            if self.template is None:
                self.template = replica_spec(self.core, on_ray=self.engines.ray is not None)
            log.info("autoscaler_started", model=self.name, settings=vars(self.settings),
                     replica=self.template.engine)  # fmt: skip
            async with trio.open_nursery() as nursery:  # (closed, it waits for the drains under way)
                while not self._closing.is_set():
                    decision = self.policy.decide(self.signals(), trio.current_time())
                    if decision.delta and not self.hold():
                        await self._apply(decision, nursery)
                    with trio.move_on_after(self.settings.interval_s):
                        await self._closing.wait()
        finally:
            self._ended.set()

    async def close(self) -> None:
        """Makes no more decisions, and returns once the drains under way have finished (`run` returns)."""
        self._closing.set()
        if self._running:
            await self._ended.wait()

    @property
    def name(self) -> str:
        """The name its model is served as."""
        return self.model if self.model is not None else self.core.model_name

    async def stop_replicas(self) -> None:
        """Stops every replica it added, each drained first (its model is being unloaded; it is closed)."""
        for engine_id in list(self.replicas):
            await self._drain(engine_id)

    def signals(self) -> Signals:
        """Its model's instances; as waiting, the requests of the model the gateway holds and they do not run (in
        the policy queues, on their way to an engine, or in an engine's own queue)."""
        self._forget_gone()
        managed = self.engines.engines
        starting_ids = {i for i in self.replicas if managed[i].state == STARTING}
        instances = self.core.registry.instances().values()
        own = [s for s in instances if s.model == self.model and s.role == "colocated"]
        ready = [s for s in own if s.healthy]
        starting = [s for s in own if s.on_its_way or (not s.healthy and s.name in starting_ids)]
        running = sum(s.running for s in ready)
        waiting = max(self.core.readiness.requests_of(self.model) - running, sum(s.waiting for s in ready))
        # The SLO outcomes are the whole gateway's: they speak for the graph's model, which most requests name.
        load = self.core.local.load if self.core.local is not None and self.model is None else None
        checked, violations = (load.slo_checked, load.slo_violations) if load is not None else (0, 0)
        new_checked, new_violations = checked - self._slo_seen[0], violations - self._slo_seen[1]
        self._slo_seen = (checked, violations)
        assert self.template is not None
        # a server's slots its own stats do not say (a joined one, another project's) count as a replica's
        seqs = self.template.slots or UNSAID_SLOTS
        return Signals(
            ready=len(ready),
            starting=len(starting),
            removable=sum(1 for i in self.replicas if managed[i].state == READY),
            waiting=waiting,
            running=running,
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
                log.warning("autoscale_failed", model=self.name, direction=direction, reason=decision.reason,
                            error=error.message)  # fmt: skip
                return
            self.replicas.append(engine.id)
            target = engine.id
        else:
            target = self._least_loaded()
            nursery.start_soon(self._drain, target)
        self.decisions[direction] += 1
        log.info("autoscale", model=self.name, direction=direction, engine=target, reason=decision.reason)

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


class Autoscalers:
    """Every autoscaler a gateway runs, its metrics labelled by the model each scales (a collector, read at each
    scrape)."""

    def __init__(self) -> None:
        self.running: list[Autoscaler] = []

    def collect(self) -> Iterator[Any]:
        """Decisions by model and direction, replicas by model and state."""
        about = "Replicas the autoscaler added (up) or drained (down)."
        decisions = CounterMetricFamily("sagellm:autoscaler_decisions", about, labels=["model", "direction"])
        replicas = GaugeMetricFamily("sagellm:autoscaler_replicas", "Its replicas by state.", labels=["model", "state"])
        for scaler in self.running:
            for direction in ("up", "down"):
                decisions.add_metric([scaler.name, direction], scaler.decisions[direction])
            managed = scaler.engines.engines
            states = Counter(managed[i].state for i in scaler.replicas if i in managed)
            for state in (STARTING, READY, DRAINING):
                replicas.add_metric([scaler.name, state], states[state])
        yield from (decisions, replicas)


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
