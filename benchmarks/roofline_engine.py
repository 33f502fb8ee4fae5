"""Our engine's side of `sagellm bench roofline`: what a model's decode step must read and its prefill must compute,
counted from the loaded weights, and what `LLM.generate` achieves against that.

- decode, one stream: TPOT of a greedy run (a short random prompt, EOS ignored; warmed up first; the median of
  `repeats`); the bytes a step must read are every layer linear's weights as the file stores them (a GGUF's blocks,
  or fp32 where the engine holds the floats: `:fp32` models, Hugging Face checkpoints), the vocabulary projection
  (the embedding when tied), the norms, one embedding row, and the KV cache at the run's mean context; GB/s =
  bytes / TPOT. The linears alone are timed too, on the engine's own packed weights, one row each in the plan's
  order, on the engine's threads and on one (`linears_ms`, `linears_1_thread_ms`; GB/s of the layouts the engine
  holds, whose interleaved blocks carry fp32 scales): kernels that read below what a plain sum reads on the same
  threads are bound by their instructions, not by memory, and TPOT less their time is attention, norms, sampling
  and the step's overhead; and where a decode step's time goes, each part timed as the engine runs
  (decode_parts.py: the decoder layers' native call, the vocabulary projection, the embedding, the engine's Python);
- prefill: a P-token random prompt with max_tokens=1 (one step: the token budget is the longest prompt), its TTFT
  the median of `repeats` after a warm-up; FLOPs = 2 x layer-linear parameters x P + causal attention (QK^T and PV,
  2 x 2 x head_dim x heads x P(P + 1) / 2 per layer) + the vocabulary projection for the last row.

Dense Llama-family models only (a mixture of experts reads a token's experts, not all: refused)."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sagellm.benchmarks.decode_parts import decode_parts
from sagellm.common.errors import InvalidInput

DEQUANTIZED = ":fp32"  # a model name's suffix: the engine holds its floats (quantized_weights=False)
DTYPE_NAMES = {4: "F32", 2: "BF16"}  # a float weight's kind by element size, as the loader holds it
# The kinds block_linear.c hands to block_int8.c's int8 dot products at up to INT8_MAX_ROWS (4) rows: decode's.
INT8_DECODE_KINDS = frozenset({"Q4_K", "Q5_K", "Q6_K", "MXFP4"})
# The kinds whose 16-wide layouts it hands to block_int16.c's int16 dot products from INT16_MIN_ROWS (16) rows on, in
# the library built with AVX-512 VNNI: prefill's.
INT16_KINDS, INT16_MIN_ROWS = frozenset({"Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"}), 16
# Rows from which the library reading 8-wide layouts (AVX2, portable) multiplies in block_panel.c's panels.
PANEL_MIN_ROWS = 9


@dataclass(frozen=True)
class WeightCount:
    """A model's weights as a decode step reads them and a prefill multiplies them, from the loaded model."""

    layer_params: int  # every decoder layer's 2-D weights (the linears)
    layer_bytes: int  # as stored: a GGUF's blocks, else the floats' bytes
    head_params: int  # the vocabulary projection (the embedding when tied)
    head_bytes: int
    other_bytes: int  # norms and other 1-D weights, read once a step
    embedding_row_bytes: float  # one token's embedding row
    formats: dict[str, int]  # stored kind -> layer and head weights held in it ("Q4_K": 20, "F32": 1)
    layers: int
    heads: int
    head_dim: int


@dataclass
class EngineResult:
    """One model's row: decode at one stream and prefill at each prompt length."""

    model: str
    weights: WeightCount
    threads: int  # the engine's threads (fixed: adaptive threads off)
    held_weight_bytes: int  # every weight the engine's plan holds, in its kernels' layouts (the embedding too)
    kv_bytes_per_token: int
    decode: dict[str, float] = field(default_factory=dict)
    prefill: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def count_weights(path: Path, dequantized: bool) -> WeightCount:
    """The weights `path` loads as, counted by name: decoder layers' 2-D weights are the linears, the embedding (or
    lm_head) the vocabulary projection, 1-D weights norms."""
    from sagellm.runtime.models.loader import load_model

    loaded = load_model(path, load_tokenizer=False)
    config = loaded.config
    if config.num_experts:
        raise InvalidInput(f"{path}: a mixture of experts; `bench roofline` counts dense models' weights only")
    weights = loaded.weights
    shapes = weights.shapes() if hasattr(weights, "shapes") else {n: tuple(t.shape) for n, t in weights.items()}
    formats: Counter[str] = Counter()

    def stored(name: str, counted: bool = True) -> int:
        """Its bytes as held; `counted`: its kind joins `formats` (the weights a step reads whole)."""
        blocks = None if dequantized else loaded.quantized.get(name)
        size = 4 if dequantized or blocks is not None else weights[name].element_size()
        formats[blocks.kind if blocks is not None else DTYPE_NAMES.get(size, f"{8 * size}-bit")] += counted
        return blocks.blocks.numel() if blocks is not None else int(np.prod(shapes[name])) * size  # blocks: uint8

    embedding = "model.embed_tokens.weight"
    head = "lm_head.weight" if "lm_head.weight" in shapes else embedding
    layer_params = layer_bytes = other = 0
    for name, shape in shapes.items():
        if name.startswith("model.layers.") and len(shape) == 2:
            layer_params += int(np.prod(shape))
            layer_bytes += stored(name)
        elif len(shape) == 1:
            other += int(shape[0]) * (4 if dequantized else weights[name].element_size())
    head_bytes = stored(head)
    embedding_bytes = head_bytes if head == embedding else stored(embedding, counted=False)
    return WeightCount(
        layer_params, layer_bytes, int(np.prod(shapes[head])), head_bytes, other,
        embedding_bytes / shapes[embedding][0], dict(formats), config.num_layers, config.num_heads, config.head_dim,
    )  # fmt: skip


