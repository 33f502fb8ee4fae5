"""The scheduling benchmark (W6): SLO attainment per priority class under 2× overload, for every `policy_sort` policy.

Three classes arrive as one Poisson stream at `load` × capacity: 20% high (priority 0, TTFT SLO 1 s), 30% normal
(1, 5 s), 50% low (2, 20 s). A request meets its SLO when its first token comes within its class's TTFT; a shed
request misses it. Both parts run the real policy code on the same arrival trace for every policy:
- real: SmolLM2 through the local executor, replay_source → admission → policy_sort → route → engine →
  metrics_sink. Capacity is measured first in the same run (closed loop), then the Poisson trace replays.
- sim: a discrete-event simulation of many instances (tiers with prefill and decode speeds, slots and prices)
  fed by the real `PolicySort` operator, whose policy reads the simulated `InstanceStats`, load and clock, and
  routed by the real `load_balanced` strategy among the instances with a free slot (a request its policy pinned
  keeps its instance, free or not). Service is modelled, the decisions are not, so each decision's CPU time is a
  real measurement of our code at that scale. Requests arriving while slots and queue still fill are not counted.
The simulator's queue is bounded to `queue_s` seconds of capacity (`max_len`), so under sustained overload it sheds
by the policy's own order, as a deployed graph does. The real part's is unbounded by default: in the local executor
a shed error waits in route for a free engine slot, which stalls the source and bunches arrivals."""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sagellm.messages import Request, RequestError
from sagellm.sampling_params import SamplingParams

POLICIES = ("fifo", "priority", "slo_aware", "cost_optimized", "adaptive")


@dataclass(frozen=True)
class TrafficClass:
    """A priority class of W6: its share of arrivals and the TTFT its requests must meet."""

    name: str
    priority: int
    share: float
    ttft_slo_ms: float


CLASSES = (
    TrafficClass("high", 0, 0.2, 1000.0),
    TrafficClass("normal", 1, 0.3, 5000.0),
    TrafficClass("low", 2, 0.5, 20000.0),
)


@dataclass(frozen=True)
class Tier:
    """A kind of simulated instance. Each of its `max_running` slots serves one request at a time: the prompt at
    `prefill_tokens_per_s` (then the first token), the output at `decode_tokens_per_s`."""

    name: str
    share: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    max_running: int
    price_per_1k_tokens: float


SIM_TIERS = (
    Tier("fast", 0.2, 4000.0, 12.0, 4, 2.0),
    Tier("standard", 0.5, 2000.0, 6.0, 4, 1.0),
    Tier("economy", 0.3, 1000.0, 3.0, 4, 0.5),
)


@dataclass
class ClassTally:
    requests: int = 0
    met: int = 0
    shed: int = 0  # ended without a first token (shed by the queue, or another error)
    ttft_s: list[float] = field(default_factory=list)


@dataclass
class PolicyRun:
    """One policy on the trace: per-class outcomes, and what the policy itself reports or cost."""

    policy: str
    tallies: dict[str, ClassTally]
    stats: dict[str, float | str] = field(default_factory=dict)

    def attainment(self, name: str | None = None) -> float:
        tallies = [self.tallies[name]] if name else list(self.tallies.values())
        total = sum(t.requests for t in tallies)
        return sum(t.met for t in tallies) / total if total else math.nan

    def record(self, cls: TrafficClass, ttft_s: float | None) -> None:
        tally = self.tallies[cls.name]
        tally.requests += 1
        if ttft_s is None:
            tally.shed += 1
            return
        tally.ttft_s.append(ttft_s)
        tally.met += ttft_s * 1000 <= cls.ttft_slo_ms

    def to_json(self) -> dict[str, Any]:
        classes = {}
        for name, t in self.tallies.items():
            p50, p99 = _percentiles(t.ttft_s)
            classes[name] = dict(requests=t.requests, met=t.met, shed=t.shed, attainment=self.attainment(name))
            classes[name] |= dict(ttft_p50_ms=p50, ttft_p99_ms=p99)
        return {"policy": self.policy, "overall": self.attainment(), "classes": classes, "stats": self.stats}


