"""W4, colocated vs prefill/decode split on mixed prompt lengths, on the same cores and the same Poisson traces:
TTFT, TPOT and goodput per configuration, medians over repeats.

This file is the benchmark's output and command line (`sagellm bench pd`): each run's numbers, their medians over
repeats (request counts summed), the rich table, the JSON (medians and every run's own numbers and requests) and the
PNG chart. `pd_split` runs the benchmark."""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from sagellm.benchmarks.pd_split import (
    CONFIGS,
    DESCRIPTIONS,
    ConfigResult,
    PDBenchConfig,
    PDBenchReport,
    halves,
    run_pd_bench,
)
from sagellm.benchmarks.report import add_repeats_argument, median_summary, write_json_and_plot
from sagellm.common.affinity import usable_cores

Summary = dict[str, float | None]
COLUMNS = (  # (summary key, header, format); medians over repeats
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


def summarize(result: ConfigResult, config: PDBenchConfig) -> Summary:
    """One run's numbers; a percentile with nothing to measure is None."""
    done = [r for r in result.requests if r["error"] is None]
    ttft, tpot = [r["ttft_s"] for r in done], [r["tpot_s"] for r in done if r["tpot_s"] is not None]
    short = [r["ttft_s"] for r in done if r["prompt_tokens"] < config.long_len]
    long = [r["ttft_s"] for r in done if r["prompt_tokens"] >= config.long_len]
    good = sum(bool(r["slo_met"]) for r in done)
    return {
        "completed": len(done),
        "failed": len(result.requests) - len(done),
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p99_ms": _pct(ttft, 99),
        "ttft_short_p50_ms": _pct(short, 50),
        "ttft_long_p50_ms": _pct(long, 50),
        "tpot_p50_ms": _pct(tpot, 50),
        "tpot_p99_ms": _pct(tpot, 99),
        "slo_attainment": good / len(result.requests),
        "goodput_req_s": good / result.wall_s,
        "throughput_req_s": len(done) / result.wall_s,
        "out_tok_s": sum(r["output_tokens"] for r in done) / result.wall_s,
        "wall_s": result.wall_s,
    }


def medians(report: PDBenchReport) -> dict[str, Summary]:
    """Per configuration (in run order): each number's median over repeats, request counts summed."""
    names = dict.fromkeys(r.name for r in report.results)
    return {name: median_summary([summarize(r, report.config) for r in report.runs(name)]) for name in names}


def report_json(report: PDBenchReport) -> dict[str, Any]:
    c = report.config
    results = []
    for name, median in medians(report).items():
        runs = report.runs(name)
        decisions = sum((Counter(r.decisions) for r in runs), Counter())
        results.append(
            {"config": name, **median, "pd_split": dict(decisions)}
            | {"runs": [_run_json(r, c) for r in runs]}  # every repeat's own numbers and requests
        )
    return {
        "benchmark": "W4 mixed lengths, prefill/decode split",
        "config": asdict(c),
        "capacity_req_s": report.capacity_req_s,
        "rate_req_s": report.rate,
        "machine": report.machine,
        "results": results,
        "definitions": DESCRIPTIONS
        | {
            "ttft": "release by the source to the first token leaving the engine that decodes it (after the KV "
            "transfer for PD requests)",
            "tpot": "(last token time - first token time) / (output tokens - 1)",
            "goodput": f"requests with TTFT <= {c.ttft_slo_s:g} s and TPOT <= {1000 * c.tpot_slo_s:g} ms / wall time",
            "wall": "first release to last finish",
            "capacity": "completed requests/s of the colocated engine in a closed loop of max_num_seqs in flight",
            "repeats": "each repeat replays a fresh trace (seed + repeat) through every configuration in turn; a "
            "config's numbers are medians over its runs, its completed / failed counts and pd_split decisions sums",
        },
    }


def _run_json(result: ConfigResult, config: PDBenchConfig) -> dict[str, Any]:
    numbers = {k: None if v is None or not math.isfinite(v) else v for k, v in summarize(result, config).items()}
    head = {"repeat": result.repeat, "seed": result.seed, "started": result.started, **numbers}
    return head | {"pd_split": result.decisions, "requests": result.requests}


def _pct(values: list[float], q: float) -> float | None:
    return 1000 * float(np.percentile(values, q)) if values else None


def _threads(report: PDBenchReport, kind: str) -> str:
    c = report.config
    if kind == "colocated":
        return f"{c.colocated_threads}"
    first, second = halves(usable_cores())
    return f"cores {_span(first)} + {_span(second)}"


def _span(cores: list[int]) -> str:
    return str(cores[0]) if len(cores) == 1 else f"{cores[0]}-{cores[-1]}"


def _caption(report: PDBenchReport) -> str:
    c, m = report.config, report.machine
    rate = f"{report.rate:.3f} req/s Poisson"
    if report.capacity_req_s is not None:
        rate += f" ({c.load_factor:g}× the colocated capacity of {report.capacity_req_s:.3f} req/s)"
    return (
        f"{_repeats(c)}; {c.num_requests} requests, {1 - c.long_fraction:.0%} × {c.short_len} + "
        f"{c.long_fraction:.0%} × {c.long_len} prompt tokens, {c.output_len} output tokens, {rate}; SLOs TTFT ≤ "
        f"{c.ttft_slo_s:g} s, TPOT ≤ {1000 * c.tpot_slo_s:g} ms; pd threshold {c.threshold_tokens} tokens; "
        f"max_num_seqs {c.max_num_seqs}, max_num_batched_tokens {c.max_num_batched_tokens}, fp32 weights; "
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}"
    )


