"""`sagellm bench vllm-results DIR`: the table and chart of a comparison whose client was `vllm bench serve`.

Against peer servers the client is vLLM's own (`vllm bench serve --save-result`), so nobody can say the client favours
us. Name each result file `SERVER_cCONCURRENCY_sSEED.json` (e.g. `sagellm_c16_s1101.json`); this command groups the
files by server and concurrency, takes the median of every number over the seeds (each repeat a fresh seed, servers
in turn), and prints one markdown row per server and concurrency, with the CPU it ran on, and a bar chart beside the
JSON summary. benchmarks/README.md has the loop that produced the README's W1 table."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from sagellm.benchmarks.report import median_summary, write_json_and_plot
from sagellm.common.errors import NotFound

FILE = re.compile(r"(?P<server>.+)_c(?P<concurrency>\d+)_s(?P<seed>\d+)\.json")
# (vllm bench serve's key, header, format); request counts are summed over the repeats, the rest are medians.
COLUMNS = (
    ("output_throughput", "out tok/s", "{:.1f}"),
    ("p50_ttft_ms", "TTFT p50 ms", "{:.0f}"),
    ("p99_ttft_ms", "TTFT p99 ms", "{:.0f}"),
    ("p50_tpot_ms", "TPOT p50 ms", "{:.1f}"),
    ("p99_tpot_ms", "TPOT p99 ms", "{:.1f}"),
)
CPU_FLAGS = re.compile(r"^(avx\w*|amx\w*|fma|f16c)$")  # the flags that decide which kernels run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="the folder of `vllm bench serve --save-result` files")
    parser.add_argument("--out", type=Path, help="write the summary to OUT.json and the chart to OUT.png")
    parser.add_argument(
        "--title", default="W1 through each server, `vllm bench serve` as the client", help="the chart's title"
    )


def run(args: argparse.Namespace) -> int:
    groups = load(args.directory)
    if not groups:
        raise NotFound(f"{args.directory}: no SERVER_cCONCURRENCY_sSEED.json files of `vllm bench serve`")
    medians = {key: summarize(results) for key, results in groups.items()}
    cpu = cpu_description()
    print(markdown(medians, {key: len(results) for key, results in groups.items()}))
    print(f"\nCPU: {cpu}")
    if args.out:
        rows = [{"server": s, "concurrency": c, "repeats": len(groups[s, c]), **m} for (s, c), m in medians.items()]
        payload = {"title": args.title, "cpu": cpu, "rows": rows, "files": sorted(map(str, args.directory.glob("*")))}
        for path in write_json_and_plot(args.out, payload, lambda png: plot(medians, png, args.title, cpu)):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def load(directory: Path) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """(server, concurrency) -> the result of every seed, in seed order."""
    found: dict[tuple[str, int], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for path in sorted(directory.glob("*.json")):
        match = FILE.fullmatch(path.name)
        if match:
            key = (match["server"], int(match["concurrency"]))
            found[key].append((int(match["seed"]), json.loads(path.read_text())))
    return {key: [result for _, result in sorted(runs, key=lambda run: run[0])] for key, runs in sorted(found.items())}


def summarize(results: list[dict[str, Any]]) -> dict[str, float | None]:
    """Medians of the table's numbers over the repeats; completed and failed requests summed."""
    keys = [key for key, _, _ in COLUMNS] + ["completed", "failed"]
    return median_summary([{key: result.get(key) for key in keys} for result in results])


def markdown(medians: dict[tuple[str, int], dict[str, float | None]], repeats: dict[tuple[str, int], int]) -> str:
    head = ["concurrency", "server", "repeats", "ok/failed", *(header for _, header, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (server, concurrency), m in sorted(medians.items(), key=lambda item: (-item[0][1], item[0][0])):
        counts = f"{m['completed']:.0f}/{m['failed']:.0f}"
        cells = [_fmt(m.get(key), spec) for key, _, spec in COLUMNS]
        lines.append(
            "| " + " | ".join([str(concurrency), server, str(repeats[server, concurrency]), counts, *cells]) + " |"
        )
    return "\n".join(lines)


def add_peers_argument(parser: argparse.ArgumentParser) -> None:
    """`--peers`: where the benchmarks that run `vllm bench serve` as their client find it and the tokenizer."""
    parser.add_argument("--peers", type=Path, default=Path(os.environ.get("PEERS", "/tmp/peers")),
                        help="where ../shared/peers/setup.sh put vLLM's client and the tokenizer")  # fmt: skip


def vllm_client(peers: Path) -> Path:
    """`vllm` of the peers' install (`--peers`). Raises NotFound, saying how to install it."""
    vllm = peers / "venv-vllm/bin/vllm"
    if not vllm.exists() or not (peers / "smollm2-hf").exists():
        raise NotFound(f"{vllm} or its tokenizer is missing: run ../shared/peers/setup.sh hf vllm (PEERS={peers})")
    return vllm


def bench_serve_command(peers: Path, url: str, model: str, seed: int, out: Path, prompts: int,
                        lengths: tuple[int, int], load: list[str]) -> list[str]:  # fmt: skip
    """One `vllm bench serve` run as our benchmarks run it: random prompts of `lengths` = (in, out) tokens, EOS
    ignored, greedy, at `load` (a concurrency or a request rate, and more options); TTFT, TPOT, ITL and e2e at p50
    and p99; its result file `out`."""
    return [str(vllm_client(peers)), "bench", "serve", "--backend", "openai", "--base-url", url, "--endpoint",
            "/v1/completions", "--model", model, "--tokenizer", str(peers / "smollm2-hf"), "--dataset-name", "random",
            "--random-input-len", str(lengths[0]), "--random-output-len", str(lengths[1]), "--num-prompts",
            str(prompts), *load, "--ignore-eos", "--temperature", "0", "--seed", str(seed), "--percentile-metrics",
            "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(out.parent),
            "--result-filename", out.name]  # fmt: skip


def cpu_description() -> str:
    """lscpu's model name and the vector flags, from /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    fields = {line.split(":")[0].strip(): line.split(":", 1)[1].strip() for line in lines if ":" in line}
    flags = [flag for flag in fields.get("flags", "").split() if CPU_FLAGS.match(flag)]
    return f"{fields.get('model name', 'unknown CPU')}; {' '.join(flags)}"


def plot(medians: dict[tuple[str, int], dict[str, float | None]], path: Path, title: str, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrencies = sorted({c for _, c in medians}, reverse=True)
    # The most concurrent load by throughput and TPOT; the others (single streams) by TPOT and TTFT.
    panels = []
    for rank, concurrency in enumerate(concurrencies):
        metrics = (("output_throughput", "output tok/s (higher is better)"), ("p50_tpot_ms", "TPOT p50 ms (lower)"))
        if rank:
            metrics = (("p50_tpot_ms", "TPOT p50 ms (lower)"), ("p50_ttft_ms", "TTFT p50 ms (lower)"))
        served = [s for s, c in medians if c == concurrency and (medians[s, c].get("completed") or 0) > 0]
        panels += [(f"c{concurrency}: {label}", concurrency, key, served) for key, label in metrics]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 4.6), squeeze=False)
    for ax, (label, concurrency, key, servers) in zip(axes[0], panels):
        values = [medians[s, concurrency].get(key) or 0.0 for s in servers]
        bars = ax.bar(range(len(servers)), values, color=[f"C{i}" for i in range(len(servers))])
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        ax.set_xticks(range(len(servers)), servers, rotation=35, ha="right", fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.margins(y=0.15)
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.01, cpu[:160], ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)
