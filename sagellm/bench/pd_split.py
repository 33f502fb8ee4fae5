"""The prefill/decode split benchmark (W4): one Poisson trace of mixed prompt lengths served by a colocated engine
and by prefill and decode engines in two worker processes, on the same cores, in one run.

The trace: 80% prompts of 64 random tokens, 20% of 1,024; 64 output tokens each (greedy, EOS ignored); Poisson
arrivals at `rate` requests/s, by default `load_factor` × the colocated engine's capacity, measured first in the
same run (a closed loop of `max_num_seqs` requests in flight). Every configuration replays the identical trace
through the real executors (`LocalExecutor`, `ProcessExecutor`), so the graph's queueing, routing and KV transfer
are all inside the numbers. Configurations:
- colocated: one `engine` in this process with every core's torch threads;
- pd: `prefill` and `decode` in two worker processes (one torch thread each on a 2-core machine), pd_split sending
  prompts of at least `threshold_tokens` uncached tokens the PD path and keeping short ones colocated on decode;
- 2x-colocated: two `engine`s in two worker processes behind route, the same thread split as pd.
Per request (from `RequestMetrics`, wall clock from its release by the source): TTFT, TPOT; goodput counts the
requests meeting both SLOs per second of the run."""

from __future__ import annotations

import gc
import math
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio
from tqdm import tqdm

from sagellm.bench.report import write_json_and_plot
from sagellm.messages import Request
from sagellm.operators.replay_source import ReplaySource, poisson_offsets
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.local import LocalExecutor, PipelineResult
from sagellm.sampling_params import SamplingParams

CONFIGS = ("colocated", "pd", "2x-colocated")
DESCRIPTIONS = {
    "colocated": "one engine in the main process",
    "pd": "prefill and decode engines in two worker processes, KV over ZeroMQ ipc://",
    "2x-colocated": "two engines in two worker processes behind route (load_balanced)",
}
SOURCE_OP = "replay_source"
PROGRESS_POLL_S = 0.2


@dataclass
class PDBenchConfig:
    model: str  # a path (or alias) every process can resolve
    num_requests: int = 60
    rate: float | None = None  # requests/s; None: load_factor × the measured colocated capacity
    load_factor: float = 0.7
    capacity_requests: int = 24  # closed-loop requests of the capacity measurement
    short_len: int = 64
    long_len: int = 1024
    long_fraction: float = 0.2
    output_len: int = 64
    threshold_tokens: int = 512  # pd_split: prompts with at least this many uncached tokens take the PD path
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.2
    configs: tuple[str, ...] = ("colocated", "pd")
    colocated_threads: int = 2  # torch threads of the single colocated engine
    split_threads: int = 1  # torch threads of each engine when two engine processes share the cores
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.configs) - set(CONFIGS)
        if unknown or not self.configs:
            raise ValueError(f"configs must be among {', '.join(CONFIGS)}, got {sorted(unknown) or 'none'}")
        if self.num_requests < 1 or self.capacity_requests < 1 or not 0 <= self.long_fraction <= 1:
            raise ValueError("num_requests and capacity_requests must be >= 1, long_fraction in [0, 1]")
        if (self.rate is not None and not self.rate > 0) or not self.load_factor > 0:
            raise ValueError(f"rate and load_factor must be > 0, got {self.rate} and {self.load_factor}")


@dataclass
class Trace:
    prompts: list[list[int]]
    offsets_s: list[float]  # arrival offsets from the first release

    def requests(self, config: PDBenchConfig) -> list[Request]:
        """Fresh requests (operators stamp them as they pass) carrying the SLOs, so engines fill `slo_met`."""
        sampling = dict(max_tokens=config.output_len, temperature=0.0, ignore_eos=True)
        return [
            Request(
                request_id=f"w4-{i:04d}",
                prompt_token_ids=list(prompt),
                sampling=SamplingParams(**sampling),
                ttft_slo_ms=1000 * config.ttft_slo_s,
                tpot_slo_ms=1000 * config.tpot_slo_s,
            )
            for i, prompt in enumerate(self.prompts)
        ]


