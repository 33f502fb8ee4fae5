"""Scheduling policies of the `policy_sort` queue: which waiting request the engines get next, and which to shed.

A policy owns the waiting requests and their order; `policy_sort` only wraps it as a queue operator. Each is built
with the operator's context (the engines' live `InstanceStats` and the graph's `PipelineLoad`) and a clock, so its
decisions follow load as it changes and tests control time. Where the order is static (fifo, priority) a policy
keeps a heap: push and pop are O(log n). Where it depends on the present (slack shrinks as instances' throughput
estimates move and health changes), it re-ranks on each pop in O(n), which is cheap next to an engine step for
queues of a few thousand requests. Shedding removes the lowest-ranked request in O(n): it only happens when full."""

from __future__ import annotations

import heapq
import inspect
import itertools
import math
from collections.abc import Callable
from typing import ClassVar

import structlog

from sagellm.common.registry import Registry
from sagellm.runtime.pipeline.messages import Request, RequestError
from sagellm.runtime.pipeline.operator import InstanceStats, OperatorContext, OperatorError

Clock = Callable[[], float]


class Policy:
    """The waiting requests of one queue, in the policy's order."""

    name: ClassVar[str] = ""

    def __init__(self, ctx: OperatorContext, clock: Clock) -> None:
        self.ctx, self.clock = ctx, clock

    def check(self, request: Request) -> RequestError | None:
        """A rejection for a request this policy can never serve; None to queue it."""
        return None

    def push(self, request: Request) -> None:
        raise NotImplementedError

    def pop(self) -> Request | RequestError | None:
        raise NotImplementedError

    def shed(self) -> Request:
        """Removes and returns the lowest-ranked request (only called on a non-empty queue)."""
        raise NotImplementedError

    def drain(self) -> list[Request]:
        """Removes every request, best-ranked first, to hand them to another policy."""
        raise NotImplementedError

    def remove(self, request_ids: set[str]) -> list[Request]:
        """Removes and returns the waiting requests with these ids (their clients left), in O(n)."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


POLICIES: Registry[type[Policy]] = Registry("scheduling policy", error=OperatorError)
register_policy = POLICIES.register
# Policies a program makes at run time from objects of its own (a control plane's custom policy): found by name in
# this process, never listed among the policies a graph file can name.
_RUNTIME_POLICIES: dict[str, type[Policy]] = {}


def register_runtime_policy(cls: type[Policy]) -> None:
    _RUNTIME_POLICIES[cls.name] = cls


def is_policy(name: str) -> bool:
    """Whether `make_policy` knows `name` (a graph file's policy, or one of this process's run-time policies)."""
    return name in _RUNTIME_POLICIES or name in POLICIES


def make_policy(name: str, ctx: OperatorContext, clock: Clock, args: dict[str, float] | None = None) -> Policy:
    """The policy `name`, with its own keyword `args` (e.g. adaptive's thresholds), checked by name."""
    cls = _RUNTIME_POLICIES.get(name) or POLICIES.get(name)
    takes = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "ctx", "clock")]
    unknown = sorted(set(args or {}) - set(takes))
    if unknown:
        raise OperatorError(f"scheduling policy {name!r} takes no {unknown}; its arguments are {takes}")
    return cls(ctx, clock, **(args or {}))


class _HeapPolicy(Policy):
    """A static order: a min-heap on `key`, ties broken by push order (the sequence number)."""

    def __init__(self, ctx: OperatorContext, clock: Clock) -> None:
        super().__init__(ctx, clock)
        self._heap: list[tuple[tuple[float, ...], int, Request]] = []
        self._seq = itertools.count()

    def key(self, request: Request) -> tuple[float, ...]:
        raise NotImplementedError

    def push(self, request: Request) -> None:
        heapq.heappush(self._heap, (self.key(request), next(self._seq), request))

    def pop(self) -> Request | None:
        return heapq.heappop(self._heap)[2] if self._heap else None

    def shed(self) -> Request:
        worst = max(self._heap)  # (key, seq) is unique, so requests themselves are never compared
        self._heap.remove(worst)
        heapq.heapify(self._heap)
        return worst[2]

    def drain(self) -> list[Request]:
        requests = [entry[2] for entry in sorted(self._heap)]
        self._heap.clear()
        return requests

    def remove(self, request_ids: set[str]) -> list[Request]:
        removed = [entry[2] for entry in self._heap if entry[2].request_id in request_ids]
        if removed:
            self._heap = [entry for entry in self._heap if entry[2].request_id not in request_ids]
            heapq.heapify(self._heap)
        return removed

    def __len__(self) -> int:
        return len(self._heap)