@dataclass
class Part:
    """The real-engine or the simulated half of the report."""

    name: str
    config: dict[str, Any]
    capacity_rps: float
    arrival_rps: float
    max_queue: int | None
    runs: list[PolicyRun] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        head = dict(config=self.config, capacity_rps=self.capacity_rps, arrival_rps=self.arrival_rps)
        return head | {"max_queue": self.max_queue, "results": [r.to_json() for r in self.runs]}


def class_sequence(count: int, rng: np.random.Generator) -> list[TrafficClass]:
    """Exactly the classes' shares of `count` (rounded, the rest low), shuffled."""
    counts = [round(c.share * count) for c in CLASSES[:-1]]
    sequence = [c for c, n in zip(CLASSES, counts) for _ in range(n)] + [CLASSES[-1]] * (count - sum(counts))
    return [sequence[i] for i in rng.permutation(count)]


def max_queue(queue_s: float, capacity_rps: float) -> int | None:
    return max(1, round(queue_s * capacity_rps)) if queue_s > 0 else None


def new_run(policy: str) -> PolicyRun:
    return PolicyRun(policy, {c.name: ClassTally() for c in CLASSES})


def _percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    p50, p99 = np.percentile(values, [50, 99])
    return 1000 * float(p50), 1000 * float(p99)


def _policy_state(queue: Any) -> dict[str, float | str]:
    """Counters the policies keep: adaptive's switches (and where it ended), cost_optimized's predicted misses."""
    policy, stats = queue.policy, {}
    if hasattr(policy, "switches"):
        stats["adaptive_switches"] = policy.switches
        stats["adaptive_final"] = policy.current.name
    if hasattr(policy, "slo_misses"):
        stats["cost_slo_misses"] = policy.slo_misses
    return stats


# -- real engine ------------------------------------------------------------------------------------------------


@dataclass
class RealConfig:
    model: str = "smollm2-135m-instruct"
    requests: int = 100  # per policy, the same trace for each
    capacity_requests: int = 24  # closed-loop requests of the capacity measurement
    prompt_len: int = 64
    output_len: int = 16  # short enough that 3 slot releases (see `_caption`) take about the high class's 1 s
    max_num_seqs: int = 4
    load: float = 2.0  # arrival rate / measured capacity
    queue_s: float = 0.0  # unbounded: a shed error waits for a free engine slot in route, stalling the source
    threads: int | None = None
    seed: int = 0
    policies: tuple[str, ...] = POLICIES
    progress: bool = True


def run_real(config: RealConfig) -> Part:
    """Capacity first (closed loop at 2 × max_num_seqs in flight), then the Poisson trace once per policy."""
    from sagellm.bench.workloads import random_token_prompts
    from sagellm.model_cache import resolve_model
    from sagellm.operators.replay_source import poisson_offsets
    from sagellm.runtime.executor.local import model_attrs

    model = str(resolve_model(config.model))
    attrs = model_attrs(model)  # once: every run reuses the tokenizer and config
    prompts = random_token_prompts(
        attrs["tokenizer"], config.capacity_requests + config.requests, config.prompt_len, config.seed
    )
    warm, trace = prompts[: config.capacity_requests], prompts[config.capacity_requests :]
    capacity = _measure_capacity(config, model, attrs, warm)
    rng = np.random.default_rng(config.seed)
    classes = class_sequence(config.requests, rng)
    arrival = config.load * capacity
    offsets = poisson_offsets(config.requests, arrival, config.seed)
    bound = max_queue(config.queue_s, capacity)
    part = Part("real", _real_json(config, model), capacity, arrival, bound)
    for policy in config.policies:
        requests = [_request(f"w6-{i}", p, config, c) for i, (p, c) in enumerate(zip(trace, classes))]
        run = new_run(policy)
        result, started = _replay(config, model, attrs, policy, bound, requests, offsets, None, policy)
        engine_met = 0
        for request, cls in zip(requests, classes):
            # The replay source stamps each request with its intended arrival, so TTFT is what a client sees,
            # source backpressure included, and the engine's own slo_met agrees with it.
            outcome = result.outcomes[request.request_id]
            served = outcome.error is None and outcome.metrics is not None and outcome.metrics.ttft_s is not None
            run.record(cls, outcome.metrics.ttft_s if served else None)
            engine_met += bool(served and outcome.metrics.slo_met)
        run.stats = {"wall_s": time.time() - started, "engine_slo_met": engine_met}
        run.stats |= _policy_state(result.operators["policy_sort"])
        run.stats["engine_tokens_per_s_estimate"] = result.operators["engine"].stats.tokens_per_s
        codes = Counter(o.error.code for o in result.outcomes.values() if o.error is not None)
        run.stats |= {f"errors_{code}": n for code, n in sorted(codes.items())}
        part.runs.append(run)
    return part