def _repeats(c: PDBenchConfig) -> str:
    if c.repeats == 1:
        return f"one run (seed {c.seed})"
    seeds = f"seeds {c.seed}-{c.seed + c.repeats - 1}"
    return f"median of {c.repeats} repeats ({seeds}, configurations interleaved), request counts summed"


def print_table(report: PDBenchReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("config", "torch threads", "done", *(h for _, h, _ in COLUMNS), title="W4 mixed lengths: PD split")
    for name, m in medians(report).items():
        cells = ["–" if m[k] is None else fmt.format(m[k]) for k, _, fmt in COLUMNS]
        total = sum(len(r.requests) for r in report.runs(name))
        table.add_row(name, _threads(report, name), f"{m['completed']}/{total}", *cells)
    table.caption = _caption(report)
    Console(width=None if sys.stdout.isatty() else 220).print(table)


def write_results(report: PDBenchReport, out: Path) -> tuple[Path, Path]:
    """`out` with .json (medians, every run's numbers and requests, the machine) and .png (latencies, goodput)."""
    return write_json_and_plot(out, report_json(report), lambda png: _plot(report, png))


def _plot(report: PDBenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = medians(report)
    names = list(rows)
    x, width = np.arange(len(names)), 0.38

    def values(key: str) -> list[float]:
        return [math.nan if rows[name][key] is None else rows[name][key] for name in names]

    fig, axes = plt.subplots(1, 3, figsize=(4 + 3 * len(names), 4.4))
    panels = (
        ("ttft", "TTFT ms", 1000 * report.config.ttft_slo_s),
        ("tpot", "TPOT ms", 1000 * report.config.tpot_slo_s),
    )
    for ax, (metric, label, slo) in zip(axes, panels):
        for i, q in enumerate(("p50", "p99")):
            bars = ax.bar(x + (i - 0.5) * width, values(f"{metric}_{q}_ms"), width, label=q, color=f"C{i}")
            ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
        ax.axhline(slo, color="red", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
        ax.set(xticks=x, xticklabels=names, ylabel=f"{label} (lower is better)")
        ax.legend(fontsize=8)
        ax.margins(y=0.15)
    ax = axes[2]
    for i, (key, label) in enumerate((("goodput_req_s", "goodput"), ("throughput_req_s", "throughput"))):
        bars = ax.bar(x + (i - 0.5) * width, values(key), width, label=label, color=f"C{i + 2}")
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.axhline(report.rate, color="grey", linestyle=":", linewidth=1, label=f"offered {report.rate:.2f}")
    ax.set(xticks=x, xticklabels=names, ylabel="requests/s (higher is better)")
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.suptitle("W4 mixed lengths: colocated vs prefill/decode split, same cores, same traces", fontsize=10)
    fig.text(0.5, 0.01, _caption(report), ha="center", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- command line (`sagellm bench pd`, wired by the CLI) --------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="per engine (%(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens, help="per step")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of prompts and arrivals (+ repeat)")
    add_repeats_argument(parser, "configurations")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pd_split"), help="writes OUT.json/.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning or error (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

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
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
        repeats=args.repeats,
        progress=not args.no_progress,
    )
    report = run_pd_bench(config)
    print_table(report)
    for path in write_results(report, args.out):
        print(f"results: {path}", file=sys.stderr)
    return 0
