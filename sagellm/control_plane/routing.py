"""The seed API's routing extension points, answered by the gateway's own operators: `RequestRouter` asks the real
`route` operator (its candidate rules, then our routing strategy by name), `LoadBalancer` asks it for the seed's
balancing algorithms, `PDRoutingStrategy` asks the real `pd_split` operator whether a request is split. The seed's
`RequestMetadata` and `ExecutionInstance` are converted (`convert.py`), so each answer is the one the gateway gives
the same request over the same instances.

What differs from the seed, because the gateway does it so:
- Candidates are the healthy, available instances of the request's model (when it names one) whose role runs the
  phase: a whole request (`route`, or phase DECODING / HYBRID) runs on a GENERAL, HYBRID or DECODING instance, a
  PREFILLING phase only on a PREFILLING one, and only with a healthy DECODING one to continue on. A full instance
  stays a candidate (load_balanced takes it last; a request sent there waits for room); None only when no instance
  qualifies.
- Strategy names are the gateway's (`load_balanced`, `round_robin`, `random`, `affinity`, `locality`,
  `cache_aware`); another name is refused, as the manager refuses it. Without a tokenizer here, `locality` and
  `cache_aware` see no prompt tokens and fall back as they do for an untokenized request.
- The PD decision is pd_split's for a request to servers registered by address: their tokenizer is not at hand,
  so it estimates a prompt as the seed does, 4 characters a token (of the prompt, or a chat's text). A prompt of at
  least `prefilling_threshold_input_tokens` tokens, or under "adaptive" one of more than `prefilling_threshold_ratio`
  times its expected output, is split (PREFILLING); every other is run whole (DECODING); priority and deadline do
  not enter. PD disabled: HYBRID. (For the engines of `model=`, the gateway counts real, uncached tokens.)"""

from __future__ import annotations

from sagellm.control_plane.convert import SERVERS_NODE, instance_stats, pipeline_request
from sagellm.control_plane.policies import SchedulingDecision
from sagellm.control_plane.types import (
    ExecutionInstance,
    ExecutionInstanceType,
    PDSeparationConfig,
    RequestMetadata,
    _enum_member,
)
from sagellm.operators.pd_split import PDSplit
from sagellm.operators.route import ROLES_FOR_PHASE, Route
from sagellm.runtime.pipeline.messages import Phase
from sagellm.runtime.pipeline.operator import Emit, InstanceStats, OperatorContext

SERVERS_MODEL = "servers' model"  # stands for the model of a request naming none, in the PD question
# The seed's LoadBalancer algorithms: each sends work where there is the most room, which is the gateway's
# load_balanced strategy (a free slot first, then the least queued work, then the fewest running).
SEED_ALGORITHMS = {
    "weighted_round_robin": "load_balanced",
    "least_connections": "load_balanced",
    "least_response_time": "load_balanced",
    "power_of_two": "load_balanced",
}


def route_phase(phase: ExecutionInstanceType | str | None) -> Phase:
    """The pipeline phase of a seed phase: PREFILLING is the prefill of a split request; any other (or none) runs
    the request whole ("colocated")."""
    if phase is None:
        return "colocated"
    member = _enum_member(ExecutionInstanceType, phase, "phase")
    return "prefill" if member is ExecutionInstanceType.PREFILLING else "colocated"


