"""`sagellm bench sim-check`: the cluster simulator against the real engine, at small scale, in one run.

Step times on a shared machine drift from run to run (and over minutes within one), so everything happens in one
process, one after another, the colocated engine's calibration and runs first, then the PD ones':
1. calibrate: `sagellm bench steps`' measurement of this engine's step times, fitted into a `StepModel`; by default
   in the serving pipeline on its own calibration trace (a closed loop of other lengths, another seed: nothing is
   fitted on the traces it is judged by), with `--bare` on the bare engine's grid of compositions. For the PD
   configuration also each worker's (the calibration trace served by the pd graph, each worker's steps timed in its
   own process: a core and a torch thread each, beside the other worker, behind its bridge to the main process; a
   model for each, the prefill worker's from its long prompts' chunks) and the KV hand-over (`kv_handover`: the
   real PD graph, one request at a time, its own prompts);
2. serve each workload's trace on the real engine through the W4 benchmark's graphs (`pd_split.run_config`): the
   colocated one in-process (replay_source → admission → policy_sort(fifo) → route → engine → metrics_sink) and, for
   W4, also the pd one (prefill and decode workers in two processes, a core each, pd_split keeping prompts under 512
   tokens colocated on decode), so TTFT and TPOT are measured exactly as `sagellm bench pd` measures them (from the
   request's intended arrival);
3. simulate the same trace (the real arrivals and lengths, `traces.from_rows`) on the same cluster: one instance with
   the engine's settings and the calibrated model, or a prefill and a decode worker, each with its own model, the
   real pd_split deciding and the hand-over model between them; compare TTFT and TPOT (p50, p99, mean) request set
   against request set. Twice: with the models rescaled to the speed the run's own steps went at (their decode and
   their prompt work's time over the model's, `fit_speed`, from the steps the engines timed as the calibration
   times them), which the verdict is on, and as calibrated. This machine's speed moves by 10-20% within a minute
   (other tenants of its host: a short probe served just before a run was as far from the run's speed as the
   calibration was), and a W6 trace's queue doubles any error in it, so only the first tells the simulator's error
   (batching, chunking, scheduling, queueing, the PD split and hand-over, the model's relative costs of unlike
   steps) from the machine's drift; the second is what a user of a calibration taken minutes before gets here;
4. `repeats` times, each repeat a fresh seed of each trace: the table shows each metric's median over repeats, measured
   and simulated, and the median over repeats of its relative error on the same trace (each repeat's simulation
   against its own measurement: the medians of measured and simulated may come from different traces).
Workloads: W4-sized (Poisson at 0.7× the colocated capacity, 80% 64-token and 20% 1,024-token prompts, 64 output
tokens, max_num_seqs 16; colocated and PD) and W6-sized (Poisson at 2× capacity, as W6: a queue that grows, 64-token
prompts, 16 output tokens, max_num_seqs 4, the real W6's engine). Capacity is the step model's
(`simulator.capacity.capacity_rps`), so the rates are fixed before anything is served. A real run during which other
processes kept more than `quiet_cores` busy (/proc/stat, `step_timer.OtherLoad`, the run's own workers not counted)
is run again, twice at most, and the quietest kept; its load is in the table. A metric passes when the simulator is
within `tolerance` (15%) of the measurement. The verdict is on p50 and mean: a p99 of ~40 requests is one or two
requests, which moves by more than 15% between repeats of the real engine
alone, so p99s are shown and judged only when they pass anyway ("noisy" otherwise)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from tqdm import tqdm

from sagellm.benchmarks.kv_handover import HandoverCalibration, calibrate_kv_handover
from sagellm.benchmarks.pd_split import PDBenchConfig, build_graph, make_trace, run_config
from sagellm.benchmarks.report import write_json_and_plot
from sagellm.benchmarks.step_calibration import served_steps, step_tracing
from sagellm.benchmarks.step_timer import OtherLoad
from sagellm.benchmarks.step_times import Calibration, StepBenchConfig, calibrate, calibrate_pd_workers, print_table
from sagellm.simulator.capacity import capacity_rps
from sagellm.simulator.cluster import ClusterConfig, Tier, simulate
from sagellm.simulator.result import json_safe
from sagellm.simulator.step_model import StepModel, fit_speed
from sagellm.simulator.traces import Trace, from_rows


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


log = structlog.get_logger("sagellm.bench.sim_check")
CALIBRATION_SEED_OFFSET = 1000  # the calibration trace's seed: apart from every repeat's validation seed
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


def run_workload(
    config: SimCheckConfig, models: Calibrations, workload: Workload, kinds: list[str], tokenizer: Any, seed: int
) -> list[WorkloadCheck]:
    """Serves the workload's trace (of `seed`) by each configuration of `kinds`, then simulates it on the same
    cluster at the engine's settings: with the models rescaled to the speed the run's own steps went at
    (`fit_speed`), and as calibrated."""
    model = dataclasses.replace(models.colocated.model, max_num_seqs=workload.max_num_seqs)
    pd = PDBenchConfig(
        model=config.model,
        num_requests=workload.requests,
        rate=1.0,  # replaced below, once the trace's lengths give the capacity
        short_len=workload.short_len,
        long_len=workload.long_len,
        long_fraction=workload.long_fraction,
        output_len=workload.output_len,
        configs=workload.configs,
        colocated_threads=config.threads or os.cpu_count() or 1,
        max_num_seqs=workload.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        seed=seed,
        progress=config.progress,
    )
    lengths = [len(p) for p in make_trace(tokenizer, pd, workload.requests, None, seed=seed).prompts]
    outputs = [workload.output_len] * workload.requests
    capacity = capacity_rps(model, from_rows([0.0] * len(lengths), lengths, outputs), 1)
    pd = dataclasses.replace(pd, rate=workload.load * capacity)
    real = make_trace(tokenizer, pd, workload.requests, pd.rate, seed=seed)
    checks = []
    for kind in kinds:
        calibrated = models.step_models(kind)
        served = _serve(config, workload, kind, pd, real, seed, calibrated)
        requests, result = served.requests, served.result
        ttft, tpot, errors = [], [], []
        for request in requests:
            outcome = result.outcomes.get(request.request_id)
            m = outcome.metrics if outcome is not None and outcome.error is None else None
            ttft.append(m.ttft_s if m and m.ttft_s is not None else math.nan)
            tpot.append(m.tpot_s if m and m.tpot_s is not None else math.nan)
            if m is None:
                errors.append(f"{request.request_id}: {outcome.error.message if outcome else 'never finished'}")
        trace = from_rows(real.offsets_s, [r.num_prompt_tokens for r in requests], outputs, name=workload.name)
        rescaled = {engine: m.rescaled(*served.speeds[engine]) for engine, m in calibrated.items()}
        sim = simulate(_cluster(kind, rescaled, models.handover, workload, pd), trace)
        as_calibrated = simulate(_cluster(kind, calibrated, models.handover, workload, pd), trace)
        split = result.operators.get("pd_split")
        check = WorkloadCheck(
            workload=workload,
            config=kind,
            rate=pd.rate,
            capacity_rps=capacity,
            trace=trace,
            measured_ttft=np.array(ttft),
            measured_tpot=np.array(tpot),
            simulated_ttft=sim.ttft_s,
            simulated_tpot=sim.tpot_s,
            calibrated_ttft=as_calibrated.ttft_s,
            calibrated_tpot=as_calibrated.tpot_s,
            speeds=served.speeds,
            wall_s=served.wall_s,
            other_cores=served.other_cores,
            errors=errors,
            seed=seed,
            decisions=dict(split.decisions) if split is not None else {},
            simulated_decisions=sim.info["pd"]["decisions"] if sim.info["pd"] else {},
        )
        checks.append(check)
    return checks


@dataclass
class Served:
    """A real run of one trace, and the speed its engines' steps went at against their models (`fit_speed`)."""

    other_cores: float
    attempt: int
    requests: list[Any]
    result: Any
    wall_s: float
    speeds: dict[str, tuple[float, float]]


