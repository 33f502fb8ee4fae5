"""The control-plane overhead benchmark (W5, without HTTP): what the pipeline adds per request in front of an engine.

The engine is the `instant_engine` fixture (tokens streamed with no compute), so everything measured beyond the
fixture's own cost is the pipeline's. Closed loop: `requests` requests, a new one whenever fewer than `concurrency`
are in flight, each streaming `tokens` deltas. Paths, all in one run because the machine is shared and only
side-by-side ratios hold:
- direct: the fixture driven by a plain loop (add while below the concurrency, step, collect): the floor;
- pipeline: replay_source → admission → policy_sort → route → instant_engine → metrics_sink on the LocalExecutor;
- pipeline-2-engines: the same with route spreading over two fixtures (the cost of a real routing choice).
A request's end-to-end latency is from its release (`arrival_time`, stamped by the source or the loop) to its last
delta reaching the consumer (the graph's leaf, or the loop after `step()`), on the same wall clock in every path.
Every path must finish every request with exactly `tokens` tokens, or the run fails: a path that dropped work
cannot look fast."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio
from tqdm import tqdm

from sagellm.benchmarks.errors import BenchmarkError
from sagellm.benchmarks.instant_engine import InstantEngine
from sagellm.benchmarks.report import write_json_and_plot
from sagellm.common.errors import InvalidInput
from sagellm.dsl import Pipeline
from sagellm.operators.replay_source import ReplaySource
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.metrics import LatencyStats

PATHS = ("direct", "pipeline", "pipeline-2-engines")
DESCRIPTIONS = {
    "direct": "instant_engine driven by a plain loop: add below the concurrency, step, collect (the floor)",
    "pipeline": "replay_source → admission → policy_sort → route → instant_engine → metrics_sink, LocalExecutor",
    "pipeline-2-engines": "the same pipeline with route (load_balanced) over two instant_engine nodes",
}
COLUMNS = (  # (row key, header, format)
    ("e2e_p50_ms", "e2e p50 ms", "{:.2f}"),
    ("e2e_p99_ms", "e2e p99 ms", "{:.2f}"),
    ("added_p50_ms", "added p50 ms", "{:+.2f}"),
    ("added_p99_ms", "added p99 ms", "{:+.2f}"),
    ("req_s", "req/s", "{:.0f}"),
    ("cpu_ms_per_req", "CPU ms/req", "{:.3f}"),
    ("mean_in_flight", "mean in flight", "{:.1f}"),
    ("wall_s", "wall s", "{:.2f}"),
)


@dataclass
class OverheadConfig:
    requests: int = 10_000
    concurrency: int = 64
    tokens: int = 16  # streamed per request (W5: 16-token replies)
    prompt_tokens: int = 32  # token ids given, so admission needs no tokenizer
    paths: tuple[str, ...] = PATHS
    progress: bool = True


@dataclass
class PathResult:
    path: str
    e2e_s: list[float]  # per request, release → last delta at the consumer
    wall_s: float  # first release → last request ended
    cpu_s: float  # time.process_time() of the whole process (every thread) over the same span
    output_tokens: int  # streamed tokens that reached the consumer, all requests


@dataclass
class OverheadReport:
    config: OverheadConfig
    machine: dict[str, object]
    results: list[PathResult] = field(default_factory=list)

    def row(self, path: str) -> dict[str, float | None]:
        """This path's numbers; the `added_*` ones are None when the direct path was not run."""
        result = next(r for r in self.results if r.path == path)
        n, e2e = len(result.e2e_s), LatencyStats.of(result.e2e_s)
        direct = next((LatencyStats.of(r.e2e_s) for r in self.results if r.path == "direct"), None)
        return {
            "e2e_p50_ms": e2e.p50_ms,
            "e2e_p99_ms": e2e.p99_ms,
            "e2e_mean_ms": e2e.avg_ms,
            "added_p50_ms": e2e.p50_ms - direct.p50_ms if direct else None,
            "added_p99_ms": e2e.p99_ms - direct.p99_ms if direct else None,
            "req_s": n / result.wall_s,
            "cpu_ms_per_req": 1000 * result.cpu_s / n,
            "mean_in_flight": sum(result.e2e_s) / result.wall_s,  # Little's law: the concurrency really held
            "wall_s": result.wall_s,
            "completed": n,
            "output_tokens": result.output_tokens,
        }

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "benchmark": "W5 control-plane overhead (pipeline, no HTTP)",
            "config": {k: v for k, v in asdict(c).items() if k != "progress"} | {"paths": list(c.paths)},
            "machine": self.machine,
            "results": [{"path": r.path, **self.row(r.path)} for r in self.results],
            "definitions": DESCRIPTIONS
            | {
                "e2e": "release of the request → its last delta at the consumer, wall clock",
                "added": "this path's e2e percentile minus the direct path's (distributions compared, not pairs)",
                "cpu_ms_per_req": "process CPU time (all threads) over the run / requests",
                "mean_in_flight": "sum of e2e / wall time (Little's law): the concurrency the path really held",
            },
        }


