"""W6's simulator: many instances (tiers with prefill and decode speeds, slots and prices) on a simulated clock, fed
by the real `PolicySort` operator and routed by the real `load_balanced` strategy, so every scheduling decision is
our code's, and its CPU time a real measurement at that scale; only the service is modelled.

Given its seed a simulation's outcomes are deterministic (events run on the simulated clock, ties in event order,
policies read that clock), so repeats replay fresh traces (seed + repeat): their medians cover trace-to-trace
variation, and the decisions' CPU times, which do vary, are measured once per repeat."""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from sagellm.benchmarks.policy_workload import (
    POLICIES,
    SIM_TIERS,
    Part,
    PolicyRun,
    Tier,
    TrafficClass,
    class_sequence,
    max_queue,
    new_run,
    policy_state,
)
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.pipeline.messages import Request, RequestError


@dataclass
class SimConfig:
    instances: int = 1000
    requests: int = 16000  # per policy, the same trace for each
    tiers: tuple[Tier, ...] = SIM_TIERS
    prompt_median: int = 256  # log-normal lengths, clipped
    output_median: int = 96
    load: float = 2.0
    queue_s: float = 10.0
    seed: int = 0  # repeat r's trace uses seed + r
    repeats: int = 1
    policies: tuple[str, ...] = POLICIES
    progress: bool = True

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")


@dataclass
class SimTrace:
    offsets: list[float]
    classes: list[TrafficClass]
    prompts: list[int]
    outputs: list[int]
    warmup_s: float  # requests arriving earlier are served but not counted: slots and queue are still filling


def tier_counts(config: SimConfig) -> list[int]:
    counts = [round(t.share * config.instances) for t in config.tiers[:-1]]
    return [*counts, config.instances - sum(counts)]


def sim_trace(config: SimConfig, seed: int) -> tuple[SimTrace, float]:
    """The trace of `seed` and the capacity it gives: every slot busy with the trace's mean request, summed over
    instances."""
    from sagellm.operators.replay_source import poisson_offsets

    rng = np.random.default_rng(seed)
    prompts = np.clip(rng.lognormal(math.log(config.prompt_median), 0.8, config.requests), 16, 2048).astype(int)
    outputs = np.clip(rng.lognormal(math.log(config.output_median), 0.6, config.requests), 8, 512).astype(int)
    mean_prompt, mean_output = float(prompts.mean()), float(outputs.mean())
    capacity = sum(
        n * t.max_running / (mean_prompt / t.prefill_tokens_per_s + mean_output / t.decode_tokens_per_s)
        for n, t in zip(tier_counts(config), config.tiers)
    )
    arrival = config.load * capacity
    offsets = poisson_offsets(config.requests, arrival, seed)
    slots = sum(n * t.max_running for n, t in zip(tier_counts(config), config.tiers))
    bound = max_queue(config.queue_s, capacity) or 0
    fill = slots / arrival + (bound / (arrival - capacity) if arrival > capacity else 0.0)
    trace = SimTrace(
        offsets,
        class_sequence(config.requests, rng),
        prompts.tolist(),
        outputs.tolist(),
        float(min(fill, offsets[-1] / 2)),
    )
    return trace, capacity


@dataclass
class _Job:
    request: Request
    cls: TrafficClass
    output: int
    counted: bool  # arrived after the warm-up
    ttft_s: float | None = None


@dataclass
class _Instance:
    stats: Any  # InstanceStats
    tier: Tier
    busy: int = 0
    waiting: deque = field(default_factory=deque)  # routed here while every slot is busy (the engine's queue)

    @property
    def held(self) -> int:
        return self.busy + len(self.waiting)