@dataclass
class ConfigResult:
    name: str
    wall_s: float  # first release to last finish
    requests: list[dict[str, Any]]  # per request: prompt_tokens, output_tokens, ttft_s, tpot_s, e2e_s, slo_met, error
    decisions: dict[str, int] = field(default_factory=dict)  # pd_split's, for the pd configuration

    def summary(self, config: PDBenchConfig) -> dict[str, float]:
        done = [r for r in self.requests if r["error"] is None]
        ttft, tpot = [r["ttft_s"] for r in done], [r["tpot_s"] for r in done if r["tpot_s"] is not None]
        short = [r["ttft_s"] for r in done if r["prompt_tokens"] < config.long_len]
        long = [r["ttft_s"] for r in done if r["prompt_tokens"] >= config.long_len]
        good = sum(bool(r["slo_met"]) for r in done)
        return {
            "finished": len(done),
            "failed": len(self.requests) - len(done),
            "ttft_p50_ms": _pct(ttft, 50),
            "ttft_p99_ms": _pct(ttft, 99),
            "ttft_short_p50_ms": _pct(short, 50),
            "ttft_long_p50_ms": _pct(long, 50),
            "tpot_p50_ms": _pct(tpot, 50),
            "tpot_p99_ms": _pct(tpot, 99),
            "slo_attainment": good / len(self.requests),
            "goodput_req_s": good / self.wall_s,
            "throughput_req_s": len(done) / self.wall_s,
            "out_tok_s": sum(r["output_tokens"] for r in done) / self.wall_s,
            "wall_s": self.wall_s,
        }


@dataclass
class PDBenchReport:
    config: PDBenchConfig
    capacity_req_s: float | None  # None when the rate was given
    rate: float
    machine: dict[str, object]
    results: list[ConfigResult]

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "W4 mixed lengths, prefill/decode split",
            "config": asdict(self.config),
            "capacity_req_s": self.capacity_req_s,
            "rate_req_s": self.rate,
            "machine": self.machine,
            "results": [
                {"config": r.name, **_finite(r.summary(self.config)), "pd_split": r.decisions, "requests": r.requests}
                for r in self.results
            ],
            "definitions": DESCRIPTIONS
            | {
                "ttft": "release by the source to the first token leaving the engine that decodes it (after the KV "
                "transfer for PD requests)",
                "tpot": "(last token time - first token time) / (output tokens - 1)",
                "goodput": f"requests with TTFT <= {self.config.ttft_slo_s:g} s and TPOT <= "
                f"{1000 * self.config.tpot_slo_s:g} ms / wall time",
                "wall": "first release to last finish",
                "capacity": "completed requests/s of the colocated engine in a closed loop of max_num_seqs in flight",
            },
        }


def make_trace(tokenizer: Any, config: PDBenchConfig, count: int, rate: float | None) -> Trace:
    """Exactly round(long_fraction × count) long prompts at seeded random positions; Poisson offsets at `rate`
    (all at 0 without a rate)."""
    from sagellm.bench.workloads import random_token_prompts

    num_long = round(config.long_fraction * count)
    long = random_token_prompts(tokenizer, num_long, config.long_len, (config.seed, 1))
    short = random_token_prompts(tokenizer, count - num_long, config.short_len, (config.seed, 0))
    is_long = [True] * num_long + [False] * (count - num_long)
    random.Random(config.seed).shuffle(is_long)
    prompts = [long.pop() if flag else short.pop() for flag in is_long]
    offsets = poisson_offsets(count, rate, config.seed) if rate else [0.0] * count
    return Trace(prompts, offsets)


