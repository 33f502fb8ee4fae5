"""The cluster simulator's benchmark: how fast it runs at scale, and goodput against load for each policy.

- scale: one Poisson trace of `--scale-requests` (10^6) on `--scale-instances` (1,000) instances at 0.8 of their
  estimated capacity, fifo, load_balanced among 2 instances drawn from the free ones (power of two choices): the
  wall time and simulated requests per wall second, the README's figure (target: <= 60 s on a 2-core machine).
- sweep: W6's priority classes (20% high with a 1 s TTFT SLO, 30% normal 5 s, 50% low 20 s) on `--sweep-instances`
  instances, at each `--loads` multiple of estimated capacity, through every `--policies` policy on the same trace,
  with policy_sort bounded to `--queue-seconds` of capacity. Goodput counts the requests that met their own class's
  TTFT SLO, per simulated second; its plot is goodput against offered load, one line per policy.

Step times come from the step model `sagellm bench steps` saved (`--step-model`), as in `sagellm simulate`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sagellm.benchmarks.policy_workload import CLASSES
from sagellm.benchmarks.report import write_json_and_plot
from sagellm.benchmarks.vllm_results import cpu_description
from sagellm.common.errors import NotFound
from sagellm.simulator.capacity import capacity_rps
from sagellm.simulator.cluster import simulate
from sagellm.simulator.cluster_config import ClusterConfig
from sagellm.simulator.result import json_safe
from sagellm.simulator.step_model import StepModel
from sagellm.simulator.traces import poisson, with_classes

DEFAULT_STEP_MODEL = Path("benchmarks/results/step_model.json")
POLICIES = ("fifo", "priority", "slo_aware", "adaptive")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--step-model", type=Path, default=DEFAULT_STEP_MODEL, help="step model JSON")
    parser.add_argument("--scale-requests", type=int, default=1_000_000, help="requests of the scale run (0: skip)")
    parser.add_argument("--scale-instances", type=int, default=1000, help="instances of the scale run")
    parser.add_argument("--sweep-requests", type=int, default=20_000, help="requests per sweep point (0: skip)")
    parser.add_argument("--sweep-instances", type=int, default=32, help="instances of the sweep")
    parser.add_argument("--loads", default="0.5,0.75,1.0,1.25,1.5,2.0", help="multiples of estimated capacity")
    parser.add_argument("--policies", default=",".join(POLICIES), help="policy_sort policies to compare")
    parser.add_argument("--queue-seconds", type=float, default=10.0, help="policy_sort bound, seconds of capacity")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic requests")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/simulator"), help="JSON/PNG stem")


def run(args: argparse.Namespace) -> int:
    if not args.step_model.is_file():
        raise NotFound(f"no step model at {args.step_model}: run `sagellm bench steps` first, or pass --step-model")
    model = StepModel.load(args.step_model)
    payload: dict[str, Any] = {"machine": {"cpu": cpu_description()}, "step_model": vars(model)}
    payload["command"] = " ".join(["sagellm", "bench", "simulator", *sys.argv[3:]])
    if args.scale_requests:
        payload["scale"] = scale_run(model, args.scale_requests, args.scale_instances, args.seed)
    if args.sweep_requests:
        loads = [float(x) for x in args.loads.split(",") if x.strip()]
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        payload["sweep"] = sweep(model, args, loads, policies)
    print_tables(payload)
    paths = write_json_and_plot(args.out, json_safe(payload), lambda png: plot(payload, png))
    for path in paths:
        print(f"results: {path}", file=sys.stderr)
    return 0


def scale_run(model: StepModel, requests: int, instances: int, seed: int) -> dict[str, Any]:
    trace = poisson(requests, 1.0, seed=seed)
    capacity = capacity_rps(model, trace, instances)
    trace = trace.at_rate(0.8 * capacity)
    config = ClusterConfig(instances=instances, step_model=model, sample=2, seed=seed)
    with tqdm(total=requests, desc=f"scale {requests:,} x {instances:,}", unit="req", file=sys.stderr) as bar:
        started = time.perf_counter()
        result = simulate(config, trace, bar.update)
        wall = time.perf_counter() - started  # the trace is drawn before: this is the simulation alone
    summary = result.summary()
    summary.pop("autoscale")
    return {"requests": requests, "instances": instances, "load": 0.8, "capacity_rps": capacity, "wall_s": wall,
            "simulated_requests_per_s": requests / wall, "summary": summary}  # fmt: skip


def sweep(model: StepModel, args: argparse.Namespace, loads: list[float], policies: list[str]) -> dict[str, Any]:
    """Every policy at every load on one trace (stretched to each load): goodput by each request's class SLO."""
    shares = [(c.share, c.priority, c.ttft_slo_ms) for c in CLASSES]
    base = with_classes(poisson(args.sweep_requests, 1.0, seed=args.seed), shares, args.seed)
    capacity = capacity_rps(model, base, args.sweep_instances)
    max_queue = max(1, round(args.queue_seconds * capacity))
    points = []
    with tqdm(total=len(loads) * len(policies), desc="sweep", unit="run", file=sys.stderr) as bar:
        for load in loads:
            trace = base.at_rate(load * capacity)
            for policy in policies:
                config = ClusterConfig(
                    instances=args.sweep_instances, step_model=model, policy=policy, max_queue=max_queue, seed=args.seed
                )
                result = simulate(config, trace)
                summary = result.summary()
                summary.pop("autoscale")
                points.append({"load": load, "policy": policy, "rate_rps": load * capacity, **summary})
                bar.update()
    return {"instances": args.sweep_instances, "requests": args.sweep_requests, "capacity_rps": capacity,
            "max_queue": max_queue, "classes": [vars(c) for c in CLASSES], "points": points}  # fmt: skip


