"""The seed API's scheduling extension point: a `SchedulingPolicy` subclass orders the real `policy_sort` queue.

A policy object given to `ControlPlaneManager(scheduling_policy=...)` (or `update_policy`) is registered as a
scheduling policy of this process and wrapped as one (`SeedPolicy`): each time an engine can take a request, the
waiting requests are shown to the policy as `RequestMetadata` (`prioritize`: the first goes next) and the one chosen
with the instances as `ExecutionInstance`s (`schedule`: a decision's `target_instance_id` pins it to that instance).
The seed's sync methods are taken as they are; the async per-request form its documents show (`async def schedule(
request, instances) -> SchedulingDecision`) is run to its end at once, so it must not wait on anything.

`FIFOPolicy`, `PriorityPolicy`, `SLOAwarePolicy`, `CostOptimizedPolicy` and `AdaptivePolicy` are the seed's names for
sageLLM's own five policies: given to the manager they select them (their `prioritize` orders a list the same way,
for code that calls it). `HybridSchedulingPolicy` is one of them, or two of them as a queue per request kind."""

from __future__ import annotations

import inspect
import itertools
from abc import ABC
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import structlog

from sagellm.common.errors import InvalidInput
from sagellm.control_plane.hybrid_queue import hybrid_queue
from sagellm.control_plane.types import ExecutionInstance, RequestMetadata, RequestPriority
from sagellm.operators.policies import Clock, Policy, register_runtime_policy
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.operator import OperatorContext


@dataclass
class SchedulingDecision:
    """Where a policy sends a request (the seed's fields; only `target_instance_id` changes where it runs)."""

    request_id: str
    target_instance_id: str
    parallelism_strategy: Any = None
    estimated_latency_ms: float = 0.0
    estimated_cost: float = 0.0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    reason: str = ""
    confidence: float = 1.0
    metadata: dict[str, Any] = field(default_factory=dict)


class SchedulingPolicy(ABC):  # noqa: B024  (both methods have a default: a subclass overrides either or both)
    """Orders waiting requests (`prioritize`) and may pin each to an instance (`schedule`)."""

    def __init__(self, name: str = "") -> None:
        self.name = name or type(self).__name__

    def prioritize(self, requests: list[RequestMetadata]) -> list[RequestMetadata]:
        """The requests, the next to run first (default: as they came)."""
        return requests

    def schedule(self, requests: list[RequestMetadata], instances: list[ExecutionInstance]) -> list[Any]:
        """A decision per request this policy places (none: route chooses)."""
        return []


class BuiltinPolicy(SchedulingPolicy):
    """One of sageLLM's policies by the seed's class name."""

    policy: ClassVar[str] = ""

    def prioritize(self, requests: list[RequestMetadata]) -> list[RequestMetadata]:
        return sorted(requests, key=self.key)

    def key(self, request: RequestMetadata) -> tuple:
        return (request.arrival_time,)


class FIFOPolicy(BuiltinPolicy):
    policy = "fifo"


class PriorityPolicy(BuiltinPolicy):
    policy = "priority"

    def key(self, request: RequestMetadata) -> tuple:
        return (int(request.priority), request.arrival_time)


class SLOAwarePolicy(BuiltinPolicy):
    policy = "slo_aware"

    def key(self, request: RequestMetadata) -> tuple:
        deadline = request.slo_deadline_ms if request.slo_deadline_ms is not None else float("inf")
        return (request.arrival_time.timestamp() * 1000 + deadline, request.arrival_time)


class CostOptimizedPolicy(BuiltinPolicy):
    policy = "cost_optimized"

    def key(self, request: RequestMetadata) -> tuple:
        budget = request.cost_budget if request.cost_budget is not None else float("inf")
        return (int(request.priority), budget, request.arrival_time)


class AdaptivePolicy(PriorityPolicy):
    policy = "adaptive"


BUILTIN_POLICIES: dict[str, type[BuiltinPolicy]] = {
    cls.policy: cls for cls in (FIFOPolicy, PriorityPolicy, SLOAwarePolicy, CostOptimizedPolicy, AdaptivePolicy)
}
EMBEDDING_PRIORITIES = ("high", "normal", "low", "adaptive")


