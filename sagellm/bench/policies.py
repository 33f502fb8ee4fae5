"""The scheduling benchmark (W6): SLO attainment per priority class under 2× overload, for every `policy_sort` policy.

Three classes arrive as one Poisson stream at `load` × capacity: 20% high (priority 0, TTFT SLO 1 s), 30% normal
(1, 5 s), 50% low (2, 20 s). A request meets its SLO when its first token comes within its class's TTFT; a shed
request misses it. Both parts run the real policy code on the same arrival trace for every policy:
- real: SmolLM2 through the local executor, replay_source → admission → policy_sort → route → engine →
  metrics_sink. Capacity is measured first in the same run (closed loop), then the Poisson trace replays.
- sim: a discrete-event simulation of many instances (tiers with prefill and decode speeds, slots and prices)
  fed by the real `PolicySort` operator, whose policy reads the simulated `InstanceStats`, load and clock, and
  routed by the real `load_balanced` strategy among the instances with a free slot (a request its policy pinned
  keeps its instance, free or not). Service is modelled, the decisions are not, so each decision's CPU time is a
  real measurement of our code at that scale. Requests arriving while slots and queue still fill are not counted.
The simulator's queue is bounded to `queue_s` seconds of capacity (`max_len`), so under sustained overload it sheds
by the policy's own order, as a deployed graph does. The real part's is unbounded by default (`--real-queue-seconds`).

The pieces: `policy_workload` (classes, tiers, tallies), `policy_sim` (the simulator), this file (the real engine,
the report and the command line)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sagellm.bench.policy_sim import SimConfig, run_sim
from sagellm.bench.policy_workload import (
    CLASSES,
    POLICIES,
    Part,
    PolicyRun,
    TrafficClass,
    class_sequence,
    max_queue,
    new_run,
    percentiles,
    policy_state,
)
from sagellm.bench.report import write_json_and_plot
from sagellm.messages import Request
from sagellm.sampling_params import SamplingParams

# -- real engine ------------------------------------------------------------------------------------------------


@dataclass
class RealConfig:
    model: str = "smollm2-135m-instruct"
    requests: int = 100  # per policy, the same trace for each
    capacity_requests: int = 24  # closed-loop requests of the capacity measurement
    prompt_len: int = 64
    output_len: int = 16  # short enough that 3 slot releases (see `_caption`) take about the high class's 1 s
    max_num_seqs: int = 4
    load: float = 2.0  # arrival rate / measured capacity
    queue_s: float = 0.0  # unbounded: a shed error waits for a free engine slot in route, stalling the source
    threads: int | None = None
    seed: int = 0
    policies: tuple[str, ...] = POLICIES
    progress: bool = True


def run_real(config: RealConfig) -> Part:
    """Capacity first (closed loop at 2 × max_num_seqs in flight), then the Poisson trace once per policy."""
    from sagellm.bench.workloads import random_token_prompts
    from sagellm.model_cache import resolve_model
    from sagellm.operators.replay_source import poisson_offsets
    from sagellm.runtime.executor.local import model_attrs

    model = str(resolve_model(config.model))
    attrs = model_attrs(model)  # once: every run reuses the tokenizer and config
    prompts = random_token_prompts(
        attrs["tokenizer"], config.capacity_requests + config.requests, config.prompt_len, config.seed
    )
    warm, trace = prompts[: config.capacity_requests], prompts[config.capacity_requests :]
    capacity = _measure_capacity(config, model, attrs, warm)
    rng = np.random.default_rng(config.seed)
    classes = class_sequence(config.requests, rng)
    arrival = config.load * capacity
    offsets = poisson_offsets(config.requests, arrival, config.seed)
    bound = max_queue(config.queue_s, capacity)
    part = Part("real", _real_json(config, model), capacity, arrival, bound)
    for policy in config.policies:
        requests = [_request(f"w6-{i}", p, config, c) for i, (p, c) in enumerate(zip(trace, classes))]
        run = new_run(policy)
        result, started = _replay(config, model, attrs, policy, bound, requests, offsets, None, policy)
        engine_met = 0
        for request, cls in zip(requests, classes):
            # The replay source stamps each request with its intended arrival, so TTFT is what a client sees,
            # source backpressure included, and the engine's own slo_met agrees with it.
            outcome = result.outcomes[request.request_id]
            served = outcome.error is None and outcome.metrics is not None and outcome.metrics.ttft_s is not None
            run.record(cls, outcome.metrics.ttft_s if served else None)
            engine_met += bool(served and outcome.metrics.slo_met)
        run.stats = {"wall_s": time.time() - started, "engine_slo_met": engine_met}
        run.stats |= policy_state(result.operators["policy_sort"])
        run.stats["engine_tokens_per_s_estimate"] = result.operators["engine"].stats.tokens_per_s
        codes = Counter(o.error.code for o in result.outcomes.values() if o.error is not None)
        run.stats |= {f"errors_{code}": n for code, n in sorted(codes.items())}
        part.runs.append(run)
    return part


def _request(rid: str, prompt: list[int], config: RealConfig, cls: TrafficClass | None) -> Request:
    sampling = SamplingParams(max_tokens=config.output_len, ignore_eos=True, temperature=0.0)
    if cls is None:
        return Request(request_id=rid, prompt_token_ids=list(prompt), sampling=sampling, priority=1)
    return Request(
        request_id=rid,
        prompt_token_ids=list(prompt),
        sampling=sampling,
        priority=cls.priority,
        ttft_slo_ms=cls.ttft_slo_ms,
    )


def _measure_capacity(config: RealConfig, model: str, attrs: dict[str, Any], prompts: list[list[int]]) -> float:
    """Completed requests/s in steady state: from the `max_num_seqs`-th finish to the last."""
    requests = [_request(f"cap-{i}", p, config, None) for i, p in enumerate(prompts)]
    result, _ = _replay(config, model, attrs, "fifo", None, requests, None, 2 * config.max_num_seqs, "capacity")
    finishes = sorted(r.arrival_time + result.outcomes[r.request_id].metrics.e2e_s for r in requests)
    first = min(config.max_num_seqs, len(finishes) - 1) - 1
    if first < 0 or finishes[-1] <= finishes[first]:
        raise RuntimeError(f"capacity: need more than {config.max_num_seqs} requests to measure steady throughput")
    return (len(finishes) - 1 - first) / (finishes[-1] - finishes[first])


def _replay(
    config: RealConfig,
    model: str,
    attrs: dict[str, Any],
    policy: str,
    bound: int | None,
    requests: list[Request],
    offsets: list[float] | None,
    max_in_flight: int | None,
    label: str,
) -> tuple[Any, float]:
    """One pass of the graph over `requests`; returns the result and when the replay started (after loading)."""
    import trio

    from sagellm.dsl import Pipeline
    from sagellm.operators.replay_source import ReplaySource
    from sagellm.runtime.executor.local import LocalExecutor

    p = Pipeline("w6", model=model)
    engine = dict(max_num_seqs=config.max_num_seqs, num_threads=config.threads)
    nodes = [
        p.add("replay_source", id="source"),
        p.add("admission"),
        p.add("policy_sort", policy=policy, max_len=bound),
        p.add("route"),
        p.add("engine", **engine),
        p.add("metrics_sink"),
    ]
    p.chain(*nodes)
    source = ReplaySource(requests, offsets_s=offsets, max_in_flight=max_in_flight)
    executor = LocalExecutor(p.graph(), operators={"source": source}, graph_attrs=attrs)

    async def main() -> tuple[Any, float]:
        await executor.open_operators()  # the engine loads here, outside the timed replay
        with tqdm(total=len(requests), desc=f"real {label}", unit="req", disable=not config.progress) as bar:
            executor.on_terminal = lambda _: bar.update(1)
            started = time.time()
            return await executor.run(), started

    return trio.run(main)


def _real_json(config: RealConfig, model: str) -> dict[str, Any]:
    keys = ("requests", "capacity_requests", "prompt_len", "output_len", "max_num_seqs", "load", "queue_s", "seed")
    return {"model": model, "weights": "float32 (a GGUF is dequantized)"} | {k: getattr(config, k) for k in keys}


# -- report -------------------------------------------------------------------------------------------------------

DEFINITIONS = {
    "attainment": "requests of the class whose first token came within its TTFT SLO / all requests of the class",
    "shed": "requests that ended without a first token (shed by the bounded queue by the policy's order)",
    "max_queue": "policy_sort max_len = queue_s x measured capacity (None: unbounded)",
    "capacity_rps": "real: closed-loop completed requests/s at 2 x max_num_seqs in flight, from the "
    "max_num_seqs-th finish on; sim: sum over instances of slots / mean service time of the trace's requests",
    "pop_us": "sim: thread CPU time of one policy_sort.pop (the policy's decision), microseconds",
    "push_us": "sim: thread CPU time of one policy_sort.push, including the shed when the queue is full",
    "route_us": "sim: thread CPU time of one routing decision (load_balanced over the instances with a free slot)",
    "sim_service": "each slot serves one request: prompt / prefill tokens/s to the first token, then output / "
    "decode tokens/s; requests routed to a busy instance wait in its own FIFO",
}


def report_json(parts: list[Part], machine: dict[str, object], command: str, elapsed_s: float) -> dict[str, Any]:
    classes = [vars(c) for c in CLASSES]
    head = {"benchmark": "W6 scheduling under overload", "classes": classes, "machine": machine}
    body = {part.name: part.to_json() for part in parts}
    return head | body | {"definitions": DEFINITIONS, "command": command, "elapsed_s": elapsed_s}


def print_tables(parts: list[Part], machine: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    for part in parts:
        heads = [f"{c.name} ({c.ttft_slo_ms / 1000:g} s)" for c in CLASSES]
        table = Table("policy", *heads, "overall", "shed", "TTFT p50 high ms", title=_title(part))
        sim = part.name == "sim"
        if sim:
            for column in ("pop µs mean", "pop µs p99", "push µs mean", "queue at pop", "wall s"):
                table.add_column(column)
        for run in part.runs:
            cells = [f"{100 * run.attainment(c.name):.0f}%" for c in CLASSES]
            shed = sum(t.shed for t in run.tallies.values())
            cells += [f"{100 * run.attainment():.1f}%", str(shed), _ms(percentiles(run.tallies["high"].ttft_s)[0])]
            if sim:
                st = run.stats
                cells += [f"{st['pop_us_mean']:.1f}", f"{st['pop_us_p99']:.0f}", f"{st['push_us_mean']:.1f}"]
                cells += [f"{st['queue_len_at_pop_mean']:.0f}", f"{st['wall_s']:.1f}"]
            table.add_row(_label(run), *cells)
        table.caption = _caption(part, machine)
        console.print(table)


def _label(run: PolicyRun) -> str:
    """adaptive with its switches, and the mode that made most pops (sim) or the one it ended in (real)."""
    if "adaptive_switches" not in run.stats:
        return run.policy
    pops = {k.removeprefix("adaptive_pops_"): v for k, v in run.stats.items() if k.startswith("adaptive_pops_")}
    if pops:
        mode = max(pops, key=pops.__getitem__)
        where = f"{100 * pops[mode] / sum(pops.values()):.0f}% of pops as {mode}"
    else:
        where = f"ended as {run.stats['adaptive_final']}"
    return f"{run.policy} ({int(run.stats['adaptive_switches'])} switches, {where})"


def _ms(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.0f}"


def _title(part: Part) -> str:
    c = part.config
    bound = part.max_queue if part.max_queue is not None else "unbounded"
    if part.name == "real":
        what = f"real engine, {Path(c['model']).name}, max_num_seqs {c['max_num_seqs']}, {c['requests']} requests"
    else:
        what = f"simulator, {c['instances']} instances, {c['counted_requests']} of {c['requests']} requests counted"
    return (
        f"W6 {what}: capacity {part.capacity_rps:.2f} req/s, arrivals {part.arrival_rps:.2f} req/s "
        f"(Poisson), queue bound {bound}"
    )


def _caption(part: Part, machine: dict[str, object]) -> str:
    c = part.config
    if part.name == "real":
        shape = f"{c['prompt_len']}-token prompts, {c['output_len']} output tokens (ignore_eos), fp32 weights"
        # policy_sort and route each hold one popped request while the engine is full (rendezvous channels), so
        # even a request the policy puts first waits for about three slot releases
        shape += f"; TTFT floor under load ≈ 3 / capacity = {3 / part.capacity_rps:.2f} s"
    else:
        shape = f"log-normal prompts (median {c['prompt_median']}) and outputs (median {c['output_median']})"
        shape += f"; warm-up {c['warmup_s']:.1f} s of {c['duration_s']:.1f} s not counted; CPU µs per call"
    return f"{shape}; {machine['cpu']}, {machine['cores']} cores, shared machine"


def plot(parts: list[Part], path: Path) -> None:
    """One panel per part: for each policy, bars of attainment per class and overall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*(c.name for c in CLASSES), "overall"]
    fig, axes = plt.subplots(1, len(parts), figsize=(6.5 * len(parts), 4.6), squeeze=False)
    width = 0.8 / len(groups)
    for ax, part in zip(axes[0], parts):
        for g, group in enumerate(groups):
            values = [100 * run.attainment(None if group == "overall" else group) for run in part.runs]
            xs = [x + (g - (len(groups) - 1) / 2) * width for x in range(len(part.runs))]
            bars = ax.bar(xs, values, width, label=group, color="0.4" if group == "overall" else f"C{g}")
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
        ax.set_xticks(range(len(part.runs)), [r.policy for r in part.runs], fontsize=9)
        ax.set_ylim(0, 110)
        ax.set_ylabel("SLO attainment % (higher is better)")
        name = "real engine" if part.name == "real" else f"simulator, {part.config['instances']} instances"
        bound = f"queue bound {part.max_queue}" if part.max_queue is not None else "unbounded queue"
        ax.set_title(f"{name}: arrivals {part.arrival_rps / part.capacity_rps:.1f}× capacity, {bound}", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=len(groups), fontsize=9)
    slos = ", ".join(f"{c.name} {c.ttft_slo_ms / 1000:g} s ({100 * c.share:.0f}%)" for c in CLASSES)
    fig.suptitle(f"W6 scheduling under overload: TTFT SLOs {slos}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n", 1)[0]
    parser.add_argument("--parts", default="real,sim", help="comma list of real,sim (default: %(default)s)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma list of %(default)s")
    parser.add_argument("--model", "-m", default=RealConfig.model, help="real: model path or alias (%(default)s)")
    parser.add_argument("--requests", type=int, default=RealConfig.requests, help="real: requests per policy")
    parser.add_argument(
        "--capacity-requests",
        type=int,
        default=RealConfig.capacity_requests,
        help="real: closed-loop requests measuring capacity (default: %(default)s)",
    )
    parser.add_argument("--prompt-len", type=int, default=RealConfig.prompt_len, help="real: prompt tokens")
    parser.add_argument("--output-len", type=int, default=RealConfig.output_len, help="real: output tokens")
    parser.add_argument("--max-num-seqs", type=int, default=RealConfig.max_num_seqs, help="real: engine slots")
    parser.add_argument("--threads", type=int, default=None, help="real: torch threads (default: all cores)")
    parser.add_argument("--sim-instances", type=int, default=SimConfig.instances, help="sim: instances")
    parser.add_argument("--sim-requests", type=int, default=SimConfig.requests, help="sim: requests per policy")
    parser.add_argument("--load", type=float, default=2.0, help="arrival rate / capacity (default: %(default)s)")
    parser.add_argument(
        "--queue-seconds",
        type=float,
        default=SimConfig.queue_s,
        help="sim: queue bound in seconds of capacity; 0: unbounded (default: %(default)s)",
    )
    parser.add_argument(
        "--real-queue-seconds",
        type=float,
        default=RealConfig.queue_s,
        help="real: queue bound in seconds of capacity; 0: unbounded (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/policies"),
        help="writes OUT.json and OUT.png (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--log-level", default="warning")


