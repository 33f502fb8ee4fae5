"""The command line of `sagellm bench serve`: options, targets, the rich tables, the JSON result and the PNG chart.
The load generator and the metrics are `sagellm.benchmarks.serve`."""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from sagellm.benchmarks.report import add_repeats_argument, median_summary
from sagellm.benchmarks.serve import (
    DEFAULT_NUM_PROMPTS,
    ENDPOINTS,
    METRICS,
    SLO_METRICS,
    TABLE_PERCENTILES,
    BenchResult,
    ServeConfig,
    Target,
    benchmark,
    summarize,
)
from sagellm.benchmarks.serve_datasets import SampleRequest
from sagellm.common.errors import InvalidInput

COLUMNS = (  # (summary key, header, format); every request count is summed over repeats, the rest are medians
    ("out_tok_s", "out tok/s", "{:.1f}"),
    ("req_s", "req/s", "{:.3f}"),
    ("mean_output_tokens", "tok/req", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
    ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.1f}"),
    ("e2el_p50_ms", "e2e p50 ms", "{:.0f}"),
    ("goodput_req_s", "goodput req/s", "{:.3f}"),
)
DEFINITIONS = {
    "ttft": "request sent → first streamed chunk with non-empty text",
    "itl": "gaps between consecutive text chunks, all requests pooled",
    "tpot": "(e2e - ttft) / (output tokens - 1), per request with more than one output token",
    "e2el": "request sent → end of its stream",
    "output_tokens": "usage.completion_tokens of the stream's final chunk, else the number of text chunks",
    "req_s / out_tok_s": "completed requests / output tokens over the run's wall time (first send → last end)",
    "goodput_req_s": "completed requests meeting every --goodput SLO, per second of wall time",
    "repeats": "table values are medians over repeats; request counts are summed",
}


def parse_targets(specs: Sequence[str], base_url: str) -> tuple[Target, ...]:
    """`--target NAME=BASE_URL` entries (unique names), or the lone `--base-url` named by its host:port."""
    if not specs:
        return (Target(base_url.rstrip("/").split("://")[-1], base_url.rstrip("/")),)
    targets = []
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise InvalidInput(f"--target {spec!r}: expected NAME=http://HOST:PORT")
        targets.append(Target(name, url.rstrip("/")))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise InvalidInput(f"--target names must differ, got {', '.join(names)}")
    return tuple(targets)


