"""`sagellm bench sim-check`'s report: the table of measured against simulated metrics with a verdict on each, the KV
hand-over's fit, the JSON of every number (each request's too), and the distributions of TTFT and TPOT, measured
against simulated."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sagellm.benchmarks.kv_handover import HandoverCalibration
from sagellm.benchmarks.sim_check_cases import (
    METRICS,
    Calibrations,
    SimCheckConfig,
    WorkloadCheck,
    judged,
    median_metrics,
)
from sagellm.simulator.result import json_safe


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