def run_pipeline_overhead(config: OverheadConfig) -> OverheadReport:
    """Every path in turn on fresh requests, each checked to have finished every request with `tokens` tokens."""
    unknown = set(config.paths) - set(PATHS)
    if unknown or min(config.requests, config.concurrency, config.tokens, config.prompt_tokens) < 1:
        raise InvalidInput(f"paths must be among {', '.join(PATHS)} (got {sorted(unknown)}); counts must be >= 1")
    results = []
    with tqdm(total=config.requests * len(config.paths), unit="req", disable=not config.progress) as bar:
        tick = _Ticker(bar, max(1, config.requests // 100))
        for path in config.paths:
            bar.set_description(path)
            results.append(_run_direct(config, tick) if path == "direct" else _run_graph(config, path, tick))
            tick.flush()
    import torch

    from sagellm.benchmarks.offline import machine_info

    return OverheadReport(config, machine_info(torch.get_num_threads()), results)


class _Ticker:
    """Counts finished requests and moves the progress bar only every `every` of them, to keep it out of the timing."""

    def __init__(self, bar: tqdm, every: int) -> None:
        self.bar, self.every, self.count = bar, every, 0

    def __call__(self) -> None:
        self.count += 1
        if self.count == self.every:
            self.flush()

    def flush(self) -> None:
        self.bar.update(self.count)
        self.count = 0


def make_requests(config: OverheadConfig) -> list[Request]:
    prompt = [i % 1000 for i in range(config.prompt_tokens)]
    sampling = SamplingParams(max_tokens=config.tokens)
    return [
        Request(request_id=f"w5-{i}", prompt_token_ids=list(prompt), sampling=sampling) for i in range(config.requests)
    ]


def build_graph(config: OverheadConfig, engines: int, model: str | None = None, reply: str = "") -> Graph:
    """The W5 graph with `engines` instant engines behind route, all feeding one metrics_sink (the leaf); `model`:
    whose tokenizer the front end uses (chat requests, text prompts), `reply`: the text the engines stream."""
    attrs = {"model": model} if model else {}
    p = Pipeline(f"w5-{engines}-engines", description="W5: the control plane in front of instant engines", **attrs)
    route = p.add("route")
    p.chain(p.add(ReplaySource, id="source"), p.add("admission"), p.add("policy_sort"), route)
    sink = p.add("metrics_sink")
    for i in range(engines):
        engine = p.add(InstantEngine, id=f"engine_{i}", tokens=config.tokens, **({"reply": reply} if reply else {}))
        p.connect(route, engine)
        p.connect(engine, sink)
    return p.graph()


def _run_graph(config: OverheadConfig, path: str, tick: Callable[[], None]) -> PathResult:
    requests = make_requests(config)
    graph = build_graph(config, engines=2 if path == "pipeline-2-engines" else 1)
    source = ReplaySource(requests, max_in_flight=config.concurrency)
    executor = LocalExecutor(graph, operators={"source": source})
    done: dict[str, float] = {}

    def on_terminal(item: Any) -> None:
        done[item.request_id] = time.time()
        tick()

    executor.ledger.on_terminal.append(on_terminal)

    async def drive() -> tuple[Any, float, float]:
        await executor.open_operators()  # untimed: builds the nodes
        wall, cpu = time.perf_counter(), time.process_time()
        result = await executor.run()
        return result, time.perf_counter() - wall, time.process_time() - cpu

    result, wall_s, cpu_s = trio.run(drive)
    counts: dict[str, int] = {}
    problems: list[str] = []
    for rid, outcome in result.outcomes.items():
        counts[rid] = len(outcome.token_ids)
        if outcome.error is not None or outcome.finish_reason != "length":
            problems.append(f"{rid}: {outcome.error.message if outcome.error else outcome.finish_reason}")
    check_complete(config, path, counts, problems)
    e2e_s = [done[r.request_id] - r.arrival_time for r in requests]
    return PathResult(path, e2e_s, wall_s, cpu_s, sum(counts.values()))


def _run_direct(config: OverheadConfig, tick: Callable[[], None]) -> PathResult:
    """The fixture's own cost: the loop a pipeline replaces, with the same admission rule (closed loop)."""
    requests = make_requests(config)
    engine, waiting = InstantEngine(tokens=config.tokens), deque(requests)
    counts: Counter[str] = Counter()
    done: dict[str, float] = {}
    problems: list[str] = []
    held = 0
    wall, cpu = time.perf_counter(), time.process_time()
    while waiting or engine.has_work():
        while waiting and held < config.concurrency:
            request = waiting.popleft()
            request.arrival_time = time.time()
            problems += [f"{request.request_id}: {e.message}" for e in engine.add(request)]
            held += 1
        deltas = engine.step()
        now = time.time()
        for delta in deltas:
            counts[delta.request_id] += len(delta.token_ids)
            if delta.finish_reason is not None:
                done[delta.request_id] = now
                held -= 1
                tick()
    wall_s, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    check_complete(config, "direct", counts, problems)
    e2e_s = [done[r.request_id] - r.arrival_time for r in requests]
    return PathResult("direct", e2e_s, wall_s, cpu_s, sum(counts.values()))


def check_complete(config: OverheadConfig, path: str, counts: dict[str, int], problems: list[str]) -> None:
    """Raises unless every request was seen with exactly `tokens` tokens and none failed (`counts`: rid -> tokens)."""
    short = [rid for rid, n in counts.items() if n != config.tokens]
    if problems or short or len(counts) != config.requests:
        raise BenchmarkError(
            f"{path}: {len(counts)}/{config.requests} requests seen, {len(short)} without {config.tokens} tokens, "
            f"{len(problems)} failed (first: {(problems or short or ['-'])[0]})"
        )


def print_table(report: OverheadReport) -> None:
    from rich.console import Console
    from rich.table import Table

    c = report.config
    title = f"W5 control-plane overhead: {c.requests} requests, concurrency {c.concurrency}, {c.tokens} tokens streamed"
    table = Table("path", *(header for _, header, _ in COLUMNS), title=title)
    for result in report.results:
        row = report.row(result.path)
        table.add_row(result.path, *("–" if row[key] is None else fmt.format(row[key]) for key, _, fmt in COLUMNS))
    table.caption = f"added = e2e percentile minus direct's; CPU = whole process; {_machine_line(report)}"
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def write_results(report: OverheadReport, out_dir: Path) -> tuple[Path, Path]:
    """pipeline_overhead.json (every number, the machine) and pipeline_overhead.png under `out_dir`."""
    return write_json_and_plot(out_dir / "pipeline_overhead", report.to_json(), lambda png: _plot(report, png))


def _machine_line(report: OverheadReport) -> str:
    m = report.machine
    return f"{m['cpu']}, {m['cores']} cores, Python {m['python']}, sagellm {m['sagellm']}; one run per path"


def _plot(report: OverheadReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [r.path for r in report.results]
    rows = [report.row(p) for p in paths]
    x = range(len(paths))
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(4 + 2.4 * len(paths), 4.4))
    for offset, key, label in ((-0.2, "e2e_p50_ms", "p50"), (0.2, "e2e_p99_ms", "p99")):
        bars = lat.bar([i + offset for i in x], [r[key] for r in rows], width=0.4, label=label)
        lat.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    lat.set_xticks(list(x), paths, fontsize=8)
    lat.set_ylabel("end-to-end latency, ms (lower is better)")
    lat.legend(fontsize=8)
    bars = thr.bar(paths, [r["req_s"] for r in rows], color=[f"C{PATHS.index(p) + 2}" for p in paths])
    thr.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
    thr.tick_params(axis="x", labelsize=8)
    thr.set_ylabel("requests/s (higher is better)")
    for ax in (lat, thr):
        ax.margins(y=0.15)
    c = report.config
    fig.suptitle(f"W5: {c.requests} requests, concurrency {c.concurrency}, {c.tokens} tokens each", fontsize=10)
    fig.text(0.5, 0.01, _machine_line(report), ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `sagellm bench pipeline`."""
    d = OverheadConfig()
    parser.add_argument("--requests", type=int, default=d.requests, help="requests per path (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=d.concurrency, help="closed-loop requests in flight")
    parser.add_argument("--tokens", type=int, default=d.tokens, help="tokens streamed per request (default: 16)")
    parser.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="prompt token ids per request")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma list of %(default)s")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for pipeline_overhead.*")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", default="warning", help="info logs every finished request: it costs time")


def run(args: argparse.Namespace) -> int:
    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    config = OverheadConfig(
        args.requests, args.concurrency, args.tokens, args.prompt_tokens, paths, progress=not args.no_progress
    )
    report = run_pipeline_overhead(config)
    print_table(report)
    for path in write_results(report, args.out):
        print(f"results: {path}", file=sys.stderr)
    return 0
