"""`sagellm bench sim-check`'s runs: the calibrations, then each workload's trace served on the real engine by the W4
benchmark's graphs, its engines' steps timed as the calibration times them, and the same trace simulated on the same
cluster, with the models rescaled to the speed those steps went at and as calibrated. What a calibration predicts
runs right after it, as a shared machine's speed drifts over minutes; a run while other processes kept the cores busy
is run again."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from tqdm import tqdm

from sagellm.benchmarks.kv_handover import HandoverCalibration, calibrate_kv_handover
from sagellm.benchmarks.pd_split import PDBenchConfig, build_graph, make_trace, run_config
from sagellm.benchmarks.sim_check_cases import Calibrations, SimCheckConfig, Workload, WorkloadCheck
from sagellm.benchmarks.step_calibration import served_steps, step_tracing
from sagellm.benchmarks.step_timer import OtherLoad
from sagellm.benchmarks.step_times import StepBenchConfig, calibrate, calibrate_pd_workers
from sagellm.simulator.capacity import capacity_rps
from sagellm.simulator.cluster import simulate
from sagellm.simulator.cluster_config import ClusterConfig, Tier
from sagellm.simulator.step_model import StepModel, fit_speed
from sagellm.simulator.traces import from_rows

log = structlog.get_logger("sagellm.bench.sim_check")
CALIBRATION_SEED_OFFSET = 1000  # the calibration trace's seed: apart from every repeat's validation seed


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