@dataclass
class HybridSchedulingConfig:
    """The seed's hybrid settings. Two act: `llm_fallback_policy` (sageLLM's policy by that name orders the
    requests) and `embedding_priority` (which kind goes first). The rest describe the embedding instances, which
    batch as their own settings say; route sends embeddings only to them (`prefer_specialized_instances`)."""

    embedding_batch_size: int = 32
    embedding_priority: str = "normal"
    llm_fallback_policy: str = "adaptive"
    hybrid_instance_ratio: float = 0.7
    enable_embedding_batching: bool = True
    max_embedding_wait_ms: float = 50.0
    min_embedding_batch_size: int = 1
    prefer_specialized_instances: bool = True

    def __post_init__(self) -> None:
        self.embedding_priority = self.embedding_priority.lower()
        self.llm_fallback_policy = self.llm_fallback_policy.lower()
        if self.embedding_priority not in EMBEDDING_PRIORITIES:
            raise InvalidInput(
                f"embedding_priority: {self.embedding_priority!r} is not one of {', '.join(EMBEDDING_PRIORITIES)}"
            )
        if self.llm_fallback_policy not in BUILTIN_POLICIES:
            raise InvalidInput(
                f"llm_fallback_policy: {self.llm_fallback_policy!r} is not one of {', '.join(BUILTIN_POLICIES)}"
            )


class HybridSchedulingPolicy(SchedulingPolicy):
    """The seed's policy for LLM and embedding requests sharing instances, as a composition of sageLLM's own. The
    seed splits the requests by kind, sends embeddings in batches to embedding instances and the rest through a
    fallback policy to LLM instances. Here the split by instance is route's for every policy (an embedding request
    goes only to an embedding instance), batching is the embedding server's, and what is left is the order:
    `llm_fallback_policy` gives it (`llm_policy`, its seed name); `embedding_priority` "normal" keeps both kinds in
    that one queue, so the hybrid is exactly that policy; "high", "low" or "adaptive" give each kind a queue of its
    own, in that policy's order, and say which serves first (`HybridQueue`)."""

    def __init__(
        self,
        embedding_batch_size: int = 32,
        embedding_priority: str = "normal",
        llm_fallback_policy: str = "adaptive",
        hybrid_instance_ratio: float = 0.7,
        config: HybridSchedulingConfig | None = None,
    ) -> None:
        super().__init__("Hybrid")
        self.config = config or HybridSchedulingConfig(
            embedding_batch_size, embedding_priority, llm_fallback_policy, hybrid_instance_ratio
        )
        self.embedding_priority = self.config.embedding_priority
        self.llm_policy = BUILTIN_POLICIES[self.config.llm_fallback_policy]()

    def prioritize(self, requests: list[RequestMetadata]) -> list[RequestMetadata]:
        """The fallback policy's order (a `RequestMetadata` here is always a generation)."""
        return self.llm_policy.prioritize(requests)

    @property
    def sort_policy(self) -> str:
        """The `policy_sort` policy it stands for."""
        if self.embedding_priority == "normal":
            return self.llm_policy.policy
        return hybrid_queue(self.llm_policy.policy, self.embedding_priority)


log = structlog.get_logger("sagellm.control_plane")
_names = itertools.count()


def policy_name(policy: str | SchedulingPolicy) -> str:
    """The name `policy_sort` takes for `policy`: a name as it is, a built-in's own, and a policy object registered
    as a run-time policy of this process (each object once; never listed with the policies a graph file names)."""
    if isinstance(policy, str):
        return policy
    if isinstance(policy, BuiltinPolicy):
        return policy.policy
    if isinstance(policy, HybridSchedulingPolicy):
        return policy.sort_policy
    if not isinstance(policy, SchedulingPolicy):
        raise InvalidInput(f"scheduling_policy: a policy name or a SchedulingPolicy, got {type(policy).__name__}")
    registered = getattr(policy, "_sagellm_policy_name", None)
    if registered is None:
        registered = f"{policy.name}#{next(_names)}"
        register_runtime_policy(type(f"SeedPolicy_{policy.name}", (SeedPolicy,), {"name": registered, "seed": policy}))
        policy._sagellm_policy_name = registered  # type: ignore[attr-defined]
    return registered


