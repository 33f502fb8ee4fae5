"""A linear's weight on the CPU, in the one form its calls read, and the linear on it with torch's GEMMs.

Every decode step streams every weight once, so each is packed at load in the layout measured fastest for how it
will be read: GGUF blocks for the native block kernels, dense fp32 for the native linear and torch's GEMM, oneDNN's
blocked layout without native kernels (plus an [in, out] copy where MKL's GEMV wins at one row). The CPU backend's
kernel table (cpu.py) picks the native kernel or this `linear` per call."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sagellm.backends.native import InterleavedBlocks, NativeKernels, interleave
from sagellm.backends.quantized import QuantizedWeight

# Without native kernels, outputs this wide (gate_up) also keep an [in, out] copy for one-row calls, where MKL's GEMV
# streams the weight fastest. A vocabulary projection (49152 wide) is one call big enough that oneDNN's two threads
# beat it (4.9 vs 6.0 ms for SmolLM2's lm_head at 2 threads), and its copy would cost another 113 MB.
GEMV_COPY_OUT = range(2048, 16384)
PACK_BATCH_HINT = 16  # rows oneDNN tunes the blocked layout for; measured as good at 1, 16 and 256 rows
# A dense fp32 weight at prefill's rows goes to oneDNN's GEMM, which reads it as it is (no packed copy), rather than to
# torch's F.linear, which is MKL's sgemm: on AMD's CPUs MKL runs its AVX2 code. A 2-core AMD EPYC with AVX-512 (peak
# fp32 539 GFLOP/s, `sagellm bench roofline`), SmolLM2's shapes at 128-3,072 rows: oneDNN 457-527 GFLOP/s, F.linear
# 199-229; SmolLM2's fp32 weights, a 2,048-token prompt alone: 2.95 s -> 1.78 s.
ONEDNN_DENSE = torch.backends.mkldnn.is_available()


@dataclass(frozen=True)
class CpuLinearWeight:
    """A linear's weight in the one form its calls read: its GGUF blocks for the native block kernels, else its
    floats (dense for the native kernels and torch's GEMM, oneDNN-blocked without native kernels)."""

    packed: torch.Tensor | None  # [out, in], oneDNN-blocked (opaque mkldnn tensor) when the dtype allows, else dense
    rows: torch.Tensor | None  # [in, out] contiguous, for outputs in GEMV_COPY_OUT when there is no `dense`
    dense: torch.Tensor | None = None  # [out, in] contiguous fp32, for the native linear and torch's GEMM
    blocks: InterleavedBlocks | None = None  # the GGUF blocks, for the native block linear
    # A fused linear whose parts' blocks differ in kind (a Q4_K_M file's q/k Q4_K, v Q6_K): each read on its own,
    # the outputs side by side.
    parts: tuple[InterleavedBlocks, ...] = ()


def pack_linear_weight(weight: torch.Tensor, native: NativeKernels | None = None) -> CpuLinearWeight:
    """The one layout `linear` reads a weight's floats in: with the `native` kernels an fp32 weight stays dense
    [out, in] (a tied vocabulary projection shares the embedding's tensor); otherwise oneDNN's blocked layout."""
    weight = weight.to("cpu").contiguous()  # [N, K]
    if native is not None and weight.dtype == torch.float32:
        return CpuLinearWeight(None, None, weight)
    rows = weight.t().contiguous() if weight.shape[0] in GEMV_COPY_OUT else None  # [K, N]
    if _onednn_packs(weight.dtype):
        return CpuLinearWeight(torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT), rows)
    return CpuLinearWeight(weight, rows)


def pack_block_weight(
    parts: list[QuantizedWeight], native: NativeKernels, int8_activations: bool = False
) -> CpuLinearWeight | None:
    """The GGUF blocks of a linear's parts interleaved in the library's group width (groups of 8 when the outputs
    are not a multiple of it), one weight when they share a kind, else one per run of neighbours of one kind (Qwen3.5's
    Q5_K qkv, then its Q4_K z, b and a: two calls, not four); None for a shape the kernels do not take (the caller
    then packs the floats). `int8_activations`: the parts of kinds with such a kernel multiply x rounded to int8."""
    runs: list[list[QuantizedWeight]] = []
    for part in parts:
        if runs and (runs[-1][0].kind, runs[-1][0].in_features) == (part.kind, part.in_features):
            runs[-1].append(part)
        else:
            runs.append([part])
    each = [QuantizedWeight.concat(run) for run in runs]
    widths = (native.block_group, 8)
    interleaved = [next((b for w in widths if (b := interleave(p, w, int8_activations))), None) for p in each]
    if any(blocks is None for blocks in interleaved):
        return None
    if len(interleaved) == 1:
        return CpuLinearWeight(None, None, blocks=interleaved[0])
    return CpuLinearWeight(None, None, parts=tuple(b for b in interleaved if b is not None))


def _onednn_packs(dtype: torch.dtype) -> bool:
    """oneDNN's blocked layout is for fp32, and for bf16 only where its bf16 path runs on this CPU (AVX-512 BW/VL/DQ
    or AVX-NE-CONVERT): elsewhere its reorder raises, and a bf16 weight stays dense for torch's own linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear(x: torch.Tensor, weight: CpuLinearWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] -> [T, N] (+ bias [N]) on a weight packed by `pack_linear_weight`, with torch's GEMMs. A bf16 weight
    (EngineConfig.dtype) takes x rounded to bf16, sums in fp32 and gives fp32, with the fp32 bias added after."""
    if weight.packed is None:  # dense fp32 (the native kernels' layout) at more rows than the native linear takes
        if ONEDNN_DENSE and x.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.dense, bias, "none", [], "")  # [T, N]
        return F.linear(x, weight.dense, bias)
    if weight.packed.dtype != x.dtype:
        out = linear(x.to(weight.packed.dtype), weight).to(x.dtype)
        return out if bias is None else out + bias
    if weight.rows is not None and x.shape[0] == 1:
        return torch.mm(x, weight.rows) if bias is None else torch.addmm(bias, x, weight.rows)  # [1, N]
    if weight.packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight.packed, bias, "none", [], "")  # [T, N]
    return F.linear(x, weight.packed, bias)