def _serve(
    config: SimCheckConfig,
    workload: Workload,
    kind: str,
    pd: PDBenchConfig,
    real: Any,
    seed: int,
    models: dict[str, StepModel],
) -> Served:
    """The trace served by the `kind` graph, its engines' steps timed as the calibration times them; a run while
    others kept the cores busy measures them, not us, so it is run again (at most `retries` times) and the quietest
    kept."""
    tries = []
    for attempt in range(1 + config.retries):
        requests = real.requests(pd)
        desc = f"{workload.name} {kind} seed {seed} real" + (f" (retry {attempt})" if attempt else "")
        load = OtherLoad(children=True)  # a pd run's workers are ours
        with (
            tqdm(total=len(requests), desc=desc, unit="req", disable=not config.progress) as bar,
            step_tracing() as trace_dir,
        ):
            result, _, wall = run_config(build_graph(kind, pd), requests, real.offsets_s, bar)
            steps = served_steps(trace_dir)
        if kind == "colocated":
            steps = {"colocated": next(iter(steps.values()))}
        speeds = {engine: fit_speed(models[engine], [sample for _, sample in steps[engine]]) for engine in models}
        tries.append(Served(load.cores(), attempt, requests, result, wall, speeds))
        busy = tries[-1].other_cores
        if busy <= config.quiet_cores:
            break
        log.warning("sim_check_machine_busy", workload=workload.name, config=kind, other_cores=round(busy, 2))
    return min(tries, key=lambda t: (t.other_cores, t.attempt))