def _request(rid: str, prompt: list[int], config: RealConfig, cls: TrafficClass | None) -> Request:
    sampling = SamplingParams(max_tokens=config.output_len, ignore_eos=True, temperature=0.0)
    if cls is None:
        return Request(request_id=rid, prompt_token_ids=list(prompt), sampling=sampling, priority=1)
    return Request(
        request_id=rid,
        prompt_token_ids=list(prompt),
        sampling=sampling,
        priority=cls.priority,
        ttft_slo_ms=cls.ttft_slo_ms,
    )


def _measure_capacity(config: RealConfig, model: str, attrs: dict[str, Any], prompts: list[list[int]]) -> float:
    """Completed requests/s in steady state: from the `max_num_seqs`-th finish to the last."""
    requests = [_request(f"cap-{i}", p, config, None) for i, p in enumerate(prompts)]
    result, _ = _replay(config, model, attrs, "fifo", None, requests, None, 2 * config.max_num_seqs, "capacity")
    finishes = sorted(r.arrival_time + result.outcomes[r.request_id].metrics.e2e_s for r in requests)
    first = min(config.max_num_seqs, len(finishes) - 1) - 1
    if first < 0 or finishes[-1] <= finishes[first]:
        raise RuntimeError(f"capacity: need more than {config.max_num_seqs} requests to measure steady throughput")
    return (len(finishes) - 1 - first) / (finishes[-1] - finishes[first])


def _replay(
    config: RealConfig,
    model: str,
    attrs: dict[str, Any],
    policy: str,
    bound: int | None,
    requests: list[Request],
    offsets: list[float] | None,
    max_in_flight: int | None,
    label: str,
) -> tuple[Any, float]:
    """One pass of the graph over `requests`; returns the result and when the replay started (after loading)."""
    import trio

    from sagellm.dsl import Pipeline
    from sagellm.operators.replay_source import ReplaySource
    from sagellm.runtime.executor.local import LocalExecutor

    p = Pipeline("w6", model=model)
    engine = dict(max_num_seqs=config.max_num_seqs, num_threads=config.threads)
    nodes = [
        p.add("replay_source", id="source"),
        p.add("admission"),
        p.add("policy_sort", policy=policy, max_len=bound),
        p.add("route"),
        p.add("engine", **engine),
        p.add("metrics_sink"),
    ]
    p.chain(*nodes)
    source = ReplaySource(requests, offsets_s=offsets, max_in_flight=max_in_flight)
    executor = LocalExecutor(p.graph(), operators={"source": source}, graph_attrs=attrs)

    async def main() -> tuple[Any, float]:
        await executor.open_operators()  # the engine loads here, outside the timed replay
        with tqdm(total=len(requests), desc=f"real {label}", unit="req", disable=not config.progress) as bar:
            executor.on_terminal = lambda _: bar.update(1)
            started = time.time()
            return await executor.run(), started

    return trio.run(main)


def _real_json(config: RealConfig, model: str) -> dict[str, Any]:
    keys = ("requests", "capacity_requests", "prompt_len", "output_len", "max_num_seqs", "load", "queue_s", "seed")
    return {"model": model, "weights": "float32 (a GGUF is dequantized)"} | {k: getattr(config, k) for k in keys}


# -- simulator ----------------------------------------------------------------------------------------------------


@dataclass
class SimConfig:
    instances: int = 1000
    requests: int = 16000  # per policy, the same trace for each
    tiers: tuple[Tier, ...] = SIM_TIERS
    prompt_median: int = 256  # log-normal lengths, clipped
    output_median: int = 96
    load: float = 2.0
    queue_s: float = 10.0
    seed: int = 0
    policies: tuple[str, ...] = POLICIES
    progress: bool = True


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


