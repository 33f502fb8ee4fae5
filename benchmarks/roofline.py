"""`sagellm bench roofline`: this machine's memory bandwidth and peak arithmetic, and our engine against them.

The machine (roofline_machine.py): read GB/s and peak fp32 FMA, bf16, int8 and int16 dot-product rates (and AMX's
int8 tile multiplies where the CPU has them) with 1 thread
and all, from C kernels compiled here, measured before and after the engine (each number the better of the two: a
neighbour on a shared host can take a core for seconds). The engine (roofline_engine.py), per model: single-stream
decode's bytes per token (the weights as stored, the KV cache at the mean context) and its fraction of the read
bandwidth at the engine's threads, and prefill's FLOPs at each prompt length and their fraction of the fp32 peak and
of the int16 one (a quantized file's prefill runs int16 dot products where the CPU has AVX-512 VNNI, block_int16.c;
the table says which kernels run).
Models: SmolLM2-135M (the default alias; its GGUF's Q4_1 blocks) and `synthetic-q4_k_m`, a Llama of random weights
in llama.cpp's Q4_K_M mix written once by `sagellm bench make-gguf`'s writer (`--gguf-shape`); a name ending in
`:fp32` runs a GGUF with its floats. A markdown table with the CPU on stdout, `--out`.json and .png (a roofline
chart)."""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from sagellm.benchmarks.chaos_report import progress as say
from sagellm.benchmarks.decode_parts import PARTS
from sagellm.benchmarks.report import write_json_and_plot
from sagellm.benchmarks.roofline_engine import DEQUANTIZED, EngineResult, decode_path, measure_engine, prefill_path
from sagellm.benchmarks.roofline_machine import MachineRoofline, measure_machine, usable_cpus
from sagellm.benchmarks.vllm_results import cpu_description
from sagellm.common.errors import InvalidInput

SYNTHETIC = "synthetic-q4_k_m"
SHAPE_FIELDS = ("hidden", "layers", "intermediate", "heads", "kv_heads")
# 1B's layer shapes (make-gguf's preset), 4 layers of its 16: ~340M parameters, ~0.2 GB; prefill of 2,048 tokens
# in seconds on 2 cores
DEFAULT_SHAPE = "2048,4,8192,32,8"
# (flag, default, --quick's default, help): None means "take --quick's or the full run's"
OPTIONS: tuple[tuple[str, Any, Any, str], ...] = (
    ("prefill", "512,2048", "32,64", "prompt lengths of the prefill runs"),
    ("decode-prompt", 64, 8, "prompt tokens before the decode run"),
    ("decode-tokens", 128, 8, "tokens decoded (greedy, EOS ignored)"),
    ("repeats", 3, 1, "runs of each engine measure after a warm-up; medians"),
    ("machine-repeats", 5, 1, "calls of each machine kernel; the best"),
    ("array-mib", 1024, 16, "the bandwidth kernel's array, MiB (far above the caches)"),
    ("seconds", 0.3, 0.01, "about how long each machine kernel call runs"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--models", default=f"smollm2-135m-instruct,{SYNTHETIC}",
      help=f"comma list: paths, cache aliases, {SYNTHETIC}; NAME{DEQUANTIZED} holds a GGUF's floats "
           "(default: %(default)s)")  # fmt: skip
    a("--gguf-shape", default=DEFAULT_SHAPE, help=f"{SYNTHETIC}'s {','.join(SHAPE_FIELDS)} (default: %(default)s)")
    a("--threads", type=int, default=None, help="the engine's threads, fixed (default: every usable CPU)")
    for flag, default, quick, text in OPTIONS:
        a(f"--{flag}", type=type(default), default=None, help=f"{text} (default: {default}; --quick: {quick})")
    a("--quick", action="store_true", help="tiny arrays and runs, one repeat: a smoke test, not a measurement")
    a("--out", type=Path, default=Path("benchmarks/results/roofline"), help="stem of the .json and .png")


def run(args: argparse.Namespace) -> int:
    for flag, default, quick, _ in OPTIONS:
        key = flag.replace("-", "_")
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else default)
    prefill_lens = [int(p) for p in args.prefill.split(",") if p.strip()]
    threads = args.threads or len(usable_cpus())
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not prefill_lens or not models or threads < 1:
        raise InvalidInput("--prefill and --models need at least one entry, --threads at least 1")
    progress = functools.partial(say, bench="roofline")
    measure = functools.partial(
        measure_machine, (1, len(usable_cpus()), threads), args.array_mib << 20, args.machine_repeats, args.seconds
    )
    first = measure(lambda message: progress(f"machine, before the engine: {message}"))
    results = []
    for name in models:
        path = _model_path(name, args.gguf_shape)
        results.append(
            measure_engine(
                name, path, threads=threads, prefill_lens=prefill_lens, decode_prompt=args.decode_prompt,
                decode_tokens=args.decode_tokens, repeats=args.repeats, progress=progress,
            )
        )  # fmt: skip
    second = measure(lambda message: progress(f"machine, after the engine: {message}"))
    machine = first.best(second)
    rows = [_judged(result, machine) for result in results]
    cpu = f"{cpu_description()}; {os.cpu_count()} cores"
    print(markdown(cpu, machine, rows, _command(args)))
    payload = {"cpu": cpu, "cores": os.cpu_count(), "command": _command(args), "machine": machine.to_json(),
               "machine_runs": [first.to_json(), second.to_json()], "models": rows}  # fmt: skip
    json_path, png_path = write_json_and_plot(args.out, payload, lambda png: plot(png, cpu, machine, rows))
    print(f"results: {json_path}, chart: {png_path}", file=sys.stderr)
    return 0