def _cluster(
    kind: str,
    models: dict[str, StepModel],
    handover: HandoverCalibration | None,
    workload: Workload,
    pd: PDBenchConfig,
) -> ClusterConfig:
    """The simulated twin of the `kind` graph: one colocated instance, or a prefill and a decode worker with their
    step models, pd_split's threshold and the measured hand-over, on one host (they share this machine, and each
    slows the other as its model's neighbour slowdown says)."""
    if kind == "colocated":
        model = dataclasses.replace(models["colocated"], max_num_seqs=workload.max_num_seqs)
        return ClusterConfig(instances=1, step_model=model)
    assert set(models) == {"prefill", "decode"} and handover is not None
    tiers = tuple(
        Tier(role, 0.5, dataclasses.replace(models[role], max_num_seqs=workload.max_num_seqs), role=role)
        for role in ("prefill", "decode")
    )
    return ClusterConfig(
        instances=2,
        tiers=tiers,
        pd_threshold_tokens=pd.threshold_tokens,
        kv_transfer=handover.model,
        instances_per_host=2,
    )


def run_check(config: SimCheckConfig) -> tuple[Calibrations, list[list[WorkloadCheck]]]:
    """Calibrates (on its own traces, seeded apart from the validation traces), then per repeat r serves and
    simulates each workload's trace of seed `seed + r` by the colocated graph; then the same for PD, its calibrations
    first: what a calibration predicts runs right after it, as a shared machine's speed drifts over minutes.
    -> the calibrations, each case's (workload x configuration) checks by repeat."""
    from sagellm.runtime.models.loader import load_model

    steps = StepBenchConfig(
        model=config.model,
        max_num_seqs=max(w.max_num_seqs for w in config.workloads),
        max_num_batched_tokens=config.max_num_batched_tokens,
        threads=config.threads,
        bare=config.bare,
        repeats=config.calibration_repeats,
        quiet_cores=config.quiet_cores,
        seed=config.seed + CALIBRATION_SEED_OFFSET,
        progress=config.progress,
    )
    tokenizer = load_model(config.model, load_weights=False).tokenizer
    cases = [(w, kind) for w in config.workloads for kind in w.configs]
    checks: list[list[WorkloadCheck]] = [[] for _ in cases]

    def serve(kind: str) -> None:
        for repeat in range(config.repeats):
            for workload in (w for w in config.workloads if kind in w.configs):
                for check in run_workload(config, models, workload, [kind], tokenizer, config.seed + repeat):
                    checks[cases.index((workload, check.config))].append(check)

    models = Calibrations(calibrate(steps))
    serve("colocated")
    if any("pd" in w.configs for w in config.workloads):
        workers = calibrate_pd_workers(dataclasses.replace(steps, threads=1))  # where they serve
        handover = calibrate_kv_handover(
            config.model,
            max_num_seqs=steps.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            seed=config.seed + CALIBRATION_SEED_OFFSET,
            progress=config.progress,
        )
        models = Calibrations(models.colocated, workers, handover)
        serve("pd")
    return models, checks