class Simulation:
    """One policy over the trace. Events are arrivals, first tokens and finishes; after each, the queue pops while
    some instance has a free slot (the executor's "pop when downstream has room")."""

    ARRIVE, FIRST, DONE = 0, 1, 2

    def __init__(self, config: SimConfig, trace: SimTrace, capacity: float, policy: str, repeat: int = 0) -> None:
        from sagellm.operators.policy_sort import PolicySort
        from sagellm.operators.prefix_index import PrefixIndex
        from sagellm.operators.routing import make_strategy
        from sagellm.runtime.pipeline.operator import InstanceStats, OperatorContext

        self.config, self.trace, self.now = config, trace, 0.0
        self.instances: dict[str, _Instance] = {}
        for tier, count in zip(config.tiers, tier_counts(config)):
            for k in range(count):
                stats = InstanceStats(
                    f"{tier.name}-{k}",
                    max_running=tier.max_running,
                    price_per_1k_tokens=tier.price_per_1k_tokens,
                    tokens_per_s=tier.prefill_tokens_per_s,
                )
                self.instances[stats.name] = _Instance(stats, tier)
        ctx = OperatorContext("policy_sort", list(self.instances), {n: i.stats for n, i in self.instances.items()})
        self.load = ctx.load
        self.queue = PolicySort(policy=policy, max_len=max_queue(config.queue_s, capacity))
        self.queue.clock = lambda: self.now
        self.queue.open(ctx)
        self.strategy = make_strategy("load_balanced", prefix_index=PrefixIndex())
        self.candidates = [i.stats for i in self.instances.values()]
        self.free = sum(i.tier.max_running for i in self.instances.values())
        self.jobs: dict[str, _Job] = {}
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.run = new_run(policy, repeat)
        self.cpu_ns: dict[str, list[int]] = {"push": [], "pop": [], "route": []}
        self.queue_at_pop: list[int] = []
        self.progress: Any = None
        self.adaptive = policy == "adaptive"
        self.modes: Counter[str] = Counter()  # adaptive: pops made in each of its modes

    def simulate(self, progress: Any = None) -> PolicyRun:
        """Runs every request to its end; `progress(n)` is told of each ended request."""
        self.progress = progress
        for i, offset in enumerate(self.trace.offsets):
            self._at(offset, self.ARRIVE, i)
        while self.events:
            self.now, _, kind, payload = heapq.heappop(self.events)
            if kind == self.ARRIVE:
                self._arrive(payload)
            elif kind == self.FIRST:
                self._first_token(payload)
            else:
                self._done(payload)
            self._dispatch()
        self.run.stats = self._stats()
        return self.run

    def _at(self, when: float, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, kind, payload))

    def _arrive(self, i: int) -> None:
        cls, prompt = self.trace.classes[i], self.trace.prompts[i]
        request = Request(
            request_id=str(i),
            prompt_token_ids=_tokens(prompt),
            priority=cls.priority,
            sampling=SamplingParams(max_tokens=self.trace.outputs[i]),
            ttft_slo_ms=cls.ttft_slo_ms,
            arrival_time=self.now,
        )
        counted = self.trace.offsets[i] >= self.trace.warmup_s
        self.jobs[request.request_id] = _Job(request, cls, self.trace.outputs[i], counted)
        self.load.in_flight += 1
        started = time.thread_time_ns()
        shed = self.queue.push(request)
        self.cpu_ns["push"].append(time.thread_time_ns() - started)
        for error in shed:
            self._end(error.request_id)

    def _dispatch(self) -> None:
        while self.free > 0 and len(self.queue):
            self.queue_at_pop.append(len(self.queue))
            if self.adaptive:
                self.modes[self.queue.policy.current.name] += 1
            started = time.thread_time_ns()
            item = self.queue.pop()
            self.cpu_ns["pop"].append(time.thread_time_ns() - started)
            if isinstance(item, RequestError):
                self._end(item.request_id)
                continue
            started = time.thread_time_ns()
            instance = self.instances.get(item.instance) if item.instance else None  # pinned by the policy
            if instance is None:
                free = [s for s in self.candidates if not s.saturated]  # self.free > 0: never empty
                instance = self.instances[self.strategy.choose(item, free, []).name]
            self.cpu_ns["route"].append(time.thread_time_ns() - started)
            self._admit(instance, self.jobs[item.request_id])

    def _admit(self, instance: _Instance, job: _Job) -> None:
        """Charged as route charges; started at once if a slot is free, else queued on the instance."""
        stats, prompt = instance.stats, job.request.num_prompt_tokens
        stats.running += 1
        stats.queued_prefill_tokens += prompt
        stats.queued_decode_tokens += job.output
        job.request.instance = stats.name
        if instance.held < instance.tier.max_running:
            self.free -= 1
        if instance.busy < instance.tier.max_running:
            self._start(instance, job)
        else:
            instance.waiting.append(job)

    def _start(self, instance: _Instance, job: _Job) -> None:
        instance.busy += 1
        first = self.now + job.request.num_prompt_tokens / instance.tier.prefill_tokens_per_s
        self._at(first, self.FIRST, job)
        self._at(first + job.output / instance.tier.decode_tokens_per_s, self.DONE, job)

    def _first_token(self, job: _Job) -> None:
        self.instances[job.request.instance].stats.queued_prefill_tokens -= job.request.num_prompt_tokens
        job.ttft_s = self.now - job.request.arrival_time

    def _done(self, job: _Job) -> None:
        instance = self.instances[job.request.instance]
        stats = instance.stats
        stats.running -= 1
        stats.queued_decode_tokens -= job.output
        instance.busy -= 1
        if instance.waiting:
            self._start(instance, instance.waiting.popleft())
        elif instance.busy < instance.tier.max_running:
            self.free += 1
        self._end(job.request.request_id)

    def _end(self, rid: str) -> None:
        """A request's terminal item: its class tally, and the load counters adaptive reads, counted as the
        executor counts them (a shed request fails and has no SLO verdict)."""
        job = self.jobs.pop(rid)
        self.load.in_flight -= 1
        if job.ttft_s is None:
            self.load.failed += 1
        else:
            self.load.completed += 1
            self.load.slo_checked += 1
            self.load.slo_violations += job.ttft_s * 1000 > job.cls.ttft_slo_ms
        if job.counted:
            self.run.record(job.cls, job.ttft_s)
        if self.progress is not None:
            self.progress(1)

    def _stats(self) -> dict[str, float | str]:
        stats: dict[str, float | str] = {}
        for kind, values in self.cpu_ns.items():
            us = np.array(values or [0]) / 1000
            stats |= {f"{kind}_us_mean": float(us.mean()), f"{kind}_us_p99": float(np.percentile(us, 99))}
            stats[f"{kind}_calls"] = len(values)
        stats["policy_cpu_s"] = (sum(self.cpu_ns["push"]) + sum(self.cpu_ns["pop"])) / 1e9
        stats["queue_len_at_pop_mean"] = float(np.mean(self.queue_at_pop)) if self.queue_at_pop else 0.0
        stats |= {f"adaptive_pops_{mode}": n for mode, n in self.modes.items()}
        return stats | policy_state(self.queue)