@register_policy
class Fifo(_HeapPolicy):
    """Arrival order (the requests' `arrival_time`, so streams merged from several sources interleave fairly)."""

    name = "fifo"

    def key(self, request: Request) -> tuple[float, ...]:
        return (request.arrival_time,)


@register_policy
class Priority(_HeapPolicy):
    """Lower `priority` first; arrival order within a class."""

    name = "priority"

    def key(self, request: Request) -> tuple[float, ...]:
        return (request.priority, request.arrival_time)


@register_policy
class SloAware(Policy):
    """Least slack first: slack = deadline - now - prompt tokens / the fastest healthy instance's tokens_per_s.

    The deadline is `request.deadline`, else `arrival_time + ttft_slo_ms`, else never (infinite slack: served in
    arrival order after every request with an SLO). A request whose slack is already negative can no longer make
    its SLO: it goes after every request that still can (least late first), and is the first shed, so under overload
    capacity goes to requests it can still save (plain earliest-deadline-first spends it on the already lost).
    The ranking is redone on each pop rather than kept in a heap, because slack changes with time."""

    name = "slo_aware"

    def __init__(self, ctx: OperatorContext, clock: Clock, default_tokens_per_s: float = 100.0) -> None:
        super().__init__(ctx, clock)
        if not default_tokens_per_s > 0:
            raise OperatorError(f"{self.name}: default_tokens_per_s must be > 0, got {default_tokens_per_s}")
        self.default_tokens_per_s = default_tokens_per_s  # when no healthy instance reports a throughput
        self._waiting: list[tuple[int, Request]] = []  # (seq, request), in push order
        self._seq = itertools.count()

    @staticmethod
    def deadline(request: Request) -> float:
        if request.deadline is not None:
            return request.deadline
        if request.ttft_slo_ms is not None:
            return request.arrival_time + request.ttft_slo_ms / 1000
        return math.inf

    def _ranks(self) -> list[tuple[bool, float, int, int]]:
        """(late, slack or lateness, seq, index) of every waiting request, against the instances' throughput."""
        rates = [s.tokens_per_s for s in self.ctx.instances.values() if s.healthy and s.tokens_per_s > 0]
        tokens_per_s, now = max(rates, default=self.default_tokens_per_s), self.clock()
        ranks = []
        for i, (seq, r) in enumerate(self._waiting):
            slack = self.deadline(r) - now - r.num_prompt_tokens / tokens_per_s
            ranks.append((slack < 0, -slack if slack < 0 else slack, seq, i))
        return ranks

    def push(self, request: Request) -> None:
        self._waiting.append((next(self._seq), request))

    def pop(self) -> Request | RequestError | None:
        return self._waiting.pop(min(self._ranks())[-1])[1] if self._waiting else None

    def shed(self) -> Request:
        return self._waiting.pop(max(self._ranks())[-1])[1]

    def drain(self) -> list[Request]:
        requests = [self._waiting[rank[-1]][1] for rank in sorted(self._ranks())]
        self._waiting.clear()
        return requests

    def remove(self, request_ids: set[str]) -> list[Request]:
        removed = [request for _, request in self._waiting if request.request_id in request_ids]
        if removed:
            self._waiting = [entry for entry in self._waiting if entry[1].request_id not in request_ids]
        return removed

    def __len__(self) -> int:
        return len(self._waiting)