def build_graph(kind: str, config: PDBenchConfig) -> Graph:
    """source → admission → policy_sort(fifo) → [pd_split →] route → engine(s) → metrics_sink."""
    from sagellm.dsl import Pipeline

    p = Pipeline(f"w4-{kind}", model=config.model, transport="ipc")
    head = [p.add(SOURCE_OP, "source"), p.add("admission"), p.add("policy_sort", policy="fifo")]
    if kind == "pd":
        head.append(p.add("pd_split", threshold_tokens=config.threshold_tokens))
    route = p.add("route")
    p.chain(*head, route)
    engine = dict(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens)
    if kind == "colocated":
        ends = [p.add("engine", num_threads=config.colocated_threads, **engine)]
        p.connect(route, *ends)
    elif kind == "pd":
        threads = config.split_threads
        prefill = p.add("prefill", placement="process:prefill", num_threads=threads, **engine)
        transfer = p.add("kv_transfer", placement="process:decode")
        ends = [p.add("decode", placement="process:decode", num_threads=threads, **engine)]
        p.connect(route, prefill, ends[0])
        p.chain(prefill, transfer, ends[0])
    else:
        ends = [
            p.add("engine", f"engine_{i}", placement=f"process:engine_{i}", num_threads=config.split_threads, **engine)
            for i in (1, 2)
        ]
        p.connect(route, *ends)
    metrics = p.add("metrics_sink", "metrics")
    for end in ends:
        p.connect(end, metrics)
    return p.graph()


def run_config(
    graph: Graph, requests: list[Request], offsets_s: list[float] | None, bar: tqdm, **source: Any
) -> tuple[PipelineResult, float]:
    """Replays `requests` through `graph` (worker processes where it places nodes); -> (result, wall seconds)."""
    replay = ReplaySource(requests, offsets_s, **source)
    if any(node.placement != "task" for node in graph.nodes.values()):
        from sagellm.runtime.executor.process import ProcessExecutor

        executor: Any = ProcessExecutor(graph, operators={"source": replay})
        load = executor.executor.load
    else:
        executor = LocalExecutor(graph, operators={"source": replay})
        load = executor.load

    async def main() -> PipelineResult:
        async def progress() -> None:
            while True:
                bar.update(load.completed + load.failed - bar.n)
                await trio.sleep(PROGRESS_POLL_S)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress)
            result = await executor.run()
            nursery.cancel_scope.cancel()
        bar.update(load.completed + load.failed - bar.n)
        return result

    result = trio.run(main)
    first = min(r.arrival_time for r in requests)
    ends = [r.arrival_time + o.metrics.e2e_s for r in requests if (o := result.outcomes.get(r.request_id)) and _e2e(o)]
    return result, (max(ends) - first) if ends else math.nan


def run_pd_bench(config: PDBenchConfig) -> PDBenchReport:
    """Capacity first (unless `rate` is given), then every configuration on the same trace, one after the other."""
    from sagellm.bench.offline import machine_info
    from sagellm.runtime.models.loader import load_model

    tokenizer = load_model(config.model, load_weights=False).tokenizer
    capacity, rate = None, config.rate
    if rate is None:
        probe = make_trace(tokenizer, config, config.capacity_requests, None).requests(config)
        with tqdm(total=len(probe), desc="capacity", unit="req", disable=not config.progress) as bar:
            graph = build_graph("colocated", config)
            _, wall = run_config(graph, probe, None, bar, max_in_flight=config.max_num_seqs)
        capacity = len(probe) / wall
        rate = config.load_factor * capacity
        gc.collect()
    trace = make_trace(tokenizer, config, config.num_requests, rate)
    results = []
    for kind in config.configs:
        requests = trace.requests(config)
        with tqdm(total=len(requests), desc=kind, unit="req", disable=not config.progress) as bar:
            result, wall = run_config(build_graph(kind, config), requests, trace.offsets_s, bar)
        split = result.operators.get("pd_split")
        decisions = dict(split.decisions) if split is not None else {}
        results.append(ConfigResult(kind, wall, [_request_row(r, result) for r in requests], decisions))
        del result
        gc.collect()
    return PDBenchReport(config, capacity, rate, machine_info(config.colocated_threads), results)


