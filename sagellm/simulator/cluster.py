"""The cluster simulator: a trace's requests through the real `PolicySort` queue and routing strategy onto simulated
engine instances (`instance.Instance`), on a simulated clock, with the real autoscaler deciding the instance count.
The instances are alike (one `StepModel`) or of several kinds (`Tier`s: each its own step model, price and role).

The flow is the executor's: a request enters the policy queue when it arrives; the queue pops only while some
instance has a free slot (`InstanceStats.running < max_running`: route's charge counts a request from routing to its
end); the routing strategy chooses among candidates and the request joins that instance's waiting queue; the
instance's report (`InstanceStats`) is kept as the engine operator keeps it, so policies and strategies read real
numbers. At 1,000 instances scanning every instance per request is too slow, so with `sample=d` route chooses among
d instances drawn from those with a free slot (power of d choices, as Ray Serve's router does with two); the free
ones are kept in a set with O(1) add, remove and draw.

Prefill/decode disaggregation: tiers of role "prefill" and "decode" (prefill and decode workers). Each popped request
goes through the real `PDSplit` operator, which reads the instances' reports and the prompt's length against its
threshold, and is routed among the instances of its phase's roles (route's `ROLES_FOR_PHASE`). When none of them has
a free slot the request waits at route and the queue behind it with it (the executor's rendezvous channels block
route's send the same way). A prefilled request's KV reaches the decode side `KVTransferModel.latency_s` after its
prefill, where a hand-over waits for a decode slot, first come first served; the strategy chooses the decode
instance, as a route after the prefill workers would. That instance copies the KV into its cache before its next step
(`KVTransferModel.per_token_s` a prompt token) and emits the first token then, as the decode worker's `add` does
between two steps.

Instances can share a host (`instances_per_host`, numbered tier after tier): each then runs its steps slower while
another on its host computes, by its step model's neighbour slowdowns (sim-check's prefill and decode workers share
one machine; instances of a cluster have hosts of their own by default).

The simulated requests are real `Request`s (the policies read their fields) whose prompt is a length without
contents (`LengthOnlyPrompt`): the simulator models neither prompt contents nor prefix caching, so the strategies that
read contents (locality, cache_aware) are refused, and pd_split counts every prompt token as uncached. Every decision
is the real code's, so its CPU time is real too."""

from __future__ import annotations

import heapq
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from sagellm.common.autoscale import Autoscale, Signals
from sagellm.operators.pd_split import PDSplit
from sagellm.operators.policy_sort import PolicySort
from sagellm.operators.prefix_index import PrefixIndex
from sagellm.operators.route import ROLES_FOR_PHASE
from sagellm.operators.routing import make_strategy
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.pipeline.messages import Request, RequestError
from sagellm.runtime.pipeline.operator import InstanceStats, OperatorContext
from sagellm.simulator.cluster_config import ROLES, ClusterConfig, Tier
from sagellm.simulator.cluster_result import cluster_result
from sagellm.simulator.contentless import LengthOnlyPrompt, NoPrefixCache
from sagellm.simulator.free_set import FreeSet
from sagellm.simulator.instance import Instance
from sagellm.simulator.result import SimResult
from sagellm.simulator.traces import Trace

PROGRESS_EVERY = 4096  # ended requests between progress reports
_STEP, _TICK, _READY, _HANDOVER = 0, 1, 2, 3  # event kinds


def simulate(config: ClusterConfig, trace: Trace, progress: Callable[[int], None] | None = None) -> SimResult:
    """Runs every request of `trace` to its end (finished or failed); `progress(n)` hears of every n more ended."""
    return _Simulation(config, trace, progress).run()