def parse_goodput(specs: Sequence[str]) -> dict[str, float]:
    """`--goodput ttft:MS tpot:MS e2el:MS` as {metric: milliseconds}."""
    slos = {}
    for spec in specs:
        metric, _, ms = spec.partition(":")
        try:
            limit = float(ms)
        except ValueError:
            limit = math.nan
        if metric not in SLO_METRICS or not limit > 0:
            metrics = ", ".join(SLO_METRICS)
            raise InvalidInput(f"--goodput {spec!r}: expected METRIC:MS with METRIC in {metrics}, MS > 0")
        slos[metric] = limit
    return slos


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1 (default: %(default)s)")
    a("--target", action="append", default=[], metavar="NAME=BASE_URL", help="a server to compare (repeatable)")
    a("--endpoint", default=ENDPOINTS[0], choices=ENDPOINTS, help="(default: %(default)s)")
    a("--model", default=None, help="model name to send (default: each server's first of GET /v1/models)")
    a("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    a("--lora-modules", nargs="+", default=[], metavar="NAME", help="LoRA adapters the requests name in turn (vLLM's)")
    a("--dataset-name", default="random", choices=("random", "jsonl"), help="(default: %(default)s)")
    a("--dataset-path", type=Path, default=None, help='JSONL file, per line {"prompt": ..., "output_len": N}')
    a("--tokenizer", default=None, help="model path or alias whose tokenizer makes random prompts (default model)")
    a("--num-prompts", type=int, default=None, help=f"requests per run (default: {DEFAULT_NUM_PROMPTS}; jsonl: all)")
    a("--random-input-len", type=int, default=256, help="unique prompt tokens (default: %(default)s)")
    a("--random-output-len", type=int, default=128, help="max_tokens; also for JSONL lines without one (128)")
    a("--random-range-ratio", type=float, default=0.0, help="lengths uniform in len*(1±ratio) (default: 0)")
    a("--random-prefix-len", type=int, default=0, help="tokens of a prefix shared by every prompt (default: 0)")
    a("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    a("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default: inf, all at once)")
    a("--seed", type=int, default=0, help="seed of the prompts and arrivals (default: 0)")
    a("--ignore-eos", action="store_true", help="ask for exactly max_tokens tokens (vLLM and llama.cpp honour it)")
    a("--temperature", type=float, default=0.0, help="(default: 0, greedy)")
    a("--percentile-metrics", default=",".join(METRICS), help="comma list of %(default)s")
    a("--metric-percentiles", default="50,90,99", help="comma list (default: %(default)s)")
    a("--goodput", nargs="+", default=[], metavar="METRIC:MS", help="SLOs, e.g. ttft:2000 tpot:200 e2el:30000")
    add_repeats_argument(parser, "targets")
    a("--timeout", type=float, default=600.0, help="seconds one request may take (default: %(default)s)")
    a("--save-result", action="store_true", help="write the JSON results and a PNG chart")
    a("--result-filename", type=Path, default=Path("benchmarks/results/serve.json"), help="(PNG: same stem)")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--log-level", default="warning", help="debug, info, warning or error (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark; 0 when every target completed requests in every run, else 1 (reasons are printed)."""
    from sagellm.benchmarks.report import write_json_and_plot

    targets = parse_targets(args.target, args.base_url)
    metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    if not set(metrics) <= set(METRICS):
        raise InvalidInput(f"--percentile-metrics: choose from {', '.join(METRICS)}, got {args.percentile_metrics}")
    percentiles = [float(q) for q in args.metric_percentiles.split(",") if q.strip()]
    if not all(0 < q <= 100 for q in percentiles):
        raise InvalidInput(f"--metric-percentiles must be in (0, 100], got {args.metric_percentiles}")
    slos = parse_goodput(args.goodput)
    for flag in ("max_concurrency", "num_prompts"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InvalidInput(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    config = ServeConfig(
        targets, args.endpoint, args.model, args.api_key, args.max_concurrency, args.request_rate, args.seed,
        args.ignore_eos, args.temperature, args.timeout, not args.no_progress, tuple(args.lora_modules),
    )  # fmt: skip
    result = trio.run(benchmark, config, _request_sets(args))
    every_q = sorted({*percentiles, *TABLE_PERCENTILES})
    summaries = [summarize(r.records, r.wall_s, percentiles=every_q, slos_ms=slos) for r in result.runs]
    medians = {
        t.name: median_summary([s for r, s in zip(result.runs, summaries) if r.target == t.name])
        for t in targets
        if t.name not in result.errors
    }
    title = _title(args)
    _print_tables(result, medians, metrics, percentiles, title, args.repeats)
    if args.save_result:
        payload = _payload(args, targets, result, summaries, medians)
        paths = write_json_and_plot(args.result_filename, payload, lambda png: _plot(medians, png, title))
        print(f"results: {paths[0]}\nchart: {paths[1]}", file=sys.stderr)
    return 0 if not result.errors and all(s["completed"] for s in summaries) else 1


def _request_sets(args: argparse.Namespace) -> list[list[SampleRequest]]:
    """One prompt list per repeat: fresh random prompts each round (no prefix-cache hits across rounds); a JSONL
    file's lines every round."""
    from sagellm.benchmarks.serve_datasets import jsonl_requests, load_tokenizer, random_requests

    if args.dataset_name == "jsonl":
        if args.dataset_path is None:
            raise InvalidInput("--dataset-name jsonl needs --dataset-path")
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        return [jsonl_requests(args.dataset_path, args.num_prompts, args.random_output_len, tokenizer)] * args.repeats
    tokenizer = load_tokenizer(args.tokenizer)
    shape = (args.num_prompts or DEFAULT_NUM_PROMPTS, args.random_input_len, args.random_output_len)
    ratio, prefix = args.random_range_ratio, args.random_prefix_len
    return [
        random_requests(tokenizer, *shape, range_ratio=ratio, prefix_len=prefix, seed=(args.seed, r))
        for r in range(args.repeats)
    ]


def _title(args: argparse.Namespace) -> str:
    shape = f"{args.random_input_len} in / {args.random_output_len} out" if args.dataset_name == "random" else "jsonl"
    rate = "all at once" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s Poisson"
    return f"{args.endpoint}, {shape}, concurrency {args.max_concurrency or 'unlimited'}, {rate}"


def _fmt(value: float | None, spec: str = "{:.1f}") -> str:
    return "–" if value is None else spec.format(value)


def _print_tables(
    result: BenchResult,
    medians: dict[str, dict[str, float | None]],
    metrics: list[str],
    percentiles: list[float],
    title: str,
    repeats: int,
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)  # piped: no 80-column squeeze
    caption = f"medians of {repeats} run(s); ok/failed summed over runs"
    table = Table("target", "ok/failed", *(header for _, header, _ in COLUMNS), title=title, caption=caption)
    for name, m in medians.items():
        table.add_row(name, f"{m['completed']:.0f}/{m['failed']:.0f}", *(_fmt(m[k], f) for k, _, f in COLUMNS))
    for name in result.errors:
        table.add_row(name, "not run", *("–" for _ in COLUMNS))
    console.print(table)
    detail = Table("target", "metric", "mean ms", *(f"p{q:g} ms" for q in percentiles), title="latency percentiles")
    for name, m in medians.items():
        for metric in metrics:
            keys = [f"{metric}_mean_ms", *(f"{metric}_p{q:g}_ms" for q in percentiles)]
            detail.add_row(name, metric, *(_fmt(m[k]) for k in keys))
    console.print(detail)
    for error in result.errors.values():
        console.print(f"not benchmarked: {error}", markup=False)
    for name in medians:
        failures = Counter(r.error for run in result.runs if run.target == name for r in run.records if not r.ok)
        for error, count in failures.most_common():
            console.print(f"{name}: {count} request(s) failed: {error}", markup=False)


def _payload(
    args: argparse.Namespace,
    targets: tuple[Target, ...],
    result: BenchResult,
    summaries: list[dict[str, float | None]],
    medians: dict[str, dict[str, float | None]],
) -> dict[str, Any]:
    from sagellm.benchmarks.offline import machine_info

    options = {k: _jsonable(v) for k, v in vars(args).items() if not callable(v)}
    options["api_key"] = options["api_key"] and "(set, not stored)"
    return {
        "benchmark": "sagellm bench serve",
        "config": options,
        "machine": {k: v for k, v in machine_info(1).items() if k != "torch_threads"},  # a client: no torch work
        "targets": [
            {
                "name": t.name,
                "base_url": t.base_url,
                "model": result.models.get(t.name),
                "error": result.errors.get(t.name),
            }
            for t in targets
        ],
        "summary": medians,
        "runs": [
            {"target": r.target, "repeat": r.repeat, "summary": s, "requests": [x.to_json() for x in r.records]}
            for r, s in zip(result.runs, summaries)
        ],
        "definitions": DEFINITIONS,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value) if isinstance(value, Path) else value


def _plot(medians: dict[str, dict[str, float | None]], path: Path, title: str) -> None:
    """Bars per target: output tok/s, TTFT, TPOT/ITL and e2e percentiles (medians over repeats)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("output tokens/s (higher is better)", (("", "out_tok_s"),)),
        ("TTFT ms", (("p50", "ttft_p50_ms"), ("p99", "ttft_p99_ms"))),
        ("TPOT / ITL ms", (("TPOT p50", "tpot_p50_ms"), ("TPOT p99", "tpot_p99_ms"), ("ITL p50", "itl_p50_ms"))),
        ("e2e ms", (("p50", "e2el_p50_ms"), ("p99", "e2el_p99_ms"))),
    )
    widths = [max(len(series), 2) for _, series in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 + 1.5 * sum(widths), 4.5), width_ratios=widths, squeeze=False)
    bar = 0.8 / max(len(medians), 1)
    for ax, (panel_title, series) in zip(axes[0], panels):
        for i, (name, m) in enumerate(medians.items()):
            values = [m[key] or 0.0 for _, key in series]
            xs = [x + (i - (len(medians) - 1) / 2) * bar for x in range(len(series))]
            bars = ax.bar(xs, values, bar, label=name, color=f"C{i}")
            ax.bar_label(bars, fmt="%.0f" if max(values) >= 100 else "%.1f", fontsize=7, padding=2)
        ax.set_xticks(range(len(series)), [label for label, _ in series])
        ax.set_title(panel_title, fontsize=10)
        ax.margins(y=0.15)
    if medians:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(f"sagellm bench serve: {title}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