def _model_path(name: str, shape: str) -> Path:
    from sagellm.runtime.models.model_cache import resolve_model

    base = name.removesuffix(DEQUANTIZED)
    return synthetic_gguf(shape) if base == SYNTHETIC else Path(resolve_model(base))


def synthetic_gguf(shape: str) -> Path:
    """The Q4_K_M Llama of `shape` (hidden, layers, intermediate, heads, kv_heads; tied embeddings), written once to
    the temp folder by make-gguf's writer."""
    from sagellm.benchmarks.synthetic_gguf import write_llama_q4_k_m

    try:
        values = dict(zip(SHAPE_FIELDS, (int(v) for v in shape.split(",")), strict=True))
    except ValueError:
        raise InvalidInput(f"--gguf-shape {shape!r}: five integers, {','.join(SHAPE_FIELDS)}") from None
    path = Path(tempfile.gettempdir()) / "sagellm-synthetic" / f"llama-{shape.replace(',', '-')}.Q4_K_M.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        write_llama_q4_k_m(partial, **values, tied=True)
        partial.replace(path)
    return path


def _judged(result: EngineResult, machine: MachineRoofline) -> dict[str, Any]:
    """The result's JSON with each measure's fraction of the machine's roofline at the engine's threads (and at 1
    thread: a dense model's decode linears run on one)."""
    row = result.to_json()
    threads = min(machine.threads, key=lambda t: abs(t - result.threads))  # the engine's, measured before it ran
    row["roofline_threads"] = threads
    decode = row["decode"]
    decode["of_bandwidth"] = decode["gbs"] / machine.read_gbs[threads]
    decode["of_bandwidth_1_thread"] = decode["gbs"] / machine.read_gbs[1]
    decode["path"] = decode_path(result.weights)
    for prefill in row["prefill"]:
        for kind in ("fp32", "int16"):
            peak = machine.peaks.get(kind)
            prefill[f"of_{kind}_peak"] = None if peak is None else prefill["gflops"] / peak[threads]
        prefill["path"] = prefill_path(result.weights, prefill["tokens"], threads)
    return row


