"""`sagellm simulate`: a cluster of simulated engine instances, scheduled by the real policy and routing code, each
step timed by the step model `sagellm bench steps` measured on our engine.

sagellm simulate --instances 100 --requests 100000 --load 0.9 --sample 2
sagellm simulate --trace azure-code --rate 50 --autoscale 2:40 --slo-ttft-ms 2000
sagellm simulate --policy priority --classes --load 1.5 --max-queue 5000 --json sim.json
sagellm simulate --pd 4:12 --trace azure-code --load 0.8 --pd-threshold 1024"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sagellm.common.errors import InvalidInput, NotFound, users_file

if TYPE_CHECKING:
    from sagellm.simulator.cluster_config import ClusterConfig
    from sagellm.simulator.step_model import StepModel

# SmolLM2-135M's steps as `sagellm bench steps` measures them (the docs' simulator figures), shipped with the package
DEFAULT_STEP_MODEL = Path(__file__).resolve().parents[1] / "simulator" / "smollm2_cpu.json"
# The KV hand-over `sagellm bench sim-check` measures on the real PD graph (SmolLM2-135M, one host, shared memory;
# 2.6-4.3 ms and 8.7-12.4 µs over five runs on an AMD EPYC): ms per hand-over, µs per prompt token
DEFAULT_KV_LATENCY_MS, DEFAULT_KV_US_PER_TOKEN = 3.0, 11.0
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
    pd = p.add_argument_group("prefill/decode disaggregation")
    pd.add_argument("--pd", metavar="PREFILL:DECODE", help="prefill and decode workers instead of --instances "
                    "colocated engines; the real pd_split decides each request's path")  # fmt: skip
    pd.add_argument("--pd-threshold", type=int, default=512, help="prompts of at least this many tokens take the PD "
                    "path (default: %(default)s)")  # fmt: skip
    pd.add_argument("--kv-latency-ms", type=float, default=DEFAULT_KV_LATENCY_MS, help="a KV hand-over's fixed time "
                    "(default: %(default)s, measured on SmolLM2-135M)")  # fmt: skip
    pd.add_argument("--kv-us-per-token", type=float, default=DEFAULT_KV_US_PER_TOKEN, help="and its time per prompt "
                    "token (default: %(default)s)")  # fmt: skip
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

    from sagellm.simulator.capacity import capacity_rps, cluster_capacity_rps
    from sagellm.simulator.cluster import simulate
    from sagellm.simulator.result import json_safe
    from sagellm.simulator.traces import named, with_classes

    _check(args)
    model = load_step_model(args.step_model)
    config = _config(args, model)
    trace = named(args.trace, args.requests, 1.0, args.seed)
    if config.autoscale:  # capacity is that of its most instances: a load of 1 needs them all
        capacity = capacity_rps(model, trace, config.autoscale.max_instances)
    else:  # summed over the kinds of instance; with PD workers, the side that saturates first (the unit of --load)
        capacity = cluster_capacity_rps(config, trace)
    rate = args.rate if args.rate is not None else (args.load or 0.8) * capacity
    trace = trace.at_rate(rate)
    if args.classes:
        trace = with_classes(trace, [(c.share, c.priority, c.ttft_slo_ms) for c in _classes()], args.seed)
    with tqdm(total=len(trace), desc="simulate", unit="req", file=sys.stderr, leave=False) as bar:
        result = simulate(config, trace, bar.update)
    summary = result.summary(args.slo_ttft_ms, args.slo_tpot_ms)
    head = {"trace": trace.name, "rate_rps": rate, "capacity_rps": capacity, "load": rate / capacity}
    _print(args, head, summary, model, result.info)
    if args.json:
        payload = head | {"summary": summary, "config": result.info, "command": _command()}
        with users_file(args.json, "write the results"):
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n")
        print(f"results: {args.json}", file=sys.stderr)
    return 0


def load_step_model(path: Path | None) -> StepModel:
    """The step model at `path`, else the shipped one; a clear error for a missing file."""
    from sagellm.simulator.step_model import StepModel

    path = path or DEFAULT_STEP_MODEL
    if not path.is_file():
        raise NotFound(f"no step model at {path}: `sagellm bench steps` measures our engine's and saves one")
    return StepModel.load(path)


def _check(args: argparse.Namespace) -> None:
    for name in ("instances", "requests"):
        if getattr(args, name) < 1:
            raise InvalidInput(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("rate", "load"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise InvalidInput(f"--{name} must be > 0, got {value}")
    if args.pd and args.autoscale:
        raise InvalidInput("--pd and --autoscale: the autoscaler adds colocated instances; give one of them")


def pd_counts(text: str) -> tuple[int, int]:
    """`PREFILL:DECODE` (`--pd 2:6`) -> the two instance counts, each >= 1."""
    prefill, colon, decode = text.partition(":")
    if not colon or not prefill.isdigit() or not decode.isdigit() or min(int(prefill), int(decode)) < 1:
        raise InvalidInput(f"--pd: expected PREFILL:DECODE instance counts, each >= 1 (2:6), got {text!r}")
    return int(prefill), int(decode)


def _config(args: argparse.Namespace, model: StepModel) -> ClusterConfig:
    from sagellm.common.autoscale import AutoscaleSettings, instance_bounds
    from sagellm.simulator.cluster_config import ClusterConfig, Tier
    from sagellm.simulator.kv_transfer import KVTransferModel

    autoscale = AutoscaleSettings(**instance_bounds(args.autoscale)) if args.autoscale else None
    instances, tiers = args.instances, None
    if args.pd:
        prefill, decode = pd_counts(args.pd)
        instances = prefill + decode
        share = prefill / instances
        tiers = (Tier("prefill", share, model, role="prefill"), Tier("decode", 1 - share, model, role="decode"))
    return ClusterConfig(
        instances=instances,
        step_model=None if tiers else model,
        tiers=tiers,
        pd_threshold_tokens=args.pd_threshold,
        kv_transfer=KVTransferModel(args.kv_latency_ms / 1e3, args.kv_us_per_token / 1e6),
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


def _print(
    args: argparse.Namespace, head: dict[str, Any], summary: dict[str, Any], model: StepModel, info: dict[str, Any]
) -> None:
    from rich.console import Console
    from rich.table import Table

    from sagellm.benchmarks.vllm_results import cpu_description

    instances = f"{args.autoscale} instances (autoscaled)" if args.autoscale else f"{args.instances} instances"
    if args.pd:
        instances = "{} prefill + {} decode workers".format(*pd_counts(args.pd))
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
    if args.pd:
        pd = info["pd"]
        kv = pd["kv_transfer"]
        decisions = ", ".join(f"{reason} {count:,}" for reason, count in sorted(pd["decisions"].items()))
        print(f"pd_split (threshold {pd['threshold_tokens']} tokens): {decisions}; KV hand-over "
              f"{1e3 * kv['latency_s']:g} ms + {1e6 * kv['per_token_s']:g} µs per prompt token")  # fmt: skip
    for change in summary["autoscale"]:
        print(f"  {change['time_s']:9.1f} s  {change['delta']:+d} -> {change['instances']}  {change['reason']}")


def _command() -> str:
    return " ".join(shlex.quote(part) for part in ["sagellm", *sys.argv[1:]])