def sim_trace(config: SimConfig) -> tuple[SimTrace, float]:
    """The trace and the capacity it gives: every slot busy with the trace's mean request, summed over instances."""
    from sagellm.operators.replay_source import poisson_offsets

    rng = np.random.default_rng(config.seed)
    prompts = np.clip(rng.lognormal(math.log(config.prompt_median), 0.8, config.requests), 16, 2048).astype(int)
    outputs = np.clip(rng.lognormal(math.log(config.output_median), 0.6, config.requests), 8, 512).astype(int)
    mean_prompt, mean_output = float(prompts.mean()), float(outputs.mean())
    capacity = sum(
        n * t.max_running / (mean_prompt / t.prefill_tokens_per_s + mean_output / t.decode_tokens_per_s)
        for n, t in zip(tier_counts(config), config.tiers)
    )
    arrival = config.load * capacity
    offsets = poisson_offsets(config.requests, arrival, config.seed)
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

    def __init__(self, config: SimConfig, trace: SimTrace, capacity: float, policy: str) -> None:
        from sagellm.operators.base import InstanceStats, OperatorContext
        from sagellm.operators.policy_sort import PolicySort
        from sagellm.operators.prefix_index import PrefixIndex
        from sagellm.operators.routing import make_strategy

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
        self.run = new_run(policy)
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
        return stats | _policy_state(self.queue)


_TOKENS: dict[int, list[int]] = {}


def _tokens(n: int) -> list[int]:
    """A prompt of `n` tokens, shared by every request of that length (policies only read its length)."""
    return _TOKENS.setdefault(n, [0] * n)


def run_sim(config: SimConfig) -> Part:
    """Every policy over one trace, each in a fresh simulation."""
    trace, capacity = sim_trace(config)
    part = Part("sim", _sim_json(config, trace), capacity, config.load * capacity, max_queue(config.queue_s, capacity))
    for policy in config.policies:
        with tqdm(total=config.requests, desc=f"sim {policy}", unit="req", disable=not config.progress) as bar:
            started = time.perf_counter()
            run = Simulation(config, trace, capacity, policy).simulate(bar.update)
        run.stats["wall_s"] = time.perf_counter() - started
        part.runs.append(run)
    return part


def _sim_json(config: SimConfig, trace: SimTrace) -> dict[str, Any]:
    counted = sum(offset >= trace.warmup_s for offset in trace.offsets)
    keys = ("instances", "requests", "prompt_median", "output_median", "load", "queue_s", "seed")
    return {k: getattr(config, k) for k in keys} | {
        "tiers": [vars(t) | {"instances": n} for t, n in zip(config.tiers, tier_counts(config))],
        "warmup_s": trace.warmup_s,
        "counted_requests": counted,
        "duration_s": trace.offsets[-1],
        "routing": "load_balanced among instances with a free slot; a request its policy pinned keeps its instance",
    }


# -- report -------------------------------------------------------------------------------------------------------

DEFINITIONS = {
    "attainment": "requests of the class whose first token came within its TTFT SLO / all requests of the class",
    "shed": "requests that ended without a first token (shed by the bounded queue by the policy's order)",
    "max_queue": "policy_sort max_len = queue_s x measured capacity (None: unbounded)",
    "capacity_rps": "real: closed-loop completed requests/s at 2 x max_num_seqs in flight, from the "
    "max_num_seqs-th finish on; sim: sum over instances of slots / mean service time of the trace's requests",
    "pop_us": "sim: thread CPU time of one policy_sort.pop (the policy's decision), microseconds",
    "push_us": "sim: thread CPU time of one policy_sort.push, including the shed when the queue is full",
    "route_us": "sim: thread CPU time of one routing decision (load_balanced over the instances with a free slot)",
    "sim_service": "each slot serves one request: prompt / prefill tokens/s to the first token, then output / "
    "decode tokens/s; requests routed to a busy instance wait in its own FIFO",
}


def report_json(parts: list[Part], machine: dict[str, object], command: str, elapsed_s: float) -> dict[str, Any]:
    classes = [vars(c) for c in CLASSES]
    head = {"benchmark": "W6 scheduling under overload", "classes": classes, "machine": machine}
    body = {part.name: part.to_json() for part in parts}
    return head | body | {"definitions": DEFINITIONS, "command": command, "elapsed_s": elapsed_s}