def _number(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def markdown(cpu: str, machine: MachineRoofline, rows: list[dict[str, Any]], command: str) -> str:
    counts = machine.threads
    lines = [f"CPU: {cpu}", "", "| machine | " + " | ".join(f"{t} thread(s)" for t in counts) + " | kernel |",
             "|---|" + "---:|" * len(counts) + "---|",
             "| read bandwidth, GB/s | " + " | ".join(f"{machine.read_gbs[t]:.1f}" for t in counts)
             + f" | sum of a {machine.array_bytes >> 20} MiB float32 array |"]  # fmt: skip
    for kind, unit in (("fp32", "GFLOP/s"), ("bf16", "GFLOP/s"), ("int8", "GOP/s"), ("int16", "GOP/s"),
                       ("amx_int8", "GOP/s")):  # fmt: skip
        peak = machine.peaks.get(kind)
        cells = [_number(None if peak is None else peak[t], "{:.0f}") for t in counts]
        kernel = machine.kernels.get(kind, "not measured")  # a run saved before its kind was measured
        lines.append(f"| peak {kind}, {unit} | " + " | ".join(cells) + f" | {kernel} |")
    lines += [f"\nAMX: {machine.amx}" if machine.amx else "\nAMX: none", ""]
    lines += ["| model | weights | decode: MB read/token | TPOT ms | GB/s | of read roofline, threads "
              "| linears alone, one row, as held | decode kernels |",
              "|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for row in rows:
        d, w = row["decode"], row["weights"]
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(w["formats"].items()))
        linears = "n/a"
        if d["linears_ms"] is not None:
            linears = (f"{d['held_linear_bytes'] / 1e6:.1f} MB: {d['linears_ms']:.2f} ms, {d['linears_gbs']:.1f} GB/s; "
                       f"1 thread {d['linears_1_thread_ms']:.2f} ms, {d['linears_1_thread_gbs']:.1f} GB/s")  # fmt: skip
        fraction = f"{d['of_bandwidth']:.0%} at {row['roofline_threads']} ({d['of_bandwidth_1_thread']:.0%} at 1)"
        lines.append(
            f"| {row['model']} | {kinds} | {d['bytes'] / 1e6:.1f} | {d['tpot_ms']:.2f} | {d['gbs']:.1f} | "
            f"{fraction} | {linears} | {d['path']} |"
        )
    lines += [
        "",
        "Where a decode step's time goes, ms (medians of the steps; the parts' medians need not add up to the step's):",
        "",
        "| model | step | " + " | ".join(PARTS) + " |",
        "|---|" + "---:|" * (len(PARTS) + 1),
    ]
    for row in rows:
        if parts := row["decode"].get("parts_ms"):  # runs saved before the parts were timed have none
            cells = " | ".join(f"{parts[p]:.2f}" for p in ("step", *PARTS))
            lines.append(f"| {row['model']} | {cells} |")
    lines += ["", "| model | prefill tokens | GFLOP | ms | GFLOP/s | of fp32 peak | of int16 peak | prefill kernels |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for row in rows:
        for p in row["prefill"]:
            fractions = [_number(p[f"of_{k}_peak"], "{:.0%}") for k in ("fp32", "int16")]
            lines.append(f"| {row['model']} | {p['tokens']} | {p['flops'] / 1e9:.1f} | {p['ms']:.0f} | "
                         f"{p['gflops']:.1f} | {' | '.join(fractions)} | {p['path']} |")  # fmt: skip
    return "\n".join([*lines, "", f"Command: `{command}`"])


def plot(path: Path, cpu: str, machine: MachineRoofline, rows: list[dict[str, Any]]) -> None:
    """The roofline: GFLOP/s against arithmetic intensity (FLOP per byte read), the machine's roofs at the engine's
    threads and at one, decode and prefill of each model as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 6))
    intensity = np.logspace(-1, 4, 200)
    fp32 = machine.peaks["fp32"]
    engine = max(row["roofline_threads"] for row in rows)
    for threads in sorted({1, engine}, reverse=True):
        roof = machine.read_gbs[threads] * intensity
        roof = np.minimum(roof, fp32[threads]) if fp32 else roof
        style = "-" if threads == engine else ":"
        ax.plot(intensity, roof, color="black", linestyle=style, label=f"fp32 roof, {threads} thread(s)")
    for kind in ("bf16", "int8", "int16", "amx_int8"):
        if peak := machine.peaks.get(kind):
            ax.axhline(peak[engine], color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(f"{kind} peak, {engine} thread(s)", (intensity[0], peak[engine]), fontsize=8, va="bottom")
    for i, row in enumerate(rows):
        d, w, name = row["decode"], row["weights"], Path(row["model"]).name
        ax.scatter(
            d["flops"] / d["bytes"], d["gflops"], color=f"C{i}", marker="o", label=f"{name}: decode (o), prefill (^)"
        )
        for p in row["prefill"]:
            read = w["layer_bytes"] + w["head_bytes"] + row["kv_bytes_per_token"] * p["tokens"]
            ax.scatter(p["flops"] / read, p["gflops"], color=f"C{i}", marker="^")
            ax.annotate(f"prefill {p['tokens']}", (p["flops"] / read, p["gflops"]), fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="FLOP per byte read", ylabel="GFLOP/s")
    ax.set_title(f"roofline: {cpu.split(';')[0]}, {os.cpu_count()} cores", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _command(args: argparse.Namespace) -> str:
    """The run with every measured option spelled out, so it can be repeated."""
    parts = ["sagellm", "bench", "roofline", "--models", args.models, "--gguf-shape", args.gguf_shape]
    parts += ["--threads", str(args.threads or len(usable_cpus()))]
    for flag, *_ in OPTIONS:
        parts += [f"--{flag}", str(getattr(args, flag.replace("-", "_")))]
    return " ".join(shlex.quote(p) for p in parts)