# -- report ---------------------------------------------------------------------------------------------------
def _verdict(key: str, error: float, tolerance: float) -> str:
    if math.isnan(error):
        return "–"
    if not judged(key, error, tolerance):
        return "noisy"
    return "pass" if error <= tolerance else "FAIL"


def print_check(checks: list[list[WorkloadCheck]], tolerance: float) -> None:
    from rich.console import Console
    from rich.table import Table

    repeats = len(checks[0])
    columns = ("measured ms", "simulated ms", "error*", f"≤ {tolerance:.0%}", "as calibrated*", "per repeat")
    table = Table("case", "metric", *columns)
    table.title = f"simulator vs real engine, same traces: medians over {repeats} repeats (fresh seeds)"
    for runs in checks:
        per_repeat = [c.metrics() for c in runs]
        for (key, header), (measured, simulated, error, calibrated) in zip(METRICS, median_metrics(runs).values()):
            spread = " ".join(f"{m[key][0]:.0f}/{m[key][1]:.0f}" for m in per_repeat)
            verdict = _verdict(key, error, tolerance)
            cells = (f"{measured:.1f}", f"{simulated:.1f}", f"{error:.1%}", verdict, f"{calibrated:.1%}", spread)
            table.add_row(runs[0].label if key == METRICS[0][0] else "", header, *cells)
        table.add_section()
    caption = "; ".join(_describe(runs) for runs in checks)
    caption += ". Judged on p50 and mean; a p99 of ~40 requests is one or two of them: shown, 'noisy' unless within "
    caption += f"{tolerance:.0%} anyway. per repeat: measured/simulated ms. *error: the median over repeats of each "
    caption += "repeat's simulated against measured, on the same trace, simulated with the step models rescaled to "
    caption += "the speed the run's own steps went at (speed: their decode/prompt work's time over the model's), or "
    caption += "as calibrated"
    table.caption = caption
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _describe(runs: list[WorkloadCheck]) -> str:
    w, first = runs[0].workload, runs[0]
    lengths = f"{w.short_len}" if w.long_fraction == 0 else f"{1 - w.long_fraction:.0%} {w.short_len} + {w.long_len}"
    done = sum(int(np.sum(~np.isnan(c.measured_ttft))) for c in runs)
    rates = ", ".join(f"{c.rate:.2f}" for c in runs)
    speeds = ", ".join(
        " ".join(
            f"{'' if engine == 'colocated' else engine + ' '}{d:.2f}/{p:.2f}" for engine, (d, p) in c.speeds.items()
        )
        for c in runs
    )
    served = "prefill and decode workers, a core each" if first.config == "pd" else "one engine"
    return (
        f"{first.label}: {w.requests} requests × {len(runs)} ({done} done), prompts {lengths}, {w.output_len} out, "
        f"{served}, max_num_seqs {w.max_num_seqs}, Poisson {rates} req/s = {w.load:g}× the colocated capacity, "
        f"real wall "
        f"{sum(c.wall_s for c in runs):.0f} s, other processes' load at most {max(c.other_cores for c in runs):.2f} "
        f"cores, speed (decode/prompt) {speeds} (seeds from {first.seed})"
    )


