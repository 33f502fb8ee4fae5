"""What a simulation gives back: per request (indexed as the trace) its times, and a summary against SLOs.

TTFT is arrival to first token (the policy queue's wait included), TPOT the mean gap between the later tokens,
e2e arrival to the last token; all NaN for a request that failed (shed by the bounded queue or rejected by its
policy). Goodput is the rate of requests that finished within the SLOs: their count over the simulated time from
the first arrival to the last request's end (vLLM's `bench serve` counts it over its run alike)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SimResult:
    ttft_s: np.ndarray
    tpot_s: np.ndarray  # NaN also for a one-token output: it has no gap between tokens
    e2e_s: np.ndarray
    instance: np.ndarray  # the index of the instance that served it (-1: failed)
    sim_duration_s: float  # simulated seconds from the first arrival to the last end
    wall_s: float  # how long the simulation took on this machine
    ttft_slo_ms: np.ndarray | None = None  # the trace's own per-request TTFT SLOs, when it has them
    autoscale: list[dict[str, Any]] = field(default_factory=list)  # each change: time_s, delta, instances, reason
    info: dict[str, Any] = field(default_factory=dict)  # the configuration and trace, for reports
    policy: Any = None  # the run's `Policy` as it ended, for the counters it keeps (adaptive's switches, ...)

    @property
    def completed(self) -> np.ndarray:
        return ~np.isnan(self.e2e_s)

    def met(self, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> np.ndarray:
        """Which requests finished within the SLOs: `slo_ttft_ms` (else the trace's own, else none) and
        `slo_tpot_ms` (none when None)."""
        ok = self.completed.copy()
        ttft_ms = self.ttft_s * 1000
        if slo_ttft_ms is not None:
            ok &= ttft_ms <= slo_ttft_ms
        elif self.ttft_slo_ms is not None:
            ok &= ttft_ms <= self.ttft_slo_ms
        if slo_tpot_ms is not None:
            ok &= np.isnan(self.tpot_s) | (self.tpot_s * 1000 <= slo_tpot_ms)
        return ok

    def summary(self, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict[str, Any]:
        """The headline numbers (milliseconds for latencies, requests/s for rates); NaN where nothing was measured."""
        n, done = len(self.e2e_s), int(self.completed.sum())
        met = int(self.met(slo_ttft_ms, slo_tpot_ms).sum())
        counts = [int(c) for c in np.bincount(self.instance[self.instance >= 0])] if done else []
        return {
            "requests": n,
            "completed": done,
            "failed": n - done,
            "sim_duration_s": self.sim_duration_s,
            "wall_s": self.wall_s,
            "simulated_requests_per_s": n / self.wall_s if self.wall_s > 0 else math.inf,
            "throughput_rps": done / self.sim_duration_s if self.sim_duration_s > 0 else math.nan,
            "ttft_p50_ms": _percentile(self.ttft_s, 50),
            "ttft_p99_ms": _percentile(self.ttft_s, 99),
            "tpot_p50_ms": _percentile(self.tpot_s, 50),
            "tpot_p99_ms": _percentile(self.tpot_s, 99),
            "e2e_p50_ms": _percentile(self.e2e_s, 50),
            "e2e_p99_ms": _percentile(self.e2e_s, 99),
            "slo_ttft_ms": slo_ttft_ms,
            "slo_tpot_ms": slo_tpot_ms,
            "slo_met": met,
            "slo_attainment": met / n if n else math.nan,
            "goodput_rps": met / self.sim_duration_s if self.sim_duration_s > 0 else math.nan,
            "instances_used": sum(1 for c in counts if c),
            "requests_per_instance_max": max(counts, default=0),
            "autoscale_changes": len(self.autoscale),
            "autoscale": self.autoscale,
        }


def _percentile(values_s: np.ndarray, q: float) -> float:
    finite = values_s[~np.isnan(values_s)]
    return float(np.percentile(finite, q)) * 1000 if len(finite) else math.nan


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (a metric nothing was measured for) as None: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
