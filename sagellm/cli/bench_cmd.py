"""`sagellm bench offline`: our engine against Hugging Face `transformers` on workloads W1 and W2, in one run.

Prints a table (and a markdown copy for the README), and writes every number with the machine's description to a
JSON file and a bar chart to a PNG. Times on a shared machine drift; the ratio between engines in one run holds."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sagellm.common.errors import users_file

if TYPE_CHECKING:
    from sagellm.benchmarks.offline import OfflineReport, Row

COLUMNS = (  # (metric, header, format)
    ("out_tok_s", "out tok/s", "{:.1f}"),
    ("req_s", "req/s", "{:.3f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
    ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"),
    ("wall_s", "wall s", "{:.1f}"),
)
# The options that change what is measured, written out in the reproduce command stored with the results.
REPRODUCE_FLAGS = ("model", "num_prompts", "input_len", "output_len", "repeats", "seed", "threads", "backend")
REPRODUCE_FLAGS += ("max_num_batched_tokens",)
# Benchmarks of the pipeline, each a module of sagellm.benchmarks with `add_arguments(parser)` and `run(args)`.
PIPELINE_BENCHES = (
    ("pipeline", "pipeline_overhead", "control-plane overhead: the pipeline vs an instant fixture (W5)"),
    ("pd", "pd_split_report", "colocated vs prefill/decode split on mixed prompt lengths (W4)"),
    ("policies", "policies", "scheduling policies under overload: real engine and a 1,000-instance simulator (W6)"),
    ("serve", "serve_cli", "streaming load on OpenAI-compatible servers, several compared in one run (W1)"),
    ("chaos", "chaos", "bad input, junk, overload and killed workers against `sagellm serve` (the reliability table)"),
    ("overload", "overload", "abandoned streams, late refusals, a huge batch, the metastable test; vs vLLM"),
    ("fairness", "fairness", "short chats' TTFT while an echo+logprobs batch or a 6,000-token prompt runs"),
    ("batch", "batch_live", "a Batch API job beside live W1-c4: live TTFT with and without it; a restart mid-batch"),
    ("keys", "keys_limits", "two API keys, one rate-limited, --api-servers 2: 429s at its limit, the other's TTFT"),
    ("faults", "faults", "one of three engine workers killed mid-run, failover off and on (the failover table)"),
    ("lora", "lora", "W1-c16 over 4 LoRA adapters against the base; a model on demand's cold vs warm TTFT"),
    ("agents", "agents", "coding agents' sessions returning across a restart: KV tiers vs none vs peers (TTFT)"),
    ("load", "load", "cold model load stage by stage, each in a fresh process, and a whole cold `sagellm run`"),
    ("parallel", "parallel", "one model split over processes (TP, PP) against one process, in one run"),
    ("kernels", "kernels", "the CPU kernels of each instruction set vs oneDNN and torch; --ops: W1-c16 op by op"),
    ("numerics", "numerics", "opt-in fast numerics (bf16, int8 activations) against float32: replies, logits, speed"),
    ("cli", "cli_startup", "`sagellm --help` and every command's `--help` in fresh processes (budget: 0.3 s)"),
    ("vllm-results", "vllm_results", "the table and chart of `vllm bench serve` result files (W1 against peers)"),
    ("gateway", "gateway", "W5 over HTTP: our gateway against vllm-router, both in front of a no-compute engine"),
    ("pd-servers", "pd_servers", "PD across two sagellm serve: our gateway against vllm-router's PD mode, TTFT"),
    ("simulator", "simulator", "cluster simulator: 10^6 requests on 1,000 instances; goodput vs load per policy"),
    ("trace-ops", "trace_ops", "ops by self time in a torch profiler trace (vLLM's, beside `bench kernels --ops`)"),
    ("steps", "step_times", "time engine steps by batch composition; fit the simulator's step model"),
    ("feature-costs", "feature_costs", "what each engine feature costs a W1-c16 decode step of requests not using it"),
    ("sim-check", "sim_check", "the cluster simulator against the real engine on W4- and W6-sized traces, one run"),
    ("make-gguf", "synthetic_gguf", "write a 1B- or 7B-shaped Llama Q4_K_M GGUF of random weights, SmolLM2 tokenizer"),
    ("make-gpt-oss", "synthetic_gpt_oss", "write a gpt-oss-20b-shaped GGUF of random weights, experts in MXFP4"),
    ("make-qwen35", "synthetic_qwen35", "write a Qwen3.5-0.8B-shaped GGUF of random weights in the Q4_K_M mix"),
    ("make-gemma3", "synthetic_gemma3", "write a small Gemma 3 that sees images (HF checkpoint), random weights"),
    ("kquant", "kquant", "block linears per GGUF kind, and a 1B Q4_K_M's decode and prefill against llama-bench"),
    ("roofline", "roofline", "memory bandwidth and peak FLOPs of this CPU, and decode and prefill against them"),
)


def add_parser(sub: argparse._SubParsersAction, *, kind: str | None = None) -> None:
    """The pipeline benchmarks are listed by name; only `kind`'s module is imported for its options (each imports
    numpy, trio, zmq, ...: together most of a second before a `--help` could answer)."""
    about = "Benchmarks of the engine and the pipeline against peers, one KIND a run."
    p = sub.add_parser("bench", help="benchmark the engine against peers", description=about)
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    o = kinds.add_parser("offline", help="LLM.generate vs transformers generate (W1, W2)", description=__doc__)
    o.add_argument(
        "--model", "-m", default=None, help="path, .gguf file or cache alias (default: smollm2-135m-instruct)"
    )
    o.add_argument("--workloads", default=None, help="comma list of w1-c16, w1-c1, w2 (default: all)")
    o.add_argument("--num-prompts", type=int, default=None, help="cap every workload's prompt count (quick runs)")
    o.add_argument("--input-len", type=int, default=256, help="prompt tokens (default: %(default)s)")
    o.add_argument("--output-len", type=int, default=128, help="output tokens, EOS ignored (default: %(default)s)")
    o.add_argument("--peers", default="transformers", help="transformers or none (default: %(default)s)")
    o.add_argument("--repeats", type=int, default=3, help="runs per workload; tables show medians (default: 3)")
    o.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    o.add_argument("--threads", type=int, default=None, help="torch threads for every engine (default: all cores)")
    o.add_argument("--backend", default="cpu", help="our engine's backend (default: %(default)s)")
    o.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="our engine's per-step token budget (default: the engine's, spelled out in the command the report prints)",
    )
    o.add_argument("--out", type=Path, default=Path("benchmarks/results/offline.json"), help="JSON results file")
    o.add_argument("--plot", default="benchmarks/results/offline.png", help="PNG chart ('' = none)")
    o.add_argument("--markdown", type=Path, default=None, help="write the markdown table here instead of stdout")
    o.add_argument("--log-level", default="warning", help="debug, info, warning or error (default: %(default)s)")
    o.set_defaults(run=run)
    k = kinds.add_parser("kv-transfer", help="KV prefill → decode: in-process, ipc, tcp, shared memory vs memcpy (W7)")
    k.description = (
        "W7: one prompt's KV moved prefill → decode in-process, over ipc:// and tcp:// and through shared memory, "
        "against memcpy."
    )
    k.add_argument("--model", "-m", default=None, help="take the KV shape from this model (default: SmolLM2-135M's)")
    k.add_argument("--tokens", type=int, default=1024, help="prompt tokens whose KV moves (default: %(default)s)")
    k.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="KV dtype")
    k.add_argument("--repeats", type=int, default=20, help="timed transfers per path; medians (default: 20)")
    k.add_argument("--warmup", type=int, default=2, help="untimed transfers per path first (default: 2)")
    k.add_argument("--paths", default="memcpy,in-process,ipc,tcp,shm,shm-zero-copy", help="comma list of %(default)s")
    k.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for kv_transfer.json/.png")
    k.add_argument("--log-level", default="warning", help="debug, info, warning or error (default: %(default)s)")
    k.set_defaults(run=run_kv_transfer)
    for name, module, summary in PIPELINE_BENCHES:
        if name != kind:
            kinds.add_parser(name, help=summary)
            continue
        bench = importlib.import_module(f"sagellm.benchmarks.{module}")
        parser = kinds.add_parser(name, help=summary, description=bench.__doc__.split("\n\n")[0])
        bench.add_arguments(parser)
        parser.set_defaults(run=bench.run)


def run(args: argparse.Namespace) -> int:
    from sagellm.benchmarks.offline import OfflineConfig, run_offline
    from sagellm.benchmarks.workloads import WORKLOAD_GROUPS, standard_workloads
    from sagellm.runtime.engine.config import EngineConfig
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

    if args.max_num_batched_tokens is None:  # the engine's own budget, so the printed command reproduces the run
        args.max_num_batched_tokens = EngineConfig.max_num_batched_tokens

    groups = [g.strip() for g in args.workloads.split(",") if g.strip()] if args.workloads else list(WORKLOAD_GROUPS)
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none")
    workloads = standard_workloads(
        groups, input_len=args.input_len, output_len=args.output_len, max_num_prompts=args.num_prompts
    )
    config = OfflineConfig(
        model=Path(resolve_model(args.model or DEFAULT_MODEL)),
        workloads=workloads,
        peers=peers,
        repeats=args.repeats,
        seed=args.seed,
        threads=args.threads or os.cpu_count() or 1,
        backend=args.backend,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    report = run_offline(config)
    command = _command(args, groups, peers)
    results = report.to_json() | {"command": command}

    _print_table(report)
    markdown = _markdown(report, command)
    if args.markdown:
        with users_file(args.markdown, "write the table"):
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(markdown)
    else:
        print(markdown)
    with users_file(args.out, "write the results"):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    print(f"results: {args.out}", file=sys.stderr)
    if args.plot:
        _plot(report, Path(args.plot))
        print(f"chart: {args.plot}", file=sys.stderr)
    return 0


def run_kv_transfer(args: argparse.Namespace) -> int:
    from sagellm.benchmarks.kv_transfer import KVTransferConfig, kv_shape, print_table, run_kv_transfer, write_results

    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    config = KVTransferConfig(kv_shape(args.model, args.tokens), args.dtype, args.repeats, args.warmup, paths)
    report = run_kv_transfer(config)
    print_table(report)
    for path in write_results(report, args.out):
        print(f"results: {path}", file=sys.stderr)
    return 0


def _command(args: argparse.Namespace, groups: list[str], peers: tuple[str, ...]) -> str:
    """The run spelled out in full (every default made explicit), so the table's numbers can be reproduced."""
    parts = ["sagellm", "bench", "offline", "--workloads", ",".join(groups), "--peers", ",".join(peers) or "none"]
    for flag in REPRODUCE_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            parts += ["--" + flag.replace("_", "-"), str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def _cells(report: OfflineReport, row: Row) -> list[str]:
    """The formatted metrics of one row, then its output tok/s as a multiple of the peer's on the same workload."""
    cells = ["–" if math.isnan(row.median[m]) else fmt.format(row.median[m]) for m, _, fmt in COLUMNS]
    peer = report.row(row.workload, "transformers")
    ratio = row.median["out_tok_s"] / peer.median["out_tok_s"] if peer else math.nan
    return [*cells, "–" if math.isnan(ratio) else f"{ratio:.2f}×"]


def _ordered(report: OfflineReport) -> list[Row]:
    """Rows grouped by workload (in run order), engines side by side within each."""
    order = {w.name: i for i, w in enumerate(report.workloads)}
    return sorted(report.rows, key=lambda r: order[r.workload])


def _headers() -> list[str]:
    return ["workload", "engine", *(header for _, header, _ in COLUMNS), "tok/s vs transformers"]


def _print_table(report: OfflineReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*_headers(), title=f"offline benchmark: {Path(report.model).name}", caption=_caption(report))
    for row in _ordered(report):
        table.add_row(row.workload, row.engine, *_cells(report, row))
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # piped: no 80-column squeeze


def _machine(report: OfflineReport) -> str:
    m = report.machine
    return f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, median of {report.repeats} run(s)"


def _caption(report: OfflineReport) -> str:
    m = report.machine
    agree = ", ".join(f"{w} {100 * a['identical']:.0f}%" for w, a in report.agreement().items())
    return f"{report.note}; {_machine(report)}; torch {m['torch']}, transformers {m['transformers']}" + (
        f"; requests with identical greedy outputs across engines: {agree}" if agree else ""
    )


def _markdown(report: OfflineReport, command: str) -> str:
    headers = _headers()
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in _ordered(report):
        lines.append("| " + " | ".join([row.workload, row.engine, *_cells(report, row)]) + " |")
    return "\n".join([*lines, "", f"{_caption(report)}. Command: `{command}`", ""])


def _plot(report: OfflineReport, path: Path) -> None:
    """Bars per engine: output tok/s for each workload, and single-stream TTFT / TPOT p50 and p99 if W1-c1 ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(dict.fromkeys(r.engine for r in report.rows))
    workloads = [w.name for w in report.workloads]
    panels = [("output tokens/s (higher is better)", workloads, ["out_tok_s"] * len(workloads))]
    if "w1-c1" in workloads:
        panels.append(("W1-c1 TTFT ms (lower is better)", ["p50", "p99"], ["ttft_p50_ms", "ttft_p99_ms"]))
        panels.append(("W1-c1 TPOT ms (lower is better)", ["p50", "p99"], ["tpot_p50_ms", "tpot_p99_ms"]))
    widths = [max(len(labels), 2) for _, labels, _ in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 1.6 * sum(widths), 4.8), width_ratios=widths, squeeze=False)
    bar = 0.8 / len(engines)
    for ax, (title, labels, metrics) in zip(axes[0], panels, strict=True):
        for i, engine in enumerate(engines):
            values = []
            for label, metric in zip(labels, metrics, strict=True):
                row = report.row(label if metric == "out_tok_s" else "w1-c1", engine)
                values.append(row.median[metric] if row else 0.0)
            xs = [x + (i - (len(engines) - 1) / 2) * bar for x in range(len(labels))]
            bars = ax.bar(xs, values, bar, label=engine, color=f"C{i}")
            ax.bar_label(bars, fmt="%.0f" if max(values, default=0) >= 100 else "%.1f", fontsize=8, padding=2)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
    axes[0][0].legend()
    fig.suptitle(f"{Path(report.model).name}: {' vs '.join(engines)}\n{report.note}", fontsize=10)
    fig.text(0.5, 0.01, _machine(report), ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