def report_json(
    config: SimCheckConfig, models: Calibrations, checks: list[list[WorkloadCheck]], wall_s: float
) -> dict[str, Any]:
    def finite(values: np.ndarray) -> list[float | None]:
        return [None if math.isnan(v) else float(v) for v in values]

    workloads = []
    for runs in checks:
        rows = {}
        for key, (measured, simulated, error, calibrated) in median_metrics(runs).items():
            rows[key] = {"measured": measured, "simulated": simulated, "error": error, "judged": True}
            rows[key] |= {"error_as_calibrated": calibrated}
            rows[key]["pass"] = None if math.isnan(error) else bool(error <= config.tolerance)
            if not judged(key, error, config.tolerance):
                rows[key] |= {"judged": False, "pass": None}
        repeats = []
        for check in runs:
            t = check.trace
            requests = {"arrival_s": t.arrivals.tolist(), "prompt_tokens": t.prompt_tokens.tolist()}
            requests |= {"measured_ttft_s": finite(check.measured_ttft)}
            requests |= {"simulated_ttft_s": finite(check.simulated_ttft)}
            requests |= {"measured_tpot_s": finite(check.measured_tpot)}
            requests |= {"simulated_tpot_s": finite(check.simulated_tpot)}
            requests |= {"as_calibrated_ttft_s": finite(check.calibrated_ttft)}
            requests |= {"as_calibrated_tpot_s": finite(check.calibrated_tpot)}
            head = {"seed": check.seed, "rate_rps": check.rate, "wall_s": check.wall_s}
            head |= {"model_capacity_rps": check.capacity_rps, "other_cores": check.other_cores}
            head |= {"errors": check.errors, "metrics": json_safe(check.metrics())}
            head |= {"metrics_as_calibrated": json_safe(check.metrics(as_calibrated=True))}
            head |= {"speed": {engine: {"decode": d, "prompt": p} for engine, (d, p) in check.speeds.items()}}
            head |= {"pd_decisions": {"real": check.decisions, "simulated": check.simulated_decisions}}
            repeats.append(head | {"requests": requests})
        head = {"case": runs[0].label, "workload": dataclasses.asdict(runs[0].workload), "config": runs[0].config}
        head |= {"metrics": json_safe(rows)}
        workloads.append(head | {"repeats": repeats})
    return {
        "benchmark": "sim-check: the cluster simulator against the real engine on the same traces, one run",
        "config": dataclasses.asdict(config) | {"workloads": None},
        "tolerance": config.tolerance,
        "step_model": dataclasses.asdict(models.colocated.model),
        "worker_step_models": {role: dataclasses.asdict(c.model) for role, c in models.workers.items()},
        "kv_handover": _handover_json(models.handover),
        "calibration_wall_s": sum(c.wall_s for c in (models.colocated, *models.workers.values(), models.handover) if c),
        "wall_s": wall_s,
        "workloads": workloads,
        "definitions": {
            "ttft": "intended arrival (the replay source's) to the first token leaving the engine",
            "tpot": "(last token time - first token time) / (output tokens - 1)",
            "metrics": "each metric's median over the repeats, measured and simulated (per repeat: [measured, sim])",
            "error": "|simulated - measured| / measured on each repeat's own trace, the median over the repeats",
            "speed": "the run's own steps' decode and prompt work's time over the model's (fit_speed)",
            "error_as_calibrated": "the same, simulated with the step models as calibrated (not rescaled)",
            "judged": "p50 and mean always; a p99 (one or two of ~40 requests) only when it passes",
        },
    }


def _handover_json(handover: HandoverCalibration | None) -> dict[str, Any] | None:
    if handover is None:
        return None
    samples = [{"prompt_tokens": n, "seconds": s} for n, s in handover.samples]
    return dataclasses.asdict(handover.model) | {"wall_s": handover.wall_s, "samples": samples}