def measure_engine(
    name: str, path: Path, *, threads: int, prefill_lens: list[int], decode_prompt: int, decode_tokens: int,
    repeats: int, progress: Callable[[str], None], seed: int = 0,
) -> EngineResult:  # fmt: skip
    """Loads `path` (`name` ending in `:fp32`: its floats) into an `LLM` on `threads` fixed threads and measures
    decode at one stream and prefill at each of `prefill_lens`."""
    from sagellm import LLM, SamplingParams
    from sagellm.runtime.engine.memory_report import plan_weight_bytes

    dequantized = name.endswith(DEQUANTIZED)
    count = count_weights(path, dequantized)
    longest = max([*prefill_lens, decode_prompt + decode_tokens])
    blocks = 2 * -(-(longest + 64) // 16)  # a small cache, reused: its pages are mapped by the warm-ups
    llm = LLM(str(path), num_threads=threads, adaptive_threads=False, max_num_batched_tokens=max(prefill_lens),
              max_num_seqs=1, num_kv_blocks=blocks, block_size=16, prefault_kv_cache=True,
              quantized_weights=not dequantized)  # fmt: skip
    runner = llm.engine.runner
    caches = [t for pair in runner.kv_caches for t in pair]
    result = EngineResult(
        name, count, torch.get_num_threads(), plan_weight_bytes(runner.plan, skip=caches),
        sum(t.numel() * t.element_size() // (t.shape[0] * t.shape[1]) for t in caches),
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    vocab = llm.engine.model.config.vocab_size

    def prompt(tokens: int) -> list[int]:  # fresh random ids: no prefix cache hit
        return rng.integers(min(100, vocab // 4), vocab - min(100, vocab // 4), tokens).tolist()

    def run(tokens: int, out: int) -> Any:
        greedy = SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)
        return llm.generate([prompt(tokens)], greedy)[0].metrics

    progress(f"{name}: decode, {decode_tokens} tokens after {decode_prompt}, warm-up + {repeats}")
    run(decode_prompt, decode_tokens)
    tpots = [run(decode_prompt, decode_tokens).tpot_s for _ in range(repeats)]
    context = decode_prompt + decode_tokens / 2  # the mean context a decode step reads
    tpot = statistics.median(tpots)
    parts = decode_parts(llm, lambda: run(decode_prompt, decode_tokens))
    read = count.layer_bytes + count.head_bytes + count.other_bytes + count.embedding_row_bytes
    kv = result.kv_bytes_per_token * context
    flops = 2 * (count.layer_params + count.head_params) + 4 * count.head_dim * count.heads * context * count.layers
    on_cpu = llm.engine.backend.name == "cpu"
    held = _held_linear_bytes(runner.plan) if on_cpu else None
    linears = _linears_seconds(runner.plan, repeats, result.threads) if on_cpu else None
    linears_1 = _linears_seconds(runner.plan, repeats, 1) if on_cpu else None
    result.decode = {
        "prompt_tokens": decode_prompt, "output_tokens": decode_tokens, "tpot_ms": tpot * 1e3,
        "tpot_all_ms": [t * 1e3 for t in tpots], "weight_bytes": read, "kv_bytes": kv, "bytes": read + kv,
        "gbs": (read + kv) / tpot / 1e9, "flops": flops, "gflops": flops / tpot / 1e9,
        "linears_ms": None if linears is None else linears * 1e3, "held_linear_bytes": held,
        "linears_gbs": None if linears is None else held / linears / 1e9,
        "linears_1_thread_ms": None if linears_1 is None else linears_1 * 1e3,
        "linears_1_thread_gbs": None if linears_1 is None else held / linears_1 / 1e9, "parts_ms": parts,
    }  # fmt: skip
    for tokens in prefill_lens:
        progress(f"{name}: prefill of {tokens} tokens, warm-up + {repeats}")
        run(tokens, 1)
        seconds = statistics.median(run(tokens, 1).ttft_s for _ in range(repeats))
        attention = 2 * 2 * count.head_dim * count.heads * tokens * (tokens + 1) / 2 * count.layers
        flops = 2 * count.layer_params * tokens + attention + 2 * count.head_params
        result.prefill.append({"tokens": tokens, "ms": seconds * 1e3, "flops": flops, "gflops": flops / seconds / 1e9})
    return result


def _linear_calls(plan) -> list[tuple[Callable, Any, Any]]:
    """(kernel, weight, bias) of every linear instruction of the plan (a fused layers' instruction: of its layers'
    own plan), in order, each weight once."""
    from sagellm.backends.cpu_linear import CpuLinearWeight
    from sagellm.runtime.execution_graph.fuse_layers import FusedLayers

    calls, seen = [], set()
    for instr in plan.instrs:
        if isinstance(instr.kernel, FusedLayers):
            calls += [c for c in _linear_calls(instr.kernel.fallback) if id(c[1]) not in seen]
        elif instr.consts and isinstance(instr.consts[0], CpuLinearWeight) and id(instr.consts[0]) not in seen:
            calls.append((instr.kernel, instr.consts[0], instr.consts[1] if len(instr.consts) > 1 else None))
        seen.update(id(c[1]) for c in calls)
    return calls


def _in_features(weight) -> int:
    blocks = weight.parts[0] if weight.parts else weight.blocks
    if blocks is not None:
        return blocks.in_features
    return int((weight.dense if weight.dense is not None else weight.packed).shape[1])


def _linears_seconds(plan, repeats: int, threads: int) -> float:
    """The best time of one row through every linear of the plan, in order, on `threads` threads (each weight read
    from memory, as at decode: together they are larger than the caches for any model worth measuring). Each call
    pays its Python dispatch (a few microseconds), which the decode step's one native call of all layers does not."""
    calls = [(kernel, w, bias, torch.randn(1, _in_features(w))) for kernel, w, bias in _linear_calls(plan)]
    engine_threads, best = torch.get_num_threads(), float("inf")
    torch.set_num_threads(threads)  # the native kernels take torch's count
    try:
        for _ in range(repeats + 1):  # the first warms up
            start = time.perf_counter()
            for kernel, weight, bias, x in calls:
                kernel(x, weight, bias)
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(engine_threads)
    return best


def _held_linear_bytes(plan) -> int:
    """Bytes a one-row call of every linear reads in the engine's layouts (the interleaved blocks carry fp32
    scales where the file's are fp16)."""
    total = 0
    for _, weight, _ in _linear_calls(plan):
        blocks = weight.parts or (() if weight.blocks is None else (weight.blocks,))
        tensors = [b.data for b in blocks] or [weight.dense if weight.dense is not None else weight.packed]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def decode_path(weights: WeightCount) -> str:
    """Which kernels a one-row decode step's linears run (backends/cpu.py, backends/native/block_linear.c)."""
    kinds = set(weights.formats)
    if kinds <= {"F32"}:
        return "fp32 rows, native linear_f32 on one thread"
    int8, dequantized = sorted(kinds & INT8_DECODE_KINDS), sorted(kinds - INT8_DECODE_KINDS)
    paths = [f"int8 dot products (block_int8.c) for {'/'.join(int8)}"] if int8 else []
    paths += [f"blocks dequantized in registers, fp32 FMA, for {'/'.join(dequantized)}"] if dequantized else []
    return "; ".join(paths)


def prefill_path(weights: WeightCount, tokens: int, threads: int) -> str:
    """Which kernels a `tokens`-row prefill's linears run: fp32 GEMMs for floats, else the blocks' int16 dot products
    where the library has them (AVX-512 VNNI), dequantized to fp32 otherwise."""
    from sagellm.backends.cpu import block_gemm_rows
    from sagellm.backends.cpu_linear import ONEDNN_DENSE
    from sagellm.backends.native import NativeKernels
    from sagellm.backends.native.isa import cpu_vendor

    if set(weights.formats) <= {"F32"}:
        return "fp32 GEMM (oneDNN)" if ONEDNN_DENSE else "fp32 GEMM (torch)"
    native = NativeKernels.load()
    gemm_rows = block_gemm_rows(cpu_vendor(), native.isa if native is not None else "")[0 if threads == 1 else 1]
    if gemm_rows is not None and tokens >= gemm_rows:
        return "blocks dequantized to fp32 tiles, torch GEMM"
    int16 = sorted(set(weights.formats) & INT16_KINDS)
    if native is not None and native.isa == "avx512vnni" and tokens >= INT16_MIN_ROWS and int16:
        return f"int16 dot products (block_int16.c) for {'/'.join(int16)}"
    if native is not None and native.block_group == 8 and tokens >= PANEL_MIN_ROWS:
        return "blocks dequantized once into L1 panels, fp32 6x16 FMA tiles (block_panel.c)"
    return "blocks dequantized in registers, fp32 FMA (block_linear.c)"
