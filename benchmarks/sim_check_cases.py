"""What `sagellm bench sim-check` checks and the numbers it compares: the workloads (W4- and W6-sized traces), the
run's settings, the calibrated models the simulations use, and one workload's trace served for real and simulated,
its metrics and their relative errors (`sim_check` describes the whole check).

A p99 of ~40 requests is one or two of them, which moves by more than the tolerance between repeats of the real
engine alone: p50 and mean are judged, a p99 only when it passes anyway (`judged`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sagellm.benchmarks.kv_handover import HandoverCalibration
from sagellm.benchmarks.step_times import Calibration
from sagellm.simulator.step_model import StepModel
from sagellm.simulator.traces import Trace


@dataclass(frozen=True)
class Workload:
    """One trace: Poisson arrivals at `load` × the model's capacity; a `long_fraction` of prompts `long_len` tokens,
    the rest `short_len`; `output_len` tokens each (EOS ignored); the engine runs `max_num_seqs` at once; served by
    each of `configs` (the W4 benchmark's graphs: colocated, pd)."""

    name: str
    requests: int
    load: float
    short_len: int
    long_len: int
    long_fraction: float
    output_len: int
    max_num_seqs: int
    configs: tuple[str, ...] = ("colocated",)


WORKLOADS = (
    Workload(
        "W4",
        requests=40,
        load=0.7,
        short_len=64,
        long_len=1024,
        long_fraction=0.2,
        output_len=64,
        max_num_seqs=16,
        configs=("colocated", "pd"),
    ),  # fmt: skip
    Workload("W6", requests=120, load=2.0, short_len=64, long_len=64, long_fraction=0.0, output_len=16, max_num_seqs=4),
)
METRICS = (  # (key, header): milliseconds over the completed requests
    ("ttft_p50_ms", "TTFT p50"),
    ("ttft_p99_ms", "TTFT p99"),
    ("ttft_mean_ms", "TTFT mean"),
    ("tpot_p50_ms", "TPOT p50"),
    ("tpot_p99_ms", "TPOT p99"),
    ("tpot_mean_ms", "TPOT mean"),
)


@dataclass(frozen=True)
class SimCheckConfig:
    model: str  # a path
    threads: int | None = None
    max_num_batched_tokens: int = 512
    workloads: tuple[Workload, ...] = WORKLOADS
    tolerance: float = 0.15
    calibration_repeats: int = 5  # --bare: timed steps per composition
    bare: bool = False  # calibrate on the bare engine's grid, not in the serving pipeline
    repeats: int = 3  # fresh seeds of each validation trace; the table shows medians over them
    quiet_cores: float = 0.3  # a real run while other processes kept more cores busy is run again ...
    retries: int = 2  # ... this many times; the quietest is kept (its load is in the table)
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class Calibrations:
    """The models the simulations use: the colocated engine's steps; for PD each worker's steps ("prefill",
    "decode") and the hand-over."""

    colocated: Calibration
    workers: dict[str, Calibration] = field(default_factory=dict)
    handover: HandoverCalibration | None = None

    def step_models(self, kind: str) -> dict[str, StepModel]:
        """The `kind` graph's engines' models, by engine: "colocated", or "prefill" and "decode"."""
        if kind == "colocated":
            return {"colocated": self.colocated.model}
        return {role: calibration.model for role, calibration in self.workers.items()}


@dataclass
class WorkloadCheck:
    """One workload's trace served by one configuration, for real and simulated; per request seconds (NaN: not
    measured)."""

    workload: Workload
    config: str
    rate: float
    capacity_rps: float  # the step model's, for the trace's lengths
    trace: Trace
    measured_ttft: np.ndarray
    measured_tpot: np.ndarray
    simulated_ttft: np.ndarray  # with the models rescaled to the run's own speed (`speeds`) ...
    simulated_tpot: np.ndarray
    calibrated_ttft: np.ndarray  # ... and as calibrated
    calibrated_tpot: np.ndarray
    speeds: dict[str, tuple[float, float]]  # by engine: its (decode, prompt) work's time over the model's (`fit_speed`)
    wall_s: float
    other_cores: float  # the rest of the machine's busy cores during the real run (on a quiet machine ~0)
    errors: list[str] = field(default_factory=list)  # requests the real run did not complete
    seed: int = 0  # of the trace
    decisions: dict[str, int] = field(default_factory=dict)  # pd: pd_split's, real and simulated
    simulated_decisions: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.workload.name + ("" if self.config == "colocated" else f" {self.config}")

    def metrics(self, as_calibrated: bool = False) -> dict[str, tuple[float, float]]:
        """key -> (measured ms, simulated ms): simulated at the run's speed, or `as_calibrated`."""
        ttft, tpot = (
            (self.calibrated_ttft, self.calibrated_tpot)
            if as_calibrated
            else (self.simulated_ttft, self.simulated_tpot)
        )
        pairs = {"ttft": (self.measured_ttft, ttft), "tpot": (self.measured_tpot, tpot)}
        out = {}
        for key, _ in METRICS:
            measured, simulated = pairs[key[:4]]
            stat = key.split("_")[1]
            out[key] = (_stat(measured, stat), _stat(simulated, stat))
        return out


def _stat(values_s: np.ndarray, stat: str) -> float:
    finite = values_s[~np.isnan(values_s)]
    if not len(finite):
        return math.nan
    return 1000 * float(np.mean(finite) if stat == "mean" else np.percentile(finite, int(stat[1:])))


def relative_error(measured: float, simulated: float) -> float:
    return abs(simulated - measured) / measured if measured > 0 else math.nan


def median_metrics(checks: list[WorkloadCheck]) -> dict[str, tuple[float, float, float, float]]:
    """One workload's repeats: key -> (median measured ms, median simulated ms, median of the repeats' relative
    errors, each on its own trace, the same with the models as calibrated) over them."""
    per_repeat = [c.metrics() for c in checks]
    as_calibrated = [c.metrics(as_calibrated=True) for c in checks]
    return {
        key: (
            float(np.nanmedian([m[key][0] for m in per_repeat])),
            float(np.nanmedian([m[key][1] for m in per_repeat])),
            float(np.nanmedian([relative_error(*m[key]) for m in per_repeat])),
            float(np.nanmedian([relative_error(*m[key]) for m in as_calibrated])),
        )
        for key, _ in METRICS
    }


def judged(key: str, error: float, tolerance: float) -> bool:
    """p50 and mean are judged; a p99 (one or two of ~40 requests) only when it passes anyway."""
    return not key.endswith("p99_ms") or error <= tolerance