def print_tables(payload: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    cpu = payload["machine"]["cpu"]
    if "scale" in payload:
        s = payload["scale"]
        table = Table("requests", "instances", "wall s", "simulated req/s", "TTFT p50 ms", "TPOT p50 ms",
                      title="simulator at scale (Poisson at 0.8× capacity, fifo, power of two choices)",
                      caption=cpu)  # fmt: skip
        table.add_row(f"{s['requests']:,}", f"{s['instances']:,}", f"{s['wall_s']:.1f}",
                      f"{s['simulated_requests_per_s']:,.0f}", f"{s['summary']['ttft_p50_ms']:.0f}",
                      f"{s['summary']['tpot_p50_ms']:.1f}")  # fmt: skip
        console.print(table)
    if "sweep" in payload:
        sw = payload["sweep"]
        title = f"goodput vs load: {sw['instances']} instances, {sw['requests']:,} requests, "
        title += f"capacity {sw['capacity_rps']:.1f} req/s, queue bound {sw['max_queue']}"
        table = Table("load", "policy", "goodput req/s", "SLO attainment", "failed", "TTFT p50 ms", "TTFT p99 ms",
                      "wall s", title=title, caption=cpu)  # fmt: skip
        for p in sw["points"]:
            table.add_row(f"{p['load']:g}×", p["policy"], f"{p['goodput_rps']:.2f}", f"{p['slo_attainment']:.1%}",
                          f"{p['failed']:,}", f"{p['ttft_p50_ms']:,.0f}", f"{p['ttft_p99_ms']:,.0f}",
                          f"{p['wall_s']:.1f}")  # fmt: skip
        console.print(table)


def plot(payload: dict[str, Any], path: Path) -> None:
    """Goodput against offered load, a line per policy, the ideal (every offered request within its SLO) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    sweep_ = payload.get("sweep")
    if sweep_:
        capacity = sweep_["capacity_rps"]
        loads = sorted({p["load"] for p in sweep_["points"]})
        ax.plot(loads, [load * capacity for load in loads], "--", color="0.6", label="offered")
        for k, policy in enumerate(dict.fromkeys(p["policy"] for p in sweep_["points"])):
            points = [p for p in sweep_["points"] if p["policy"] == policy]
            ax.plot([p["load"] for p in points], [p["goodput_rps"] for p in points], "o-", color=f"C{k}", label=policy)
        ax.set_title(
            f"simulated goodput vs load: {sweep_['instances']} instances, {sweep_['requests']:,} requests per point\n"
            f"W6 classes (TTFT SLOs 1 / 5 / 20 s), queue bound {sweep_['max_queue']}",
            fontsize=10,
        )
    ax.set_xlabel("offered load (× estimated capacity)")
    ax.set_ylabel("goodput, req/s within their TTFT SLO")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    scale = payload.get("scale")
    note = ""
    if scale:
        note = f"scale: {scale['requests']:,} requests × {scale['instances']:,} instances in {scale['wall_s']:.1f} s"
    fig.text(0.01, 0.01, note, fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
