"""`sagellm bench kernels`: the CPU kernels of every instruction-set variant this CPU runs, against oneDNN and torch,
in one run, and where the time of an offline W1-c16 run goes, op by op.

- roofline: oneDNN's fp32 GEMM on a large square and on prefill's shapes (SmolLM2, 512 rows): the machine's fp32
  peak as torch reaches it, what prefill's linears run at;
- block linears: SmolLM2's 120 layer linears (Q4_1 blocks, cold: every weight from memory) at 1-64 rows, per variant
  (AVX-512 reads groups of 16 outputs, the others groups of 8), against oneDNN on the fp32 copy;
- attention: decode (16 sequences x 320 cached tokens x 30 layers, cold) per variant, and one prefill chunk (native
  against torch's scaled_dot_product_attention on the gathered cache);
- with `--ops`: `LLM.generate` of W1-c16 (64 random 256-token prompts, 128 tokens each, 16 at once) with a timer
  around every op of the plan, split into decode-only and mixed (prefill) steps; decode-only steps run the decoder
  layers as one native call (runtime/execution_graph/fuse_layers.py), timed as one."""

from __future__ import annotations

import argparse
import collections
import functools
import time
from collections.abc import Callable

import numpy as np
import torch

SHAPES = (("qkv", 960, 576), ("o_proj", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536))  # SmolLM2's


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", default="1,16,32,48,64", help="rows of the block linears (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=30, help="layers of linears and attention (default: 30)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each; the best is shown (default: 5)")
    parser.add_argument("--ops", action="store_true", help="also time every op of an offline W1-c16 run")
    parser.add_argument("--prompts", type=int, default=64, help="W1-c16 prompts with --ops (default: 64)")


def run(args: argparse.Namespace) -> int:
    from sagellm.backends.native import NativeKernels, isa
    from sagellm.benchmarks.vllm_results import cpu_description

    torch.set_num_threads(max(1, torch.get_num_threads()))
    variants = [v for v in isa.runnable() if NativeKernels.load(v) is not None]
    print(f"CPU: {cpu_description()}; {torch.get_num_threads()} threads; kernels chosen: {isa.chosen().name}")
    print("\nroofline: oneDNN fp32 GEMM")
    for m, n, k in ((2048, 2048, 2048), (512, 3072, 576), (512, 576, 1536), (512, 960, 576)):
        seconds = _onednn_gemm(m, n, k, args.repeats)
        print(f"  {m}x{n}x{k}: {2 * m * n * k / seconds / 1e9:.0f} GFLOPS")
    print(f"\nblock linears: SmolLM2's layer linears x {args.layers} layers, Q4_1, cold (ms; GFLOPS)")
    _block_linears(variants, [int(r) for r in args.rows.split(",")], args.layers, args.repeats)
    print(f"\ndecode attention: 16 sequences x 320 cached tokens x {args.layers} layers, cold (ms; GB/s of K/V)")
    for variant in variants:
        ms, gbs = _decode_attention(NativeKernels.load(variant), args.layers, args.repeats)
        print(f"  {variant.name}: {ms:.2f} ms, {gbs:.1f} GB/s")
    print("\nprefill attention, one layer (ms): native (every thread) vs torch SDPA on the gathered cache")
    for n, ctx in ((32, 544), (256, 256), (512, 512)):
        native, torch_ms = _prefill_attention(NativeKernels.load(), n, ctx, args.repeats)
        print(f"  {n} queries over {ctx} tokens: native {native:.3f}, torch {torch_ms:.3f}")
    if args.ops:
        _op_timers(args.prompts)
    return 0


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The least seconds `fn` took in `repeats` runs, after a warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _onednn_gemm(m: int, n: int, k: int, repeats: int) -> float:
    from sagellm.backends.cpu_linear import linear, pack_linear_weight

    x, weight = torch.randn(m, k), pack_linear_weight(torch.randn(n, k))
    return best_time(lambda: linear(x, weight), repeats)


def _block_linears(variants, rows: list[int], layers: int, repeats: int) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from sagellm.backends.cpu_linear import pack_linear_weight
    from sagellm.backends.native import NativeKernels, interleave
    from sagellm.backends.quantized import QuantizedWeight

    rng = np.random.default_rng(0)
    dense, blocks = [], []
    for _ in range(layers):
        for _, n, k in SHAPES:
            values = rng.standard_normal((n, k), dtype=np.float32) * 0.05
            raw = quantize(values, GGMLQuantizationType.Q4_1)
            blocks.append(QuantizedWeight("Q4_1", torch.from_numpy(raw.reshape(n, -1)), k))
            dense.append(pack_linear_weight(torch.from_numpy(values)))
    layouts = {group: [interleave(b, group) for b in blocks] for group in (8, 16)}
    flops = sum(2 * n * k for _, n, k in SHAPES) * layers
    for count in rows:
        inputs = {k: torch.randn(count, k) for k in (576, 1536)}
        cells = []
        for variant in variants:
            kernels = NativeKernels.load(variant)
            seconds = best_time(functools.partial(_run_blocks, kernels, layouts[kernels.block_group], inputs), repeats)
            cells.append(f"{variant.name} {seconds * 1e3:6.2f} ({flops * count / seconds / 1e9:3.0f})")
        seconds = best_time(functools.partial(_run_dense, dense, inputs), repeats)
        cells.append(f"oneDNN {seconds * 1e3:6.2f} ({flops * count / seconds / 1e9:3.0f})")
        print(f"  {count:3d} rows: " + "  ".join(cells))


