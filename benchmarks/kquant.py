"""`sagellm bench kquant`: the GGUF kinds' block linears, and a 1B Q4_K_M model's prefill and decode against
llama.cpp's llama-bench on the same file, in one run on this machine.

- block linears: the 1B preset's layer linears (qkv 3072x2048, o 2048x2048, gate_up 16384x2048, down 2048x8192) in
  each kind (Q4_1, Q4_K, Q5_K, Q6_K, Q8_0), 16 layers of them (each its own copy, so every weight comes from memory
  as in decode), at 1 and 16 rows: milliseconds for the 16 layers, GB/s of the resident layout read at 1 row,
  GFLOPS at 16;
- the model: `sagellm bench make-gguf --preset 1b` (written once to the temp folder unless --model names a file),
  our `LLM.generate` in a fresh process (one sequence, greedy, EOS ignored, 128 tokens after a 128-token random
  prompt, and a batch of 4) against `llama-bench -p 128 -n 128 -t <cores>` (its pp128 and tg128), with the ratio;
- with --with-7b: the 7b preset (Llama-2-7B's shape, ~4 GB; written to the temp folder, some minutes) loaded in a
  fresh process, a few tokens decoded: load seconds, tokens/s, VmRSS and its peak against 1.5x the file + KV.

llama-bench's tg starts from an empty context, ours decodes after the prompt (128 to 256 positions: attention is a
few percent of a 1B's decode); llama.cpp keeps its KV in fp16, ours in fp32."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sagellm.benchmarks.kernels import best_time

KINDS = ("Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
SHAPES_1B = (("qkv", 3072, 2048), ("o_proj", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192))
LLAMA_BENCH_ENV = "SAGELLM_LLAMA_BENCH"  # the llama-bench program (else beside $SAGELLM_LLAMACPP, else PATH)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", type=Path, default=None, help="a 1B Q4_K_M GGUF (default: the 1b preset, made once in the temp dir)")
    a("--layers", type=int, default=16, help="copies of the layer linears timed together (default: %(default)s)")
    a("--rows", default="1,16", help="rows of the block linears (default: %(default)s)")
    a("--repeats", type=int, default=5, help="timed runs of the block linears; the best is shown (default: 5)")
    a("--prompt-len", type=int, default=128, help="prompt tokens (default: %(default)s)")
    a("--output-len", type=int, default=128, help="generated tokens (default: %(default)s)")
    a("--batches", default="1,4", help="our batch sizes (default: %(default)s; llama-bench runs 1)")
    a("--gen-repeats", type=int, default=3, help="runs of each generation; medians (default: %(default)s)")
    a("--kv-gb", type=float, default=0.25, help="our KV cache, GiB (default: %(default)s)")
    a("--int8-activations", action="store_true",
      help="ours with the linears on x rounded to int8 as llama.cpp's; the block linears both ways")  # fmt: skip
    a("--llama-bench", default=None, help=f"llama-bench program (default: ${LLAMA_BENCH_ENV}, or on PATH)")
    a("--with-7b", nargs="?", const="make", default=None, metavar="GGUF",
      help="also load the 7b preset (or this file) and decode a few tokens")  # fmt: skip
    a("--skip", default="", help="comma list of parts to leave out: linears, model")
    a("--out", type=Path, default=Path("benchmarks/results/kquant.json"), help="JSON results file")


def run(args: argparse.Namespace) -> int:
    import torch

    from sagellm.benchmarks.vllm_results import cpu_description

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    cpu = cpu_description()
    threads = torch.get_num_threads()
    print(f"CPU: {cpu}; {threads} threads; load average at start {_loadavg()}")
    results: dict[str, Any] = {"cpu": cpu, "threads": threads}
    if "linears" not in skip:
        rows = [int(r) for r in args.rows.split(",")]
        results["linears"] = block_linears(rows, args.layers, args.repeats, args.int8_activations)
        print(linears_table(results["linears"], rows, args.layers))
    if "model" not in skip:
        model = args.model or synthetic_file("1b")
        ours = _child(model, args.kv_gb, args.prompt_len, args.output_len, args.batches, args.gen_repeats,
                      args.int8_activations)  # fmt: skip
        peer = llama_bench(model, args.prompt_len, args.output_len, threads, args.gen_repeats, args.llama_bench)
        results["model"] = {"path": str(model), "ours": ours, "llama_bench": peer}
        print(model_table(model, ours, peer, args.prompt_len, args.output_len))
    if args.with_7b:
        big = synthetic_file("7b") if args.with_7b == "make" else Path(args.with_7b)
        results["7b"] = _child(big, 0.5, 16, 16, "1", 1)
        print(big_table(big, results["7b"]))
    print(f"\nload average at the end {_loadavg()} (this run's threads count in it; other busy processes slow both)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------ block linears


def block_linears(rows: list[int], layers: int, repeats: int, int8: bool = False) -> dict[str, dict[str, Any]]:
    """Per kind: bits per weight in the file and resident, and seconds for `layers` copies of the 1B's layer
    linears at each row count (the best of `repeats`); `int8`: also each kind's linears on x rounded to int8 where
    it has them (--int8-activations), as "KIND int8 x"."""
    import torch

    from sagellm.backends.native import NativeKernels, interleave
    from sagellm.backends.native.block_layout import Q8_X_KINDS
    from sagellm.backends.quantized import QuantizedWeight
    from sagellm.benchmarks.kquant_pack import quantize

    kernels = NativeKernels.load()
    if kernels is None:
        raise SystemExit("the native kernels did not build (no C compiler?): nothing to time")
    threads = torch.get_num_threads()
    weights_count = sum(n * k for _, n, k in SHAPES_1B)
    inputs = {count: {k: torch.randn(count, k) for k in {k for _, _, k in SHAPES_1B}} for count in rows}
    out: dict[str, dict[str, Any]] = {}
    cases = [(kind, False) for kind in KINDS] + [(kind, True) for kind in KINDS if int8 and kind in Q8_X_KINDS]
    for kind, rounded in cases:
        name = f"{kind} int8 x" if rounded else kind
        print(f"kquant: {name}: quantizing and interleaving one layer, {layers} copies", file=sys.stderr)
        rng = np.random.default_rng(0)
        layer, file_bytes = [], 0
        for _, n, k in SHAPES_1B:
            blocks = quantize(rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.02), kind)
            file_bytes += blocks.nbytes
            weight = QuantizedWeight(kind, torch.from_numpy(blocks), k)
            layer.append(interleave(weight, kernels.block_group, int8_activations=rounded))
        copies = [[_copy(w) for w in layer] for _ in range(layers)]
        resident = sum(w.data.nbytes for w in copies[0])
        run = functools.partial(_run_linears, kernels, copies, threads=threads)
        seconds = {str(count): best_time(functools.partial(run, inputs[count]), repeats) for count in rows}
        out[name] = {
            "file_bpw": 8 * file_bytes / weights_count,
            "resident_bpw": 8 * resident / weights_count,
            "resident_bytes": resident * layers,
            "layout": layer[0].layout,
            "seconds": seconds,
        }
        del copies
    return out


def _run_linears(kernels, layers: list[list], x: dict[int, Any], *, threads: int) -> None:
    for linears in layers:
        for w in linears:
            kernels.block_linear(x[w.in_features], w, None, threads)


def _copy(weight):
    """An interleaved weight in memory of its own (a copy of another layer's, standing in for a different layer)."""
    return dataclasses.replace(weight, data=weight.data.clone())


def linears_table(results: dict[str, dict[str, Any]], rows: list[int], layers: int) -> str:
    flops = 2 * sum(n * k for _, n, k in SHAPES_1B) * layers
    head = ["kind", "layout", "bpw file / resident"] + [f"{r} row{'s' if r > 1 else ''}: ms" for r in rows]
    lines = [
        f"\nblock linears: the 1B's layer linears x {layers} layers (qkv, o, gate_up, down), each weight from memory",
        "(ms for all of them; at 1 row GB/s of the resident layout, else GFLOPS)\n",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for kind, r in results.items():
        cells = [kind, r["layout"], f"{r['file_bpw']:.2f} / {r['resident_bpw']:.2f}"]
        for count in rows:
            s = r["seconds"][str(count)]
            gbs, gflops = r["resident_bytes"] / s / 1e9, flops * count / s / 1e9
            rate = f"{gbs:.1f} GB/s" if count == 1 else f"{gflops:.0f} GFLOPS"
            cells.append(f"{s * 1e3:.1f} ({rate})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the model


def synthetic_file(preset: str) -> Path:
    """The preset's file in the temp folder, written by `sagellm bench make-gguf`'s writer if not there yet."""
    from sagellm.benchmarks.synthetic_gguf import PRESETS, write_llama_q4_k_m

    path = Path(tempfile.gettempdir()) / "sagellm-synthetic" / f"llama-{preset}.Q4_K_M.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        write_llama_q4_k_m(partial, **vars(PRESETS[preset]))
        partial.rename(path)
    return path


def _child(
    path: Path, kv_gb: float, prompt_len: int, output_len: int, batches: str, repeats: int, int8: bool = False
) -> dict[str, Any]:
    """kquant_load.py's measurement of `path` in a fresh process (its stderr shown as it goes); `int8`: with
    --int8-activations."""
    from sagellm.benchmarks.kquant_load import MODULE
    from sagellm.common.processes import python_module

    print(f"kquant: loading and running {path.name} in a fresh process", file=sys.stderr)
    lengths = ["--prompt-len", str(prompt_len), "--output-len", str(output_len)]
    command = python_module(MODULE, str(path), "--kv-gb", str(kv_gb), *lengths, "--batches", batches,
                            "--repeats", str(repeats), *(["--int8-activations"] if int8 else []))  # fmt: skip
    env = {**os.environ, "SAGELLM_LOG_LEVEL": os.environ.get("SAGELLM_LOG_LEVEL", "warning")}
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"measuring {path} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_bench(
    path: Path, prompt_len: int, output_len: int, threads: int, repeats: int, program: str | None
) -> dict[str, float] | None:
    """llama-bench's pp and tg tokens/s on `path` (mean of `repeats`), or None where there is no llama-bench."""
    program = program or _llama_bench_program()
    if program is None:
        print(f"kquant: no llama-bench (set ${LLAMA_BENCH_ENV} or --llama-bench): llama.cpp left out", file=sys.stderr)
        return None
    print(f"kquant: {program} -p {prompt_len} -n {output_len} -t {threads}", file=sys.stderr)
    command = [program, "-m", str(path), "-p", str(prompt_len), "-n", str(output_len), "-t", str(threads),
               "-r", str(repeats), "-o", "json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"llama-bench failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return parse_llama_bench(done.stdout)


def parse_llama_bench(text: str) -> dict[str, float]:
    """llama-bench's JSON output (`-o json`: a list of tests) -> prefill_tok_s (the pp test) and decode_tok_s (tg)."""
    parsed: dict[str, float] = {}
    for test in json.loads(text):
        key = "prefill_tok_s" if test["n_gen"] == 0 else "decode_tok_s" if test["n_prompt"] == 0 else None
        if key:
            parsed[key] = float(test["avg_ts"])
            parsed[key.replace("tok_s", "stddev")] = float(test.get("stddev_ts", 0.0))
    return parsed


def _llama_bench_program() -> str | None:
    if os.environ.get(LLAMA_BENCH_ENV):
        return os.environ[LLAMA_BENCH_ENV]
    server = os.environ.get("SAGELLM_LLAMACPP")
    beside = Path(server).with_name("llama-bench") if server else None
    if beside is not None and beside.exists():
        return str(beside)
    return shutil.which("llama-bench")


def model_table(
    path: Path, ours: dict[str, Any], peer: dict[str, float] | None, prompt_len: int, output_len: int
) -> str:
    lines = [
        f"\n{path.name} ({ours['file_gib']:.2f} GiB): prefill of a {prompt_len}-token prompt, then {output_len} "
        "tokens decoded; medians",
        f"(ours: load {ours['load_s']:.1f} s, RSS {ours['rss_gib']:.2f} GiB, peak {ours['hwm_gib']:.2f} GiB; "
        f"{ours['memory']})\n",
        "| engine | batch | prefill tok/s | decode tok/s |",
        "|---|---|---|---|",
    ]
    name = "sageLLM, int8 activations" if ours.get("int8_activations") else "sageLLM"
    for batch, r in ours["batches"].items():
        lines.append(f"| {name} | {batch} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} |")
        if batch == "1" and peer:
            lines.append(f"| llama.cpp (llama-bench) | 1 | {peer['prefill_tok_s']:.1f} | {peer['decode_tok_s']:.2f} |")
            ratio = [r[key] / peer[key] for key in ("prefill_tok_s", "decode_tok_s")]
            lines.append(f"| **ratio sageLLM / llama.cpp** | 1 | **{ratio[0]:.2f}** | **{ratio[1]:.2f}** |")
    return "\n".join(lines)


def big_table(path: Path, r: dict[str, Any]) -> str:
    bound = 1.5 * r["file_gib"] + r["kv_gib"]
    one = r["batches"]["1"]
    return (
        f"\n{path.name} ({r['file_gib']:.2f} GiB): loaded in {r['load_s']:.1f} s; prefill {one['prefill_tok_s']:.1f}, "
        f"decode {one['decode_tok_s']:.2f} tok/s (16-token prompt, 16 tokens); RSS {r['rss_gib']:.2f} GiB (peak "
        f"{r['hwm_gib']:.2f}) against 1.5 x file + KV = {bound:.2f} GiB; {r['memory']}"
    )


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"
