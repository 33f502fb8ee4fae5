"""W6's workload and tallies, shared by the real-engine part (`policies`) and the simulated one (`policy_sim`): the
three priority classes with their TTFT SLOs, per-policy attainment counts, and their medians over repeats (each repeat
a fresh trace through every policy)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sagellm.benchmarks.report import median_summary

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


@dataclass
class ClassTally:
    requests: int = 0
    met: int = 0
    shed: int = 0  # ended without a first token (shed by the queue, or another error)
    ttft_s: list[float] = field(default_factory=list)


@dataclass
class PolicyRun:
    """One policy on one repeat's trace: per-class outcomes, and what the policy itself reports or cost."""

    policy: str
    tallies: dict[str, ClassTally]
    stats: dict[str, float | str] = field(default_factory=dict)
    repeat: int = 0

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
            p50, p99 = percentiles(t.ttft_s)
            classes[name] = dict(requests=t.requests, met=t.met, shed=t.shed, attainment=self.attainment(name))
            classes[name] |= dict(ttft_p50_ms=p50, ttft_p99_ms=p99)
        head = {"policy": self.policy, "repeat": self.repeat, "overall": self.attainment()}
        return head | {"classes": classes, "stats": self.stats}


# Summed over repeats, not medianed: request counts per class, and stats (by prefix) that count requests or pops.
SUMMED_CLASS_KEYS = ("requests", "met", "shed")
SUMMED_STATS = ("engine_slo_met", "errors_", "adaptive_pops_")


def median_run(runs: list[PolicyRun]) -> dict[str, Any]:
    """One policy over its repeats, in `PolicyRun.to_json`'s shape: each number's median (None where no repeat
    measured it), counts summed; text stats (adaptive's final mode) stay with each repeat's own numbers in "runs"."""
    rows = [r.to_json() for r in runs]
    classes = {c: median_summary([row["classes"][c] for row in rows], SUMMED_CLASS_KEYS) for c in rows[0]["classes"]}
    numbers = [{k: v for k, v in row["stats"].items() if not isinstance(v, str)} for row in rows]
    summed = {k for stats in numbers for k in stats if k.startswith(SUMMED_STATS)}
    overall = median_summary([{"overall": row["overall"]} for row in rows])["overall"]
    head = {"policy": runs[0].policy, "overall": overall, "classes": classes}
    return head | {"stats": median_summary(numbers, summed), "runs": rows}


@dataclass
class Part:
    """The real-engine or the simulated half of the report: each repeat's trace and every policy's run on it."""

    name: str
    config: dict[str, Any]
    traces: list[dict[str, Any]] = field(default_factory=list)  # per repeat: seed, capacity_rps, arrival_rps, ...
    runs: list[PolicyRun] = field(default_factory=list)  # in run order: every policy on repeat 0, then on 1, ...

    def trace_medians(self) -> dict[str, float | None]:
        """The traces' facts, medians over repeats (the real part measures capacity once: one value)."""
        return median_summary(self.traces, summed=())

    @property
    def capacity_rps(self) -> float:
        return self.trace_medians()["capacity_rps"]

    @property
    def arrival_rps(self) -> float:
        return self.trace_medians()["arrival_rps"]

    @property
    def max_queue(self) -> float | None:
        return self.trace_medians()["max_queue"]

    def medians(self) -> list[dict[str, Any]]:
        """Per policy, in run order: `median_run` of its repeats."""
        policies = dict.fromkeys(r.policy for r in self.runs)
        return [median_run([r for r in self.runs if r.policy == policy]) for policy in policies]

    def to_json(self) -> dict[str, Any]:
        head = dict(config=self.config, capacity_rps=self.capacity_rps, arrival_rps=self.arrival_rps)
        return head | {"max_queue": self.max_queue, "traces": self.traces, "results": self.medians()}


def class_sequence(count: int, rng: np.random.Generator) -> list[TrafficClass]:
    """Exactly the classes' shares of `count` (rounded, the rest low), shuffled."""
    counts = [round(c.share * count) for c in CLASSES[:-1]]
    sequence = [c for c, n in zip(CLASSES, counts) for _ in range(n)] + [CLASSES[-1]] * (count - sum(counts))
    return [sequence[i] for i in rng.permutation(count)]


def max_queue(queue_s: float, capacity_rps: float) -> int | None:
    return max(1, round(queue_s * capacity_rps)) if queue_s > 0 else None


def new_run(policy: str, repeat: int) -> PolicyRun:
    return PolicyRun(policy, {c.name: ClassTally() for c in CLASSES}, repeat=repeat)


def percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    p50, p99 = np.percentile(values, [50, 99])
    return 1000 * float(p50), 1000 * float(p99)


def policy_state(policy: Any) -> dict[str, float | str]:
    """Counters a policy keeps: adaptive's switches (and where it ended), cost_optimized's predicted misses."""
    stats: dict[str, float | str] = {}
    if hasattr(policy, "switches"):
        stats["adaptive_switches"] = policy.switches
        stats["adaptive_final"] = policy.current.name
    if hasattr(policy, "slo_misses"):
        stats["cost_slo_misses"] = policy.slo_misses
    return stats
