"""W6's workload and tallies, shared by the real-engine part (`policies`) and the simulator (`policy_sim`): the three
priority classes with their TTFT SLOs, the simulator's instance tiers, and per-policy attainment counts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
            p50, p99 = percentiles(t.ttft_s)
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


def percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    p50, p99 = np.percentile(values, [50, 99])
    return 1000 * float(p50), 1000 * float(p99)


def policy_state(queue: Any) -> dict[str, float | str]:
    """Counters the policies keep: adaptive's switches (and where it ended), cost_optimized's predicted misses."""
    policy, stats = queue.policy, {}
    if hasattr(policy, "switches"):
        stats["adaptive_switches"] = policy.switches
        stats["adaptive_final"] = policy.current.name
    if hasattr(policy, "slo_misses"):
        stats["cost_slo_misses"] = policy.slo_misses
    return stats