class SeedPolicy(Policy):
    """A `SchedulingPolicy` object as a `policy_sort` policy (each subclass holds one: `seed`)."""

    seed: ClassVar[SchedulingPolicy]

    def __init__(self, ctx: OperatorContext, clock: Clock) -> None:
        super().__init__(ctx, clock)
        self._waiting: dict[str, tuple[Request, RequestMetadata]] = {}  # by id, in arrival order

    def push(self, request: Request) -> None:
        self._waiting[request.request_id] = (request, _metadata(request))

    def pop(self) -> Request | None:
        if not self._waiting:
            return None
        order = self._order()
        request = self._waiting.pop(order[0].request_id)[0]
        try:
            if inspect.iscoroutinefunction(self.seed.schedule):  # the documents' form: one request, one decision
                decision = _finished(self.seed.schedule(order[0], self._instances()))
            else:
                decisions = self.seed.schedule([order[0]], self._instances())
                decision = decisions[0] if decisions else None
        except Exception:  # the policy's own failure: route places the request
            log.exception("scheduling_policy_failed", policy=self.seed.name, method="schedule")
            decision = None
        target = getattr(decision, "target_instance_id", None) or getattr(decision, "instance_id", None)
        if target in self.ctx.instances:
            request.instance = target
        return request

    def shed(self) -> Request:
        return self._waiting.pop(self._order()[-1].request_id)[0]

    def drain(self) -> list[Request]:
        requests = [self._waiting[m.request_id][0] for m in self._order()]
        self._waiting.clear()
        return requests

    def remove(self, request_ids: set[str]) -> list[Request]:
        return [self._waiting.pop(i)[0] for i in list(self._waiting) if i in request_ids]

    def __len__(self) -> int:
        return len(self._waiting)

    def _order(self) -> list[RequestMetadata]:
        """The waiting requests in the policy's order; in arrival order when the policy fails (logged), so a policy's
        bug never stops the queue."""
        waiting = [metadata for _, metadata in self._waiting.values()]
        try:
            ordered = _finished(self.seed.prioritize(list(waiting)))
            known = [m for m in ordered if m.request_id in self._waiting]
            if len(known) != len(waiting) or len({m.request_id for m in known}) != len(known):
                raise InvalidInput(f"policy {self.seed.name}: prioritize must return the requests it was given")
        except Exception:
            log.exception("scheduling_policy_failed", policy=self.seed.name, method="prioritize")
            return waiting
        return known

    def _instances(self) -> list[ExecutionInstance]:
        return [
            ExecutionInstance(
                name,
                model_name=s.model or "",
                is_healthy=s.healthy,
                is_available=s.healthy,
                active_requests=s.running,
                max_concurrent_requests=s.max_running,
                current_load=s.running / max(s.max_running, 1),
            )  # fmt: skip
            for name, s in self.ctx.instances.items()
        ]


def _metadata(request: Request) -> RequestMetadata:
    """A pipeline request as the seed's policies see it."""
    s = request.sampling
    priority = RequestPriority(min(max(request.priority, RequestPriority.CRITICAL), RequestPriority.BACKGROUND))
    deadline_ms = (request.deadline - request.arrival_time) * 1000 if request.deadline is not None else None
    return RequestMetadata(
        request_id=request.request_id, prompt=request.prompt, user_id=request.user, priority=priority,
        slo_deadline_ms=deadline_ms, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
        model_name=request.model, cost_budget=request.cost_budget, messages=request.messages,
        ttft_slo_ms=request.ttft_slo_ms, tbt_slo_ms=request.tpot_slo_ms,
        arrival_time=datetime.fromtimestamp(request.arrival_time),
    )  # fmt: skip


def _finished(result: Any) -> Any:
    """A policy method's result; an async one's coroutine run to its end at once (it must not wait on anything)."""
    if not inspect.iscoroutine(result):
        return result
    coroutine: Coroutine[Any, Any, Any] = result
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise InvalidInput("a SchedulingPolicy's async method waited on something: it must decide at once")