def run(args: argparse.Namespace) -> int:
    import torch

    from sagellm.bench.offline import machine_info

    started = time.perf_counter()
    parts_wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    unknown = sorted(set(parts_wanted) - {"real", "sim"}) + sorted(set(policies) - set(POLICIES))
    if unknown or not parts_wanted or not policies:
        print(f"error: unknown or no parts/policies {unknown}; parts: real, sim; policies: {POLICIES}", file=sys.stderr)
        return 2
    common = dict(load=args.load, seed=args.seed, policies=policies, progress=not args.no_progress)
    parts: list[Part] = []
    if "real" in parts_wanted:
        real = RealConfig(
            model=args.model,
            requests=args.requests,
            capacity_requests=args.capacity_requests,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            max_num_seqs=args.max_num_seqs,
            threads=args.threads,
            queue_s=args.real_queue_seconds,
            **common,
        )
        parts.append(run_real(real))
    if "sim" in parts_wanted:
        parts.append(
            run_sim(
                SimConfig(
                    instances=args.sim_instances, requests=args.sim_requests, queue_s=args.queue_seconds, **common
                )
            )
        )
    machine = machine_info(args.threads or torch.get_num_threads())
    print_tables(parts, machine)
    results = report_json(parts, machine, _command(args), time.perf_counter() - started)
    json_path, png_path = write_json_and_plot(args.out, _finite(results), lambda png: plot(parts, png))
    print(f"results: {json_path}\nchart: {png_path}", file=sys.stderr)
    return 0


FLAGS = ("parts", "policies", "model", "requests", "capacity_requests", "prompt_len", "output_len", "max_num_seqs")
FLAGS += ("threads", "sim_instances", "sim_requests", "load", "queue_seconds", "real_queue_seconds", "seed")


def _command(args: argparse.Namespace) -> str:
    """The run spelled out with every option that changes what is measured, so its numbers can be reproduced."""
    import shlex

    parts = ["sagellm", "bench", "policies"]
    for flag in FLAGS:
        if getattr(args, flag) is not None:
            parts += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return " ".join(shlex.quote(p) for p in parts)


def _finite(value: Any) -> Any:
    """JSON has no NaN: a metric with nothing to measure (no request of a class served) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