def _request_row(request: Request, result: PipelineResult) -> dict[str, Any]:
    outcome = result.outcomes.get(request.request_id)
    m = outcome.metrics if outcome is not None else None
    error = outcome.error if outcome is not None else None
    return {
        "id": request.request_id,
        "prompt_tokens": request.num_prompt_tokens,
        "output_tokens": len(outcome.token_ids) if outcome is not None else 0,
        "ttft_s": m.ttft_s if m else None,
        "tpot_s": m.tpot_s if m else None,
        "e2e_s": m.e2e_s if m else None,
        "slo_met": m.slo_met if m else False,
        "error": f"{error.code}: {error.message}" if error else (None if outcome else "never finished"),
    }


def _e2e(outcome: Any) -> bool:
    return outcome.metrics is not None and outcome.metrics.e2e_s is not None


def _pct(values: list[float], q: float) -> float:
    return 1000 * float(np.percentile(values, q)) if values else math.nan


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


# -- output ---------------------------------------------------------------------------------------------------------
COLUMNS = (  # (summary key, header, format)
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("ttft_short_p50_ms", "TTFT p50 short", "{:.0f}"),
    ("ttft_long_p50_ms", "TTFT p50 long", "{:.0f}"),
    ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
    ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"),
    ("slo_attainment", "SLO met", "{:.0%}"),
    ("goodput_req_s", "goodput req/s", "{:.3f}"),
    ("throughput_req_s", "req/s", "{:.3f}"),
    ("out_tok_s", "out tok/s", "{:.1f}"),
    ("wall_s", "wall s", "{:.1f}"),
)


def _threads(report: PDBenchReport, kind: str) -> str:
    c = report.config
    return f"{c.colocated_threads}" if kind == "colocated" else f"{c.split_threads} + {c.split_threads}"


def _caption(report: PDBenchReport) -> str:
    c, m = report.config, report.machine
    rate = f"{report.rate:.3f} req/s Poisson"
    if report.capacity_req_s is not None:
        rate += f" ({c.load_factor:g}× the colocated capacity of {report.capacity_req_s:.3f} req/s)"
    return (
        f"{c.num_requests} requests, {1 - c.long_fraction:.0%} × {c.short_len} + {c.long_fraction:.0%} × "
        f"{c.long_len} prompt tokens, {c.output_len} output tokens, {rate}; SLOs TTFT ≤ {c.ttft_slo_s:g} s, "
        f"TPOT ≤ {1000 * c.tpot_slo_s:g} ms; pd threshold {c.threshold_tokens} tokens; max_num_seqs "
        f"{c.max_num_seqs}, max_num_batched_tokens {c.max_num_batched_tokens}, fp32 weights; {m['cpu']}, "
        f"{m['cores']} cores, torch {m['torch']}"
    )


