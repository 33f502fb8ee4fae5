"""`sagellm simulate`: a cluster of simulated engine instances, scheduled by the real policy and routing code, each
step timed by the step model `sagellm bench steps` measured on our engine.

sagellm simulate --instances 100 --requests 100000 --load 0.9 --sample 2
sagellm simulate --trace azure-code --rate 50 --autoscale 2:40 --slo-ttft-ms 2000
sagellm simulate --policy priority --classes --load 1.5 --max-queue 5000 --json sim.json"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sagellm.simulator.cluster import ClusterConfig
    from sagellm.simulator.step_model import StepModel

# SmolLM2-135M's steps as `sagellm bench steps` measured them for the README's figures, shipped with the package
DEFAULT_STEP_MODEL = Path(__file__).resolve().parents[1] / "simulator" / "smollm2_cpu.json"
TRACES = ("poisson", "bursty", "azure-code", "azure-conv")  # sagellm.simulator.traces.TRACE_KINDS; no import here
ROWS = (  # (summary key, label, format)
    ("completed", "completed", "{:,}"),
    ("failed", "failed (shed or rejected)", "{:,}"),
    ("throughput_rps", "throughput req/s", "{:,.2f}"),
    ("goodput_rps", "goodput req/s (within SLOs)", "{:,.2f}"),
    ("slo_attainment", "SLO attainment", "{:.1%}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:,.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:,.0f}"),
    ("tpot_p50_ms", "TPOT p50 ms", "{:,.1f}"),
    ("tpot_p99_ms", "TPOT p99 ms", "{:,.1f}"),
    ("e2e_p50_ms", "e2e p50 ms", "{:,.0f}"),
    ("e2e_p99_ms", "e2e p99 ms", "{:,.0f}"),
    ("sim_duration_s", "simulated s", "{:,.1f}"),
    ("wall_s", "wall s", "{:.2f}"),
    ("simulated_requests_per_s", "simulated req per wall s", "{:,.0f}"),
    ("autoscale_changes", "autoscale changes", "{}"),
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate a cluster on our measured step times", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--instances", type=int, default=16, help="engine instances (default: %(default)s)")
    p.add_argument("--requests", type=int, default=10_000, help="requests in the trace (default: %(default)s)")
    p.add_argument("--trace", choices=TRACES, default="poisson", help="arrival and length shape (default: poisson)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate", type=float, help="arrivals per second")
    rate.add_argument("--load", type=float, help="arrivals as a multiple of the cluster's estimated capacity (0.8)")
    p.add_argument("--policy", default="fifo", help="policy_sort's policy: fifo, priority, slo_aware, ...")
    p.add_argument("--routing", default="load_balanced", help="routing strategy (default: %(default)s)")
    p.add_argument("--sample", type=int, help="route among this many instances drawn from the free ones (2: power of "
                                              "two choices; default: all)")  # fmt: skip
    p.add_argument("--max-queue", type=int, help="policy_sort's bound: shed beyond it (default: unbounded)")
    p.add_argument("--classes", action="store_true", help="give requests W6's priority classes and TTFT SLOs")
    p.add_argument("--autoscale", metavar="MIN:MAX", help="start MIN instances, let the autoscaler go up to MAX")
    p.add_argument("--startup-s", type=float, default=30.0, help="seconds a new instance takes to be ready")
    p.add_argument("--step-model", type=Path, help="step model JSON that `sagellm bench steps` saved (default: "
                                                   "SmolLM2-135M's, shipped with sageLLM)")  # fmt: skip
    p.add_argument("--slo-ttft-ms", type=float, help="TTFT SLO for goodput (default: the classes', else none)")
    p.add_argument("--slo-tpot-ms", type=float, help="TPOT SLO for goodput (default: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trace and of sampled routing")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the summary and configuration here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sagellm.simulator.capacity import capacity_rps
    from sagellm.simulator.cluster import simulate
    from sagellm.simulator.result import json_safe
    from sagellm.simulator.traces import named, with_classes

    _check(args)
    model = load_step_model(args.step_model)
    config = _config(args, model)
    trace = named(args.trace, args.requests, 1.0, args.seed)
    # with an autoscaler, capacity is that of its most instances: a load of 1 needs them all
    instances = config.autoscale.max_instances if config.autoscale else args.instances
    capacity = capacity_rps(config.step_model, trace, instances)
    rate = args.rate if args.rate is not None else (args.load or 0.8) * capacity
    trace = trace.at_rate(rate)
    if args.classes:
        trace = with_classes(trace, [(c.share, c.priority, c.ttft_slo_ms) for c in _classes()], args.seed)
    with tqdm(total=len(trace), desc="simulate", unit="req", file=sys.stderr, leave=False) as bar:
        result = simulate(config, trace, bar.update)
    summary = result.summary(args.slo_ttft_ms, args.slo_tpot_ms)
    head = {"trace": trace.name, "rate_rps": rate, "capacity_rps": capacity, "load": rate / capacity}
    _print(args, head, summary, model)
    if args.json:
        payload = head | {"summary": summary, "config": result.info, "command": _command()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
        print(f"results: {args.json}", file=sys.stderr)
    return 0


def load_step_model(path: Path | None) -> StepModel:
    """The step model at `path`, else the shipped one; a clear error for a missing file."""
    from sagellm.simulator.step_model import StepModel

    path = path or DEFAULT_STEP_MODEL
    if not path.is_file():
        raise ValueError(f"no step model at {path}: `sagellm bench steps` measures our engine's and saves one")
    return StepModel.load(path)


def _check(args: argparse.Namespace) -> None:
    for name in ("instances", "requests"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("rate", "load"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"--{name} must be > 0, got {value}")


def _config(args: argparse.Namespace, model: StepModel) -> ClusterConfig:
    from sagellm.common.autoscale import AutoscaleSettings, instance_bounds
    from sagellm.simulator.cluster import ClusterConfig

    autoscale = AutoscaleSettings(**instance_bounds(args.autoscale)) if args.autoscale else None
    return ClusterConfig(
        instances=args.instances,
        step_model=model,
        policy=args.policy,
        routing=args.routing,
        sample=args.sample,
        max_queue=args.max_queue,
        autoscale=autoscale,
        startup_s=args.startup_s,
        seed=args.seed,
    )


def _classes() -> tuple[Any, ...]:
    from sagellm.benchmarks.policy_workload import CLASSES

    return CLASSES


def _print(args: argparse.Namespace, head: dict[str, Any], summary: dict[str, Any], model: StepModel) -> None:
    from rich.console import Console
    from rich.table import Table

    from sagellm.benchmarks.vllm_results import cpu_description

    instances = f"{args.autoscale} instances (autoscaled)" if args.autoscale else f"{args.instances} instances"
    title = (
        f"sagellm simulate: {summary['requests']:,} requests ({head['trace']}) at {head['rate_rps']:,.2f} req/s "
        f"= {head['load']:.2f}× estimated capacity, {instances}, {args.policy}, {args.routing}"
        + (f" among {args.sample} sampled" if args.sample else "")
    )
    slos = [f"TTFT {summary['slo_ttft_ms']:g} ms" if summary["slo_ttft_ms"] else "TTFT per class" * args.classes,
            f"TPOT {summary['slo_tpot_ms']:g} ms" if summary["slo_tpot_ms"] else ""]  # fmt: skip
    slo = "SLOs: " + ", ".join(s for s in slos if s) if any(slos) else "no SLOs: goodput is throughput"
    source = model.source or {}
    about = [Path(str(source["model"])).name if source.get("model") else "", str(source.get("measured", ""))[:10]]
    about += [f"on {source['cpu'].split(';')[0]}" if source.get("cpu") else ""]
    measured = ", ".join(part for part in about if part) or "where, not recorded"
    notes = [slo, f"step model: {args.step_model or 'shipped'} ({measured})", f"wall time on {cpu_description()}"]
    table = Table("metric", "value")
    for key, label, spec in ROWS:
        value = summary[key]
        table.add_row(label, "–" if isinstance(value, float) and math.isnan(value) else spec.format(value))
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(title, soft_wrap=True, highlight=False)
    console.print(table)
    console.print("\n".join(notes), soft_wrap=True, highlight=False)
    for change in summary["autoscale"]:
        print(f"  {change['time_s']:9.1f} s  {change['delta']:+d} -> {change['instances']}  {change['reason']}")


def _command() -> str:
    return " ".join(shlex.quote(part) for part in ["sagellm", *sys.argv[1:]])