@register_policy
class CostOptimized(SloAware):
    """slo_aware's order; on pop, pins (`request.instance`, which route honors) the cheapest healthy instance
    predicted to meet the request's deadline within its cost budget. The prediction on an instance counts the prompt
    tokens already queued there (route charges them at once), so pins move to dearer instances as the cheapest falls
    behind. Cost is (prompt + expected output tokens) / 1000 * price_per_1k_tokens.

    When nothing fits: no healthy instance in time -> the cheapest in budget, counted in `slo_misses` (a late answer
    is still an answer). Among equally priced instances: one with a free slot, then the least work queued. No
    instance at all within budget -> rejected at push as `invalid_request`: it can never be served as asked (a client
    error, like an over-long prompt). Only unhealthy instances within budget -> rejected at pop as `overloaded`,
    retryable: they may recover. No instance stats at all -> not pinned; route decides."""

    name = "cost_optimized"

    def __init__(self, ctx: OperatorContext, clock: Clock, default_tokens_per_s: float = 100.0) -> None:
        super().__init__(ctx, clock, default_tokens_per_s)
        self.slo_misses = 0  # pins to the cheapest in-budget instance although none was predicted in time

    @staticmethod
    def cost(request: Request, instance: InstanceStats) -> float:
        tokens = request.num_prompt_tokens + request.sampling.expected_output_tokens
        return tokens / 1000 * instance.price_per_1k_tokens

    def _affordable(self, request: Request, instances: list[InstanceStats]) -> list[InstanceStats]:
        """The instances within the request's budget, cheapest first."""
        budget = request.cost_budget
        fitting = [s for s in instances if budget is None or self.cost(request, s) <= budget]
        return sorted(fitting, key=lambda s: s.price_per_1k_tokens)

    def check(self, request: Request) -> RequestError | None:
        instances = list(self.ctx.instances.values())
        if not instances or self._affordable(request, instances):
            return None
        cheapest = min(self.cost(request, s) for s in instances)
        return RequestError(
            request_id=request.request_id,
            code="invalid_request",
            message=f"cost_budget {request.cost_budget:g} is below the cheapest instance's cost {cheapest:g} "
            f"for {request.num_prompt_tokens} prompt + {request.sampling.expected_output_tokens} completion tokens",
            time=self.clock(),
        )

    def pop(self) -> Request | RequestError | None:
        request = super().pop()
        if request is None or not self.ctx.instances:
            return request  # no instance stats to choose from: route decides
        affordable = self._affordable(request, [s for s in self.ctx.instances.values() if s.healthy])
        if not affordable:
            return RequestError(
                request_id=request.request_id,
                code="overloaded",
                message=f"no healthy instance is within cost_budget {request.cost_budget:g}; retry later",
                retryable=True,
                time=self.clock(),
            )
        slack = self.deadline(request) - self.clock()
        # predicted time to the first token there: the prompt tokens queued on the instance, then this prompt; a
        # saturated instance has no slot to start it at all
        in_time = [
            s
            for s in affordable
            if s.tokens_per_s > 0
            and not s.saturated
            and (s.queued_prefill_tokens + request.num_prompt_tokens) / s.tokens_per_s <= slack
        ]
        if not in_time:
            self.slo_misses += 1
        # the cheapest; among equally priced ones, one with a free slot and the least work queued
        chosen = min(in_time or affordable, key=lambda s: (s.price_per_1k_tokens, s.saturated, s.predicted_work))
        request.instance = chosen.name
        return request


@register_policy
class Adaptive(Policy):
    """fifo while load is light; priority once the queue grows (serve the high classes first under backlog);
    slo_aware once SLOs are being violated. Each condition is left only at a lower threshold than it is entered at
    (hysteresis), so a value hovering at one threshold does not flap the order. The waiting requests move to the new
    policy on a switch (O(n log n), rare by construction); switches are logged and counted in `switches`."""

    name = "adaptive"

    def __init__(
        self,
        ctx: OperatorContext,
        clock: Clock,
        queue_high: float = 64,
        queue_low: float = 16,
        violation_high: float = 0.1,
        violation_low: float = 0.05,
    ) -> None:
        super().__init__(ctx, clock)
        if not (0 <= queue_low < queue_high and 0 <= violation_low < violation_high):
            raise OperatorError(
                f"adaptive: need 0 <= queue_low < queue_high and 0 <= violation_low < violation_high, got "
                f"queue {queue_low:g}/{queue_high:g}, violation {violation_low:g}/{violation_high:g}"
            )
        self.queue_high, self.queue_low = queue_high, queue_low
        self.violation_high, self.violation_low = violation_high, violation_low
        self.current: Policy = Fifo(ctx, clock)
        self.switches = 0
        self._log = structlog.get_logger()

    def _target(self) -> tuple[str, str]:
        """The policy the present load calls for, and why."""
        rate, length, current = self.ctx.load.slo_violation_rate, len(self.current), self.current.name
        if rate >= self.violation_high or (current == "slo_aware" and rate > self.violation_low):
            return "slo_aware", f"slo_violation_rate {rate:.3f} (enter >= {self.violation_high:g})"
        if length >= self.queue_high or (current == "priority" and length > self.queue_low):
            return "priority", f"queue length {length} (enter >= {self.queue_high:g})"
        return "fifo", f"slo_violation_rate {rate:.3f} and queue length {length} are below the thresholds"

    def _adapt(self) -> None:
        target, reason = self._target()
        if target == self.current.name:
            return
        successor = POLICIES.get(target)(self.ctx, self.clock)
        for request in self.current.drain():
            successor.push(request)
        self._log.info("policy_switch", **{"from": self.current.name}, to=target, reason=reason)
        self.current = successor
        self.switches += 1

    def push(self, request: Request) -> None:
        self._adapt()
        self.current.push(request)

    def pop(self) -> Request | RequestError | None:
        self._adapt()
        return self.current.pop()

    def shed(self) -> Request:
        return self.current.shed()

    def drain(self) -> list[Request]:
        return self.current.drain()

    def remove(self, request_ids: set[str]) -> list[Request]:
        return self.current.remove(request_ids)

    def __len__(self) -> int:
        return len(self.current)