def print_handover(handover: HandoverCalibration) -> None:
    m = handover.model
    errors = [abs(m.seconds(n) - s) / s for n, s in handover.samples]
    print(
        f"KV hand-over (real PD graph, {len(handover.samples)} requests one at a time, {handover.wall_s:.0f} s): "
        f"{1e3 * m.latency_s:.2f} ms + {1e6 * m.per_token_s:.2f} µs per prompt token; "
        f"fit error p50 {np.median(errors):.0%}, p90 {np.percentile(errors, 90):.0%}"
    )


def plot(checks: list[list[WorkloadCheck]], path: Path) -> None:
    """Per workload, the CDFs of TTFT and TPOT over all repeats' requests, measured against simulated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(checks), 2, figsize=(10, 3.4 * len(checks)), squeeze=False)
    for row, runs in zip(axes, checks):
        series = (
            ("TTFT", [c.measured_ttft for c in runs], [c.simulated_ttft for c in runs]),
            ("TPOT", [c.measured_tpot for c in runs], [c.simulated_tpot for c in runs]),
        )
        for ax, (label, measured, simulated) in zip(row, series):
            for parts, name, style in ((measured, "measured", "-"), (simulated, "simulated", "--")):
                values = np.concatenate(parts)
                ms = np.sort(1000 * values[~np.isnan(values)])
                ax.step(ms, np.arange(1, len(ms) + 1) / max(len(ms), 1), style, where="post", label=name)
            title = f"{runs[0].label}: {label}, {len(runs)} repeats"
            ax.set(xlabel=f"{label} ms", ylabel="fraction of requests", title=title)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line (`sagellm bench sim-check`, wired by the CLI) -------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SimCheckConfig(model="")
    parser.add_argument(
        "--model", "-m", default=None, help="path, .gguf or cache alias (default: smollm2-135m-instruct)"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (%(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens, help="per step")
    parser.add_argument("--w4-requests", type=int, default=WORKLOADS[0].requests, help="W4-sized trace's requests")
    parser.add_argument("--w6-requests", type=int, default=WORKLOADS[1].requests, help="W6-sized trace's requests")
    parser.add_argument("--tolerance", type=float, default=d.tolerance, help="pass within (%(default)s)")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="fresh seeds of each trace (%(default)s)")
    parser.add_argument("--bare", action="store_true", help="calibrate on the bare engine, not in the pipeline")
    parser.add_argument("--calibration-repeats", type=int, default=d.calibration_repeats, help="--bare: steps each")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of prompts, arrivals and calibration prompts")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sim_check"), help="writes OUT.json/.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--log-level", default="warning")


def run(args: argparse.Namespace) -> int:
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

    w4, w6 = WORKLOADS
    config = SimCheckConfig(
        model=str(resolve_model(args.model or DEFAULT_MODEL)),
        threads=args.threads,
        max_num_batched_tokens=args.max_num_batched_tokens,
        workloads=(
            dataclasses.replace(w4, requests=args.w4_requests),
            dataclasses.replace(w6, requests=args.w6_requests),
        ),
        tolerance=args.tolerance,
        calibration_repeats=args.calibration_repeats,
        bare=args.bare,
        repeats=args.repeats,
        seed=args.seed,
        progress=not args.no_progress,
    )
    started = time.perf_counter()
    models, checks = run_check(config)
    wall = time.perf_counter() - started
    for calibration in (models.colocated, *models.workers.values()):
        if calibration is not None:
            print_table(calibration)
    if models.handover is not None:
        print_handover(models.handover)
    print_check(checks, config.tolerance)
    report = report_json(config, models, checks, wall)
    print(f"sim-check: {wall:.0f} s, calibration {report['calibration_wall_s']:.0f} s", file=sys.stderr)
    for path in write_json_and_plot(args.out, report, lambda png: plot(checks, png)):
        print(f"results: {path}", file=sys.stderr)
    return 0