class RequestRouter:
    """Picks the instance for a request as the gateway's `route` does, with the strategy named `routing_strategy`
    (assignable: the next request uses the new one). One route operator is kept, so stateful strategies
    (round_robin's turn, random's seeded draws) go on from call to call."""

    def __init__(self, routing_strategy: str = "load_balanced", seed: int | None = None) -> None:
        self.seed = seed
        self.routing_strategy = routing_strategy

    @property
    def routing_strategy(self) -> str:
        return self._strategy

    @routing_strategy.setter
    def routing_strategy(self, name: str) -> None:
        self._route = Route(strategy=name, seed=self.seed)  # an unknown name raises here, naming the known ones
        self._strategy = name

    def route(
        self,
        request: RequestMetadata,
        instances: list[ExecutionInstance],
        decision: SchedulingDecision | None = None,
    ) -> ExecutionInstance | None:
        """The instance for `request` run whole; a decision's `target_instance_id` wins when it is a candidate."""
        return self._choose(request, instances, "colocated", decision)

    async def select_instance(
        self,
        request: RequestMetadata,
        available_instances: list[ExecutionInstance],
        phase: ExecutionInstanceType | str | None = None,
    ) -> ExecutionInstance | None:
        """The seed documents' form: the instance for `request` in `phase` (PDRoutingStrategy's answer)."""
        return self._choose(request, available_instances, route_phase(phase), None)

    def _choose(
        self,
        request: RequestMetadata,
        instances: list[ExecutionInstance],
        phase: Phase,
        decision: SchedulingDecision | None,
    ) -> ExecutionInstance | None:
        by_id = {i.instance_id: i for i in instances}
        stats = {name: instance_stats(i) for name, i in by_id.items()}
        if request.model_name is None:  # a request naming no model may go to any instance
            for s in stats.values():
                s.model = None
        item = pipeline_request(request, model=request.model_name)
        item.phase = phase
        item.instance = decision.target_instance_id if decision is not None else None  # kept if a candidate
        self._route.open(OperatorContext(node_id="route", outputs=[SERVERS_NODE], instances=stats))
        routed = self._route.execute(item)  # a RequestError when no instance (or, to prefill, no decode pair) can
        return by_id[item.instance] if isinstance(routed, Emit) and item.instance is not None else None


class LoadBalancer:
    """The seed's balancer over the gateway's strategies: its algorithms are load_balanced (`SEED_ALGORITHMS`);
    a gateway strategy name is taken as it is."""

    def __init__(self) -> None:
        self._routers: dict[str, RequestRouter] = {}  # by strategy, so a stateful one goes on from call to call

    def select_instance(
        self, instances: list[ExecutionInstance], algorithm: str = "weighted_round_robin"
    ) -> ExecutionInstance | None:
        strategy = SEED_ALGORITHMS.get(algorithm, algorithm)
        router = self._routers.get(strategy)
        if router is None:
            router = self._routers[strategy] = RequestRouter(strategy)
        return router.route(RequestMetadata(), instances)

    def get_least_loaded_instance(self, instances: list[ExecutionInstance]) -> ExecutionInstance | None:
        return self.select_instance(instances, "load_balanced")


class PDRoutingStrategy:
    """Whether a request is split into prefill and decode, by the gateway's `pd_split` with `pd_config`'s
    parameters, and which instances run each phase."""

    def __init__(self, pd_config: PDSeparationConfig) -> None:
        self.pd_config = pd_config

    def determine_request_phase(
        self, request: RequestMetadata, avg_output_tokens: float | None = None
    ) -> ExecutionInstanceType:
        """PREFILLING if pd_split would split `request` (given a PD pair that can take it: whether one can is
        `filter_instances_by_type`'s answer), else DECODING; HYBRID with PD disabled. The expected output is
        `max_tokens`, else `avg_output_tokens`, else the 512 tokens the control plane sends such a request with."""
        if not self.pd_config.enabled:
            return ExecutionInstanceType.HYBRID
        item = pipeline_request(request, model=request.model_name or SERVERS_MODEL)
        if request.max_tokens is None and avg_output_tokens is not None:
            item.sampling.max_tokens = int(avg_output_tokens)
        split = PDSplit(**self.pd_config.pd_split_params())
        pool = [InstanceStats(role, role=role, model=item.model) for role in ("prefill", "decode")]
        split.open(OperatorContext(node_id="pd_split", instances={s.name: s for s in pool}))
        split_it = split.execute(item).phase == "prefill"
        return ExecutionInstanceType.PREFILLING if split_it else ExecutionInstanceType.DECODING

    def filter_instances_by_type(
        self, instances: list[ExecutionInstance], target_type: ExecutionInstanceType | str
    ) -> list[ExecutionInstance]:
        """The healthy, available instances whose role runs `target_type` (route's candidates for that phase)."""
        roles = ROLES_FOR_PHASE[route_phase(target_type)]
        return [i for i in instances if (s := instance_stats(i)).healthy and s.role in roles]

    @staticmethod
    def get_instance_specialization(instance: ExecutionInstance) -> dict[str, float]:
        """1.0 for each phase the instance's role runs, else 0.0: "prefilling_score" (the prefill of a split
        request), "decoding_score" (a request run whole, or a split one's decode)."""
        role = instance.pd_role
        return {
            "prefilling_score": float(role in ROLES_FOR_PHASE["prefill"]),
            "decoding_score": float(role in ROLES_FOR_PHASE["colocated"]),
        }