def _run_blocks(kernels, weights, inputs: dict[int, torch.Tensor]) -> None:
    threads = torch.get_num_threads()
    for weight in weights:
        kernels.block_linear(inputs[weight.in_features], weight, None, threads)


def _run_dense(weights, inputs: dict[int, torch.Tensor]) -> None:
    from sagellm.backends.cpu_linear import linear

    for weight in weights:
        linear(inputs[weight.packed.shape[1]], weight)


def _decode_attention(kernels, layers: int, repeats: int) -> tuple[float, float]:
    from sagellm.backends.layer_caches import PagedKv
    from sagellm.backends.layer_specs import AttentionSpec

    batch, ctx, hq, hk, d, block = 16, 320, 9, 3, 64, 16
    blocks = batch * ctx // block
    caches = [PagedKv(torch.randn(blocks, block, hk, d), torch.randn(blocks, block, hk, d)) for _ in range(layers)]
    tables = torch.randperm(blocks).to(torch.int32).view(batch, -1).contiguous()
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    q = torch.randn(batch, hq, d)
    threads, spec = torch.get_num_threads(), AttentionSpec(d**-0.5)
    seconds = best_time(
        lambda: [kernels.paged_decode_attention(q, cache, tables, lens, spec, threads) for cache in caches], repeats
    )
    return seconds * 1e3, layers * batch * ctx * hk * d * 4 * 2 / seconds / 1e9


def _prefill_attention(kernels, n: int, ctx: int, repeats: int) -> tuple[float, float]:
    from sagellm.backends import torch_ops
    from sagellm.backends.attention_metadata import PrefillChunk
    from sagellm.backends.layer_caches import PagedKv
    from sagellm.backends.layer_specs import AttentionSpec

    hq, hk, d, block = 9, 3, 64, 16
    blocks = -(-ctx // block)
    cache = PagedKv(torch.randn(blocks, block, hk, d), torch.randn(blocks, block, hk, d))
    table = torch.randperm(blocks).to(torch.int32)
    q, k, v = torch.randn(n, hq, d), torch.randn(n, hk, d), torch.randn(n, hk, d)
    threads, spec = torch.get_num_threads(), AttentionSpec(d**-0.5)
    attend = functools.partial(kernels.paged_prefill_attention, q, cache, table, ctx, spec, threads)
    native = best_time(attend, repeats)
    chunk = PrefillChunk(0, n, ctx, table)
    reference = best_time(lambda: torch_ops.prefill_attention(q, k, v, cache, chunk, spec), repeats)
    return native * 1e3, reference * 1e3


def _op_timers(prompts: int) -> None:
    """Every op of the plan timed in an offline W1-c16 run, per kind of step."""
    from sagellm import LLM
    from sagellm.benchmarks.workloads import offline_w1_c16
    from sagellm.runtime.execution_graph.fuse_layers import FusedLayers
    from sagellm.runtime.execution_graph.plan import Instr

    llm = LLM(max_num_seqs=16)
    runner = llm.engine.runner
    spent: dict[tuple[str, str], float] = collections.defaultdict(float)
    steps: dict[str, list[float]] = collections.defaultdict(list)
    kind = ["decode"]

    def timed(instr: Instr) -> Instr:
        if isinstance(instr.kernel, FusedLayers):  # its op-by-op fallback (steps it declines) is timed per op
            fallback = instr.kernel.fallback
            fallback.instrs[:] = [timed(inner) for inner in fallback.instrs]
            name = "decoder layers, fused"
        else:
            node = runner.graph.nodes[instr.node]
            name = node.op
            if node.op == "linear":
                weight = node.params["weight"]
                name = "linear " + (weight[0] if isinstance(weight, list) else weight).split(".")[-2]

        def kernel(*args):
            start = time.perf_counter()
            result = instr.kernel(*args)
            spent[kind[0], name] += time.perf_counter() - start
            return result

        return Instr(kernel, instr.inputs, instr.consts, instr.outputs, instr.node)

    runner.plan.instrs[:] = [timed(instr) for instr in runner.plan.instrs]
    execute = runner.execute

    def execute_timed(batch):
        kind[0] = "decode" if batch.num_decodes == len(batch.seqs) else "mixed"
        start = time.perf_counter()
        logits = execute(batch)
        steps[kind[0]].append(time.perf_counter() - start)
        return logits

    runner.execute = execute_timed
    tokens, wall = offline_w1_c16(llm, prompts)
    print(f"\nW1-c16 offline, op by op: {tokens / wall:.1f} out tok/s, {wall:.1f} s")
    for step_kind, times in steps.items():
        print(f"  {step_kind} steps: {len(times)}, {sum(times):.2f} s, {1e3 * sum(times) / len(times):.1f} ms each")
        ops = sorted(((v, op) for (k, op), v in spent.items() if k == step_kind), reverse=True)
        for seconds, op in ops:
            if seconds * 1e3 / len(times) >= 0.05:
                print(f"    {op:22s} {1e3 * seconds / len(times):7.2f} ms/step")
    llm.engine.close()