def print_table(report: PDBenchReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("config", "torch threads", "done", *(h for _, h, _ in COLUMNS), title="W4 mixed lengths: PD split")
    for r in report.results:
        s = r.summary(report.config)
        cells = ["–" if math.isnan(s[k]) else fmt.format(s[k]) for k, _, fmt in COLUMNS]
        table.add_row(r.name, _threads(report, r.name), f"{s['finished']}/{len(r.requests)}", *cells)
    table.caption = _caption(report)
    Console(width=None if sys.stdout.isatty() else 220).print(table)


def write_results(report: PDBenchReport, out: Path) -> tuple[Path, Path]:
    """`out` with .json (every number, every request, the machine) and .png (latencies and goodput)."""
    return write_json_and_plot(out, report.to_json(), lambda png: _plot(report, png))


def _plot(report: PDBenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in report.results]
    rows = [r.summary(report.config) for r in report.results]
    x, width = np.arange(len(names)), 0.38
    fig, axes = plt.subplots(1, 3, figsize=(4 + 3 * len(names), 4.4))
    panels = (
        ("ttft", "TTFT ms", 1000 * report.config.ttft_slo_s),
        ("tpot", "TPOT ms", 1000 * report.config.tpot_slo_s),
    )
    for ax, (metric, label, slo) in zip(axes, panels):
        for i, q in enumerate(("p50", "p99")):
            values = [row[f"{metric}_{q}_ms"] for row in rows]
            bars = ax.bar(x + (i - 0.5) * width, values, width, label=q, color=f"C{i}")
            ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
        ax.axhline(slo, color="red", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
        ax.set(xticks=x, xticklabels=names, ylabel=f"{label} (lower is better)")
        ax.legend(fontsize=8)
        ax.margins(y=0.15)
    ax = axes[2]
    for i, (key, label) in enumerate((("goodput_req_s", "goodput"), ("throughput_req_s", "throughput"))):
        bars = ax.bar(x + (i - 0.5) * width, [row[key] for row in rows], width, label=label, color=f"C{i + 2}")
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.axhline(report.rate, color="grey", linestyle=":", linewidth=1, label=f"offered {report.rate:.2f}")
    ax.set(xticks=x, xticklabels=names, ylabel="requests/s (higher is better)")
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.suptitle("W4 mixed lengths: colocated vs prefill/decode split, same cores, same trace", fontsize=10)
    fig.text(0.5, 0.01, _caption(report), ha="center", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line (`sagellm bench pd`, wired by the CLI) --------------------------------------------------------------
def add_arguments(parser: Any) -> None:
    d = PDBenchConfig(model="")
    parser.add_argument(
        "--model", "-m", default=None, help="path, .gguf or cache alias (default: smollm2-135m-instruct)"
    )
    parser.add_argument("--num-requests", type=int, default=d.num_requests, help="requests in the trace (%(default)s)")
    parser.add_argument(
        "--rate", type=float, default=None, help="arrivals/s (default: load factor × measured capacity)"
    )
    parser.add_argument("--load-factor", type=float, default=d.load_factor, help="of capacity (default: %(default)s)")
    parser.add_argument("--capacity-requests", type=int, default=d.capacity_requests, help="closed-loop probe size")
    parser.add_argument("--short-len", type=int, default=d.short_len, help="short prompt tokens (%(default)s)")
    parser.add_argument("--long-len", type=int, default=d.long_len, help="long prompt tokens (%(default)s)")
    parser.add_argument("--long-fraction", type=float, default=d.long_fraction, help="share of long prompts")
    parser.add_argument("--output-len", type=int, default=d.output_len, help="output tokens, EOS ignored")
    parser.add_argument("--threshold-tokens", type=int, default=d.threshold_tokens, help="pd_split threshold")
    parser.add_argument("--ttft-slo-ms", type=float, default=1000 * d.ttft_slo_s, help="TTFT SLO (%(default)s)")
    parser.add_argument("--tpot-slo-ms", type=float, default=1000 * d.tpot_slo_s, help="TPOT SLO (%(default)s)")
    parser.add_argument("--configs", default=",".join(d.configs), help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--colocated-threads", type=int, default=d.colocated_threads, help="single engine's threads")
    parser.add_argument("--split-threads", type=int, default=d.split_threads, help="threads per engine process")
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="per engine (%(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens, help="per step")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of prompts and arrivals")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pd_split"), help="writes OUT.json/.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--log-level", default="warning")


def run(args: Any) -> int:
    from sagellm.model_cache import DEFAULT_MODEL, resolve_model

    config = PDBenchConfig(
        model=str(resolve_model(args.model or DEFAULT_MODEL)),
        num_requests=args.num_requests,
        rate=args.rate,
        load_factor=args.load_factor,
        capacity_requests=args.capacity_requests,
        short_len=args.short_len,
        long_len=args.long_len,
        long_fraction=args.long_fraction,
        output_len=args.output_len,
        threshold_tokens=args.threshold_tokens,
        ttft_slo_s=args.ttft_slo_ms / 1000,
        tpot_slo_s=args.tpot_slo_ms / 1000,
        configs=tuple(c.strip() for c in args.configs.split(",") if c.strip()),
        colocated_threads=args.colocated_threads,
        split_threads=args.split_threads,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
        progress=not args.no_progress,
    )
    report = run_pd_bench(config)
    print_table(report)
    for path in write_results(report, args.out):
        print(f"results: {path}", file=sys.stderr)
    return 0