_TOKENS: dict[int, list[int]] = {}


def _tokens(n: int) -> list[int]:
    """A prompt of `n` tokens, shared by every request of that length (policies only read its length)."""
    return _TOKENS.setdefault(n, [0] * n)


def run_sim(config: SimConfig) -> Part:
    """Per repeat a fresh trace (seed + repeat), every policy over it, each in a fresh simulation."""
    part = Part("sim", _sim_json(config))
    for repeat in range(config.repeats):
        seed = config.seed + repeat
        trace, capacity = sim_trace(config, seed)
        part.traces.append(_trace_json(config, seed, trace, capacity))
        for policy in config.policies:
            desc = f"sim {policy}" if config.repeats == 1 else f"sim {policy} run {repeat + 1}/{config.repeats}"
            with tqdm(total=config.requests, desc=desc, unit="req", disable=not config.progress) as bar:
                started = time.perf_counter()
                run = Simulation(config, trace, capacity, policy, repeat).simulate(bar.update)
            run.stats["wall_s"] = time.perf_counter() - started
            part.runs.append(run)
    return part


def _sim_json(config: SimConfig) -> dict[str, Any]:
    keys = ("instances", "requests", "prompt_median", "output_median", "load", "queue_s", "seed", "repeats")
    return {k: getattr(config, k) for k in keys} | {
        "tiers": [vars(t) | {"instances": n} for t, n in zip(config.tiers, tier_counts(config))],
        "routing": "load_balanced among instances with a free slot; a request its policy pinned keeps its instance",
    }


def _trace_json(config: SimConfig, seed: int, trace: SimTrace, capacity: float) -> dict[str, Any]:
    return {
        "seed": seed,
        "capacity_rps": capacity,
        "arrival_rps": config.load * capacity,
        "max_queue": max_queue(config.queue_s, capacity),
        "warmup_s": trace.warmup_s,
        "counted_requests": sum(offset >= trace.warmup_s for offset in trace.offsets),
        "duration_s": trace.offsets[-1],
    }