def print_tables(parts: list[Part], machine: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    for part in parts:
        heads = [f"{c.name} ({c.ttft_slo_ms / 1000:g} s)" for c in CLASSES]
        table = Table("policy", *heads, "overall", "shed", "TTFT p50 high ms", title=_title(part))
        sim = part.name == "sim"
        if sim:
            for column in ("pop µs mean", "pop µs p99", "push µs mean", "queue at pop", "wall s"):
                table.add_column(column)
        for run in part.runs:
            cells = [f"{100 * run.attainment(c.name):.0f}%" for c in CLASSES]
            shed = sum(t.shed for t in run.tallies.values())
            cells += [f"{100 * run.attainment():.1f}%", str(shed), _ms(_percentiles(run.tallies["high"].ttft_s)[0])]
            if sim:
                st = run.stats
                cells += [f"{st['pop_us_mean']:.1f}", f"{st['pop_us_p99']:.0f}", f"{st['push_us_mean']:.1f}"]
                cells += [f"{st['queue_len_at_pop_mean']:.0f}", f"{st['wall_s']:.1f}"]
            table.add_row(_label(run), *cells)
        table.caption = _caption(part, machine)
        console.print(table)


def _label(run: PolicyRun) -> str:
    """adaptive with its switches, and the mode that made most pops (sim) or the one it ended in (real)."""
    if "adaptive_switches" not in run.stats:
        return run.policy
    pops = {k.removeprefix("adaptive_pops_"): v for k, v in run.stats.items() if k.startswith("adaptive_pops_")}
    if pops:
        mode = max(pops, key=pops.__getitem__)
        where = f"{100 * pops[mode] / sum(pops.values()):.0f}% of pops as {mode}"
    else:
        where = f"ended as {run.stats['adaptive_final']}"
    return f"{run.policy} ({int(run.stats['adaptive_switches'])} switches, {where})"


def _ms(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.0f}"


def _title(part: Part) -> str:
    c = part.config
    bound = part.max_queue if part.max_queue is not None else "unbounded"
    if part.name == "real":
        what = f"real engine, {Path(c['model']).name}, max_num_seqs {c['max_num_seqs']}, {c['requests']} requests"
    else:
        what = f"simulator, {c['instances']} instances, {c['counted_requests']} of {c['requests']} requests counted"
    return (
        f"W6 {what}: capacity {part.capacity_rps:.2f} req/s, arrivals {part.arrival_rps:.2f} req/s "
        f"(Poisson), queue bound {bound}"
    )


def _caption(part: Part, machine: dict[str, object]) -> str:
    c = part.config
    if part.name == "real":
        shape = f"{c['prompt_len']}-token prompts, {c['output_len']} output tokens (ignore_eos), fp32 weights"
        # policy_sort and route each hold one popped request while the engine is full (rendezvous channels), so
        # even a request the policy puts first waits for about three slot releases
        shape += f"; TTFT floor under load ≈ 3 / capacity = {3 / part.capacity_rps:.2f} s"
    else:
        shape = f"log-normal prompts (median {c['prompt_median']}) and outputs (median {c['output_median']})"
        shape += f"; warm-up {c['warmup_s']:.1f} s of {c['duration_s']:.1f} s not counted; CPU µs per call"
    return f"{shape}; {machine['cpu']}, {machine['cores']} cores, shared machine"


def plot(parts: list[Part], path: Path) -> None:
    """One panel per part: for each policy, bars of attainment per class and overall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*(c.name for c in CLASSES), "overall"]
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.6), squeeze=False)
    width = 0.8 / len(groups)
    for ax, part in zip(axes[0], parts):
        for g, group in enumerate(groups):
            values = [100 * run.attainment(None if group == "overall" else group) for run in part.runs]
            xs = [x + (g - (len(groups) - 1) / 2) * width for x in range(len(part.runs))]
            bars = ax.bar(xs, values, width, label=group, color="0.4" if group == "overall" else f"C{g}")
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        ax.set_xticks(range(len(part.runs)), [r.policy for r in part.runs], fontsize=9)
        ax.set_ylim(0, 110)
        ax.set_ylabel("SLO attainment % (higher is better)")
        name = "real engine" if part.name == "real" else f"simulator, {part.config['instances']} instances"
        bound = f"queue bound {part.max_queue}" if part.max_queue is not None else "unbounded queue"
        ax.set_title(f"{name}: arrivals {part.arrival_rps / part.capacity_rps:.1f}× capacity, {bound}", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=len(groups), fontsize=9)
    slos = ", ".join(f"{c.name} {c.ttft_slo_ms / 1000:g} s ({100 * c.share:.0f}%)" for c in CLASSES)
    fig.suptitle(f"W6 scheduling under overload: TTFT SLOs {slos}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n", 1)[0]
    parser.add_argument("--parts", default="real,sim", help="comma list of real,sim (default: %(default)s)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma list of %(default)s")
    parser.add_argument("--model", "-m", default=RealConfig.model, help="real: model path or alias (%(default)s)")
    parser.add_argument("--requests", type=int, default=RealConfig.requests, help="real: requests per policy")
    parser.add_argument(
        "--capacity-requests",
        type=int,
        default=RealConfig.capacity_requests,
        help="real: closed-loop requests measuring capacity (default: %(default)s)",
    )
    parser.add_argument("--prompt-len", type=int, default=RealConfig.prompt_len, help="real: prompt tokens")
    parser.add_argument("--output-len", type=int, default=RealConfig.output_len, help="real: output tokens")
    parser.add_argument("--max-num-seqs", type=int, default=RealConfig.max_num_seqs, help="real: engine slots")
    parser.add_argument("--threads", type=int, default=None, help="real: torch threads (default: all cores)")
    parser.add_argument("--sim-instances", type=int, default=SimConfig.instances, help="sim: instances")
    parser.add_argument("--sim-requests", type=int, default=SimConfig.requests, help="sim: requests per policy")
    parser.add_argument("--load", type=float, default=2.0, help="arrival rate / capacity (default: %(default)s)")
    parser.add_argument(
        "--queue-seconds",
        type=float,
        default=SimConfig.queue_s,
        help="sim: queue bound in seconds of capacity; 0: unbounded (default: %(default)s)",
    )
    parser.add_argument(
        "--real-queue-seconds",
        type=float,
        default=RealConfig.queue_s,
        help="real: queue bound in seconds of capacity; 0: unbounded (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/policies"),
        help="writes OUT.json and OUT.png (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--log-level", default="warning")


def run(args: argparse.Namespace) -> int:
    import torch

    from sagellm.bench.offline import machine_info

    started = time.perf_counter()
    parts_wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    unknown = sorted(set(parts_wanted) - {"real", "sim"}) + sorted(set(policies) - set(POLICIES))
    if unknown or not parts_wanted or not policies:
        print(f"error: unknown or no parts/policies {unknown}; parts: real, sim; policies: {POLICIES}", file=sys.stderr)
        return 2
    common = dict(load=args.load, seed=args.seed, policies=policies, progress=not args.no_progress)
    parts: list[Part] = []
    if "real" in parts_wanted:
        real = RealConfig(
            model=args.model,
            requests=args.requests,
            capacity_requests=args.capacity_requests,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            max_num_seqs=args.max_num_seqs,
            threads=args.threads,
            queue_s=args.real_queue_seconds,
            **common,
        )
        parts.append(run_real(real))
    if "sim" in parts_wanted:
        parts.append(
            run_sim(
                SimConfig(
                    instances=args.sim_instances, requests=args.sim_requests, queue_s=args.queue_seconds, **common
                )
            )
        )
    machine = machine_info(args.threads or torch.get_num_threads())
    print_tables(parts, machine)
    results = report_json(parts, machine, _command(args), time.perf_counter() - started)
    json_path, png_path = args.out.with_suffix(".json"), args.out.with_suffix(".png")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_finite(results), indent=2, allow_nan=False) + "\n")
    plot(parts, png_path)
    print(f"results: {json_path}\nchart: {png_path}", file=sys.stderr)
    return 0


FLAGS = ("parts", "policies", "model", "requests", "capacity_requests", "prompt_len", "output_len", "max_num_seqs")
FLAGS += ("threads", "sim_instances", "sim_requests", "load", "queue_seconds", "real_queue_seconds", "seed")


def _command(args: argparse.Namespace) -> str:
    """The run spelled out with every option that changes what is measured, so its numbers can be reproduced."""
    import shlex

    parts = ["sagellm", "bench", "policies"]
    for flag in FLAGS:
        if getattr(args, flag) is not None:
            parts += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return " ".join(shlex.quote(p) for p in parts)


def _finite(value: Any) -> Any:
    """JSON has no NaN: a metric with nothing to measure (no request of a class served) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