class _Simulation:
    def __init__(self, config: ClusterConfig, trace: Trace, progress: Callable[[int], None] | None) -> None:
        self.config, self.trace, self.progress = config, trace, progress
        n = len(trace)
        self.prompts: list[int] = trace.prompt_tokens.tolist()
        self.outputs: list[int] = trace.output_tokens.tolist()
        self.priorities = trace.priorities.tolist() if trace.priorities is not None else None
        self.slos = trace.ttft_slo_ms.tolist() if trace.ttft_slo_ms is not None else None
        self.first, self.finish, self.where = [math.nan] * n, [math.nan] * n, [-1] * n
        self.now, self.ended, self.reported = 0.0, 0, 0
        self.ctx = OperatorContext("policy_sort")
        self.load = self.ctx.load
        self.queue = PolicySort(policy=config.policy, max_len=config.max_queue)
        self.queue.clock = lambda: self.now
        self.queue.open(self.ctx)
        self.strategy = make_strategy(config.routing, prefix_index=PrefixIndex(), seed=config.seed)
        self.rng = random.Random(config.seed)
        self.instances: list[Instance] = []
        self.by_name: dict[str, Instance] = {}
        roles = {tier.role for tier, _ in config.kinds()}
        self.free = {role: FreeSet() for role in ROLES}  # by role
        self.free_sets = [self.free[role] for role in ROLES if role in roles]
        self.free_for = {  # by phase: the free sets of the roles that run it, among those present
            phase: [self.free[r] for r in ROLES if r in roles and r in ROLES_FOR_PHASE[phase]] for phase in ROLES
        }
        self.split: PDSplit | None = None  # the real pd_split, when there are prefill workers
        if "prefill" in roles:
            self.split = PDSplit(threshold_tokens=config.pd_threshold_tokens)
            self.split.prefix_index = NoPrefixCache()
            self.split.open(OperatorContext("pd_split", instances=self.ctx.instances, load=self.load))
        self.held: Request | None = None  # popped, waiting at route for a free instance of its phase
        self.prefilled: dict[int, Request] = {}  # on a prefill instance or on their way to a decode one
        self.handoffs: deque[int] = deque()  # prefilled requests whose KV arrived, waiting for a decode slot
        self.pending: list[Instance] = []  # at a step boundary now, their next step not yet composed
        self.events: list[tuple[float, int, int, Any, int]] = []
        self.seq = itertools.count()
        self.prompt_of: dict[int, LengthOnlyPrompt] = {}
        self.sampling_of: dict[int, SamplingParams] = {}
        self.autoscaler = Autoscale(config.autoscale) if config.autoscale else None
        self.starting, self.changes = 0, []
        self.slo_seen = (0, 0)  # (checked, violations) at the last autoscale reading
        for tier, count in config.kinds():
            for _ in range(count):
                self._add_instance(tier, added=False)
        if self.autoscaler:
            self._at(0.0, _TICK, None, 0)

    def run(self) -> SimResult:
        started = time.perf_counter()
        arrivals: list[float] = self.trace.arrivals.tolist()
        events, pop, queue, pending, free_sets = self.events, heapq.heappop, self.queue, self.pending, self.free_sets
        n, k = len(arrivals), 0
        shared_hosts = self.config.instances_per_host > 1
        while True:
            if events and (k >= n or events[0][0] < arrivals[k]):  # arrivals first at a tie: they join its step
                self.now, _, kind, target, version = pop(events)
                if kind == _STEP:
                    if version == target.version:
                        self._advance(target)
                elif kind == _HANDOVER:
                    self.handoffs.append(target)
                elif kind == _TICK:
                    self._tick()
                else:
                    self._add_instance(self.config.kinds()[0][0], added=True)
            elif k < n:
                self.now = arrivals[k]
                self._arrive(k)
                k += 1
            else:
                break
            if self.handoffs:
                self._hand_over()
            if (len(queue) or self.held is not None) and any(free.items for free in free_sets):
                self._dispatch()
            if shared_hosts:
                self._compose_on_shared_hosts()
                continue
            for instance in pending:
                instance.compose(self.now)
                if instance.end is not None:
                    self._at(instance.end, _STEP, instance, instance.version)
                instance.refresh(self.now)
            pending.clear()
        if self.progress and self.ended > self.reported:
            self.progress(self.ended - self.reported)
        return cluster_result(
            self.config,
            self.trace,
            self.first,
            self.finish,
            self.where,
            instances_peak=len(self.instances),
            pd_decisions=self.split.decisions if self.split is not None else None,
            changes=self.changes,
            policy=self.queue.policy,
            wall_s=time.perf_counter() - started,
        )

    # -- requests ---------------------------------------------------------------------------------------------
    def _arrive(self, i: int) -> None:
        prompt, output = self.prompts[i], self.outputs[i]
        tokens = self.prompt_of.get(prompt)
        if tokens is None:
            tokens = self.prompt_of[prompt] = LengthOnlyPrompt(prompt)
        sampling = self.sampling_of.get(output)
        if sampling is None:
            sampling = self.sampling_of[output] = SamplingParams(max_tokens=output)
        request = Request(
            request_id=str(i),
            prompt_token_ids=tokens,
            sampling=sampling,
            priority=self.priorities[i] if self.priorities else 0,
            ttft_slo_ms=self.slos[i] if self.slos else None,
            arrival_time=self.now,
        )
        self.load.in_flight += 1
        for error in self.queue.push(request):
            self._end(int(error.request_id))

    def _dispatch(self) -> None:
        """Pops while some instance has a free slot, as the executor pops when downstream has room; pd_split gives
        each its phase. One that no instance of its phase can take now waits at route, and the queue behind it."""
        queue, free_sets = self.queue, self.free_sets
        while True:
            item = self.held
            if item is None:
                if not len(queue) or not any(free.items for free in free_sets):
                    break
                item = queue.pop()
                if item is None:
                    break
                if isinstance(item, RequestError):  # the policy rejected it at pop (cost_optimized: none affordable)
                    self._end(int(item.request_id))
                    continue
                if self.split is not None:
                    self.split.execute(item)
            instance = self._route(item)
            self.held = item if instance is None else None
            if instance is None:
                break
            self._admit(instance, int(item.request_id), item)

    def _hand_over(self) -> None:
        """Prefilled requests whose KV arrived join a decode instance with a free slot, first come first served; the
        decode worker emits the first token as it takes one."""
        while self.handoffs:
            i = self.handoffs[0]
            request = self.prefilled[i]
            request.phase = "decode"
            one_token = self.outputs[i] == 1  # the prefill's token was its only one: nothing to decode
            instance = None if one_token else self._route(request)
            if instance is None and not one_token:  # no decode slot yet
                break
            self.handoffs.popleft()
            del self.prefilled[i]
            if instance is None:
                self.first[i] = self.finish[i] = self.now
                self._end(i)
            else:
                self._admit(instance, i, request, prefilled=True)

    def _admit(self, instance: Instance, i: int, request: Request, *, prefilled: bool = False) -> None:
        self.where[i] = instance.index
        if instance.prefill_only:
            self.prefilled[i] = request
        when = instance.admit(i, self.now, prefilled=prefilled)
        if when is not None:
            self._at(when, _STEP, instance, instance.version)
        instance.refresh(self.now)
        if instance.stats.running >= instance.max_seqs:
            self.free[instance.stats.role].discard(instance)

    def _route(self, request: Request) -> Instance | None:
        """A request its policy pinned keeps its instance while that takes requests of its phase; else the strategy
        chooses among the free instances of its phase's roles, or `sample` of them drawn at random, each report
        refreshed to now first. None: no instance of those roles has a free slot."""
        if request.instance is not None:
            pinned = self.by_name.get(request.instance)
            if pinned is not None and pinned.accepting and pinned.stats.role in ROLES_FOR_PHASE[request.phase]:
                return pinned
        sets, d = self.free_for[request.phase], self.config.sample
        items = sets[0].items if len(sets) == 1 else [x for free in sets for x in free.items]
        if not items:
            return None
        if d is None:
            candidates = sorted(items, key=lambda x: x.index)  # in instance order
        elif d >= len(items):
            candidates = list(items)
        elif d == 1:
            return items[int(self.rng.random() * len(items))]
        else:
            candidates = [items[p] for p in self.rng.sample(range(len(items)), d)]
        for candidate in candidates:
            candidate.refresh(self.now)
        chosen = self.strategy.choose(request, [c.stats for c in candidates], [])
        return self.by_name[chosen.name]

    def _end(self, i: int) -> None:
        """A request's terminal item, counted as the executor counts it (the adaptive policy and the autoscaler read
        the SLO-violation rate of finished requests)."""
        load = self.load
        load.in_flight -= 1
        if math.isnan(self.finish[i]):
            load.failed += 1
        else:
            load.completed += 1
            if self.slos is not None:
                load.slo_checked += 1
                load.slo_violations += (self.first[i] - self.trace.arrivals[i]) * 1000 > self.slos[i]
        self.ended += 1
        if self.progress and self.ended - self.reported >= PROGRESS_EVERY:
            self.progress(self.ended - self.reported)
            self.reported = self.ended

    # -- instances --------------------------------------------------------------------------------------------
    def _at(self, when: float, kind: int, target: Any, version: int) -> None:
        heapq.heappush(self.events, (when, next(self.seq), kind, target, version))

    def _advance(self, instance: Instance) -> None:
        """Applies an instance's step (or span) and frees its finished requests' slots; its next step is composed
        after this instant's dispatch (`pending`)."""
        for i in instance.advance():
            if instance.prefill_only:  # its KV leaves for a decode instance
                self._at(self.now + self.config.kv_transfer.latency_s, _HANDOVER, i, 0)
            else:
                self._end(i)
        self.pending.append(instance)
        instance.refresh(self.now)
        if not instance.accepting:
            if not instance.busy:
                self._remove(instance)
        elif instance.stats.running < instance.max_seqs:
            self.free[instance.stats.role].add(instance)

    def _compose_on_shared_hosts(self) -> None:
        """Plans the pending instances' next work, all of it before any is slowed, since their neighbours' plans
        decide their speed (`Instance.contend`); a neighbour under way in a span is cut where one of them started or
        stopped computing (`Instance.cut`), to go on at the other speed. Clears `pending`."""
        now, pending = self.now, self.pending
        composed = {instance.index for instance in pending}
        for instance in pending:
            instance.compose(now)
        for instance in pending:
            instance.contend(now)
            if instance.end is not None:
                self._at(instance.end, _STEP, instance, instance.version)
            instance.refresh(now)
            if instance.computing != instance.was_computing:
                instance.was_computing = instance.computing
                for neighbour in instance.neighbours:
                    if neighbour.index in composed:  # planned now, beside this plan
                        continue
                    when = neighbour.cut(now)
                    if when is not None:
                        self._at(when, _STEP, neighbour, neighbour.version)
        pending.clear()

    def _add_instance(self, tier: Tier, *, added: bool) -> None:
        """An instance of `tier`, its report starting as the engine operator's does: the tier's price, no load, and
        the default `tokens_per_s` until its own steps teach it (`Instance._learn`)."""
        model, index = tier.step_model, len(self.instances)
        stats = InstanceStats(
            f"i{index}", role=tier.role, max_running=model.max_num_seqs, price_per_1k_tokens=tier.price_per_1k_tokens
        )
        instance = Instance(index, stats, model, self.prompts, self.outputs, self.first, self.finish)
        instance.added = added
        if tier.role == "decode":
            instance.import_per_token_s = self.config.kv_transfer.per_token_s
        instance.t = self.now
        if added:
            self.starting -= 1
        per_host = self.config.instances_per_host
        if per_host > 1:
            host = self.instances[index - index % per_host :]
            instance.neighbours = tuple(host)
            for neighbour in host:
                neighbour.neighbours += (instance,)
        self.instances.append(instance)
        self.by_name[stats.name] = instance
        self.ctx.instances[stats.name] = stats
        self.free[tier.role].add(instance)

    def _remove(self, instance: Instance) -> None:
        instance.stats.healthy = False
        del self.ctx.instances[instance.stats.name]

    def _tick(self) -> None:
        """One reading of the real autoscaler: up starts an instance ready after `startup_s`; down drains the least
        loaded instance it added (no new requests; removed once empty)."""
        assert self.autoscaler is not None
        ready = [x for x in self.instances if x.accepting and x.stats.healthy]
        checked, violations = self.load.slo_checked - self.slo_seen[0], self.load.slo_violations - self.slo_seen[1]
        self.slo_seen = (self.load.slo_checked, self.load.slo_violations)
        signals = Signals(
            ready=len(ready),
            starting=self.starting,
            removable=sum(1 for x in ready if x.added),
            waiting=len(self.queue) + sum(len(x.waiting) for x in ready),
            running=sum(x.running for x in ready),
            slots=sum(x.max_seqs for x in ready),
            slo_violation_rate=violations / checked if checked else 0.0,
        )
        decision = self.autoscaler.decide(signals, self.now)
        if decision.delta > 0:
            self.starting += 1
            self._at(self.now + self.config.startup_s, _READY, None, 0)
        elif decision.delta < 0:
            victim = min((x for x in ready if x.added), key=lambda x: (x.stats.running, -x.index))
            victim.accepting = False
            self.free[victim.stats.role].discard(victim)
            if not victim.busy:
                self._remove(victim)
        if decision.delta:
            instances = len(ready) + self.starting + min(decision.delta, 0)
            self.changes.append(
                {"time_s": self.now, "delta": decision.delta, "instances": instances, "reason": decision.reason}
            )
        if self.ended < len(self.prompts):
            self._at(self.now + self.config.autoscale.interval_s, _TICK, None, 0)
