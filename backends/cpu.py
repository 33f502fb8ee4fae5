"""The CPU backend: the shared torch ops, with `linear` on weight layouts measured to be fastest on x86 CPUs, and
native C kernels (backends/native) for small-batch decode.

A CPU LLM server is memory-bound at decode: every step streams every weight once. Measured on the 2-core AVX-512
machine this was written on (torch 2.13, MKL + oneDNN, fp32), oneDNN's matmul on a weight reordered once into its
blocked layout beats `F.linear` on the [out, in] weight and `torch.mm` on an [in, out] copy by 1.5-3x from two rows up
(batched decode, prefill). Up to NATIVE_BLOCK_ROWS rows a weight the GGUF file stored as Q4_0/Q4_1/Q8_0 is read from
its blocks instead (block_linear.c: a quarter to a fifth of the bytes, dequantized in registers to the same floats):
SmolLM2's 210 layer linears with the AVX-512 kernels at 16 rows 11.1 vs 16.5 ms, at 1 row 3.1 vs 18. Other fp32
weights keep their dense layout beside the blocked one for one or two rows, where the native `linear_f32` streaming it
on one thread beats oneDNN (24 vs 40 ms a batch-1 step), except a vocabulary projection tied to the embedding, which
shares the embedding's tensor. Without native kernels, a single row against a wide output (gate_up) uses MKL's GEMV
on an [in, out] copy, 1.4-2x faster than oneDNN there (`GEMV_COPY_OUT`).

Around the linears, at a few rows per step torch spends more on dispatching RMSNorm, RoPE, SiLU and attention and on
waking its OpenMP worker than on their math, and its decode attention first copies every context into a padded
tensor; the C kernels do each op in one call on the calling thread and read the paged cache in place. At prefill's
hundreds of rows they share the rows among torch's threads, one pass over memory where torch's RMSNorm makes five.
`NativeDispatch` picks per call, by shape, and falls back to the torch ops for anything the C code does not take
(other dtypes, more rows) or when no C compiler is found. At decode even those calls cost: for a model whose linears
all read GGUF blocks, `decoder_layers` runs every layer of a decode-only step in one C call
(backends/native/decoder_layers.c), the same kernels in the same order. The C kernels are built per instruction set
(avx512, avx2, portable) and the best one this CPU runs is loaded (backends/native/isa.py)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from sagellm.backends import torch_ops
from sagellm.backends.attention_metadata import PrefillChunk
from sagellm.backends.base import Availability, DecoderLayer, DecoderShape, KernelTable
from sagellm.backends.native import (
    DISABLE_ENV,
    InterleavedBlocks,
    NativeKernels,
    fits_decode_attention,
    fits_dense,
    fits_heads,
    fits_prefill_attention,
    fits_rows,
    interleave,
    isa,
    prefill_scratch_size,
)
from sagellm.backends.native.decoder_layers import NativeDecoderLayers, attention_threads
from sagellm.backends.quantized import QuantizedWeight
from sagellm.backends.registry import register_backend

# Without native kernels, outputs this wide (gate_up) also keep an [in, out] copy for one-row calls, where MKL's GEMV
# streams the weight fastest. A vocabulary projection (49152 wide) is one call big enough that oneDNN's two threads
# beat it (4.9 vs 6.0 ms for SmolLM2's lm_head at 2 threads), and its copy would cost another 113 MB.
GEMV_COPY_OUT = range(2048, 16384)
PACK_BATCH_HINT = 16  # rows oneDNN tunes the blocked layout for; measured as good at 1, 16 and 256 rows
I64 = torch.int64
# Rows up to which the native RMSNorm / RoPE / SiLU run on the calling thread; more rows (prefill) are shared
# among torch's threads.
NATIVE_SERIAL_ROWS = 64
# Rows up to which the native linear, streaming the dense weight on one thread, beats oneDNN's blocked one.
NATIVE_LINEAR_ROWS = 2
# Rows up to which the native linear on a GGUF weight's interleaved blocks beats oneDNN on its fp32 copy. SmolLM2's
# layer linears, cold (`sagellm bench kernels`), AVX-512 kernels on a 2-core AMD EPYC whose oneDNN runs AVX-512 too:
# 16 rows 11.1 vs 16.4 ms, 48: 29.1 vs 36.0, 64: 44.5 vs 40.5 in one run and 37.0 vs 39.9 in another; AVX2 kernels on
# an earlier machine: 16 rows 20.5 vs 26.7 ms, 48: 57.4 vs 61.1, 64: 76.6 vs 73.4.
NATIVE_BLOCK_ROWS = 48


@dataclass(frozen=True)
class CpuLinearWeight:
    packed: torch.Tensor  # [out, in], oneDNN-blocked (opaque mkldnn tensor) when the dtype allows, else dense
    rows: torch.Tensor | None  # [in, out] contiguous, for outputs in GEMV_COPY_OUT when there is no `dense`
    dense: torch.Tensor | None = None  # [out, in] contiguous fp32, for the native linear
    blocks: InterleavedBlocks | None = None  # the GGUF blocks, for the native block linear (then no `dense`)


def pack_linear_weight(
    weight: torch.Tensor, native: NativeKernels | None = None, quantized: QuantizedWeight | None = None
) -> CpuLinearWeight:
    """The layouts `linear` reads. For the `native` kernels an fp32 weight also keeps its GGUF blocks interleaved in
    the library's group width when the file held some the kernels read (groups of 8 when the outputs are not a
    multiple of it), else its dense [out, in] self."""
    weight = weight.to("cpu").contiguous()  # [N, K]
    blocks = None
    if native is not None and quantized is not None:
        blocks = interleave(quantized, native.block_group) or interleave(quantized)
    dense = weight if native is not None and blocks is None and weight.dtype == torch.float32 else None
    rows = weight.t().contiguous() if weight.shape[0] in GEMV_COPY_OUT and dense is None else None  # [K, N]
    if _onednn_packs(weight.dtype):
        return CpuLinearWeight(torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT), rows, dense, blocks)
    return CpuLinearWeight(weight, rows, dense, blocks)


def _onednn_packs(dtype: torch.dtype) -> bool:
    """oneDNN's blocked layout is for fp32, and for bf16 only where its bf16 path runs on this CPU (AVX-512 BW/VL/DQ
    or AVX-NE-CONVERT): elsewhere its reorder raises, and a bf16 weight stays dense for torch's own linear."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear(x: torch.Tensor, weight: CpuLinearWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] -> [T, N] (+ bias [N]) on a weight packed by `pack_linear_weight`, with torch's GEMMs. A bf16 weight
    (EngineConfig.dtype) takes x rounded to bf16, sums in fp32 and gives fp32, with the fp32 bias added after."""
    if weight.packed.dtype != x.dtype:
        out = linear(x.to(weight.packed.dtype), weight).to(x.dtype)
        return out if bias is None else out + bias
    if weight.rows is not None and x.shape[0] == 1:
        return torch.mm(x, weight.rows) if bias is None else torch.addmm(bias, x, weight.rows)  # [1, N]
    if weight.packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight.packed, bias, "none", [], "")  # [T, N]
    return F.linear(x, weight.packed, bias)


class NativeDispatch:
    """The kernel-table ops that run a native kernel or the torch op, chosen per call by shape and layout."""

    def __init__(self, native: NativeKernels) -> None:
        self.native = native
        self.buffers = torch_ops.GatherBuffers()  # for the torch decode attention, and prefill chunks' gathers
        self._prefill_scratch = torch.empty(0)  # the native prefill attention's transposed keys, reused
        # The torch attention with each part native where it fits: the K/V write, the decode tokens' attention and
        # each prefill chunk's. Whether decode attention is native depends only on the model and the cache (dtype,
        # head size, layouts), not on the step, so a model's decodes all go one way: the torch path's kept K/V
        # (GatherBuffers) is never left missing the tokens of steps that ran natively.
        self.attention: Callable[..., torch.Tensor] = functools.partial(
            torch_ops.attention,
            decode=self.paged_decode_attention,
            buffers=self.buffers,
            write=self.write_kv,
            prefill=self.prefill_attention,
        )

    def ops(self) -> KernelTable:
        return {
            "linear": self.linear,
            "rmsnorm": self.rmsnorm,
            "add_rmsnorm": self.add_rmsnorm,
            "rope": self.rope,
            "silu_mul": self.silu_mul,
            "attention": self.attention,
            "paged_decode_attention": self.paged_decode_attention,
            "decoder_layers": self.decoder_layers,
        }

    def decoder_layers(self, layers: list[DecoderLayer], shape: DecoderShape) -> NativeDecoderLayers | None:
        """The layers in one native call for decode-only steps of up to NATIVE_BLOCK_ROWS rows, the steps whose
        linears all read GGUF blocks one op at a time too; None unless every linear has its blocks (`build` checks)."""
        linears = ("qkv", "o_proj", "gate_up", "down")
        blocks = [replace(layer, **{name: getattr(layer, name).blocks for name in linears}) for layer in layers]
        return NativeDecoderLayers.build(self.native, blocks, shape, NATIVE_BLOCK_ROWS)

    def linear(self, x: torch.Tensor, weight: CpuLinearWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows, fits = x.shape[0], fits_rows(x) and (bias is None or fits_dense(bias))
        if weight.blocks is not None and rows <= NATIVE_BLOCK_ROWS and fits:
            return self.native.block_linear(x, weight.blocks, bias, torch.get_num_threads())
        if weight.dense is not None and rows <= NATIVE_LINEAR_ROWS and fits:
            return self.native.linear(x, weight.dense, bias)
        return linear(x, weight, bias)

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if fits_rows(x) and fits_dense(weight):
            return self.native.rmsnorm(x, weight, eps, _row_threads(x))
        return torch_ops.rmsnorm(x, weight, eps)

    def add_rmsnorm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if fits_rows(x, residual) and fits_dense(weight):
            return self.native.add_rmsnorm(x, residual, weight, eps, _row_threads(x))
        return torch_ops.add_rmsnorm(x, residual, weight, eps)

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if fits_heads(q, k) and fits_dense(cos_sin) and fits_dense(positions, dtype=torch.int64):
            return self.native.rope(q, k, positions, cos_sin, _row_threads(q))
        return torch_ops.rope(q, k, positions, cos_sin)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        if fits_rows(x):
            return self.native.silu_mul(x, _row_threads(x))
        return torch_ops.silu_mul(x)

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """The native K/V write where it fits (torch's index_copy_ took ~1.5 ms a layer for 500 tokens)."""
        if fits_heads(k, v) and fits_dense(k_cache, v_cache) and fits_dense(slots, dtype=I64):
            self.native.write_kv(k, v, k_cache, v_cache, slots)
        else:
            torch_ops.write_kv(k, v, k_cache, v_cache, slots)

    def prefill_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        chunk: PrefillChunk,
        scale: float,
        buffers: torch_ops.GatherBuffers | None = None,
    ) -> torch.Tensor:
        """A prefill chunk's causal attention read from the paged cache in place (its K/V are written first), or the
        torch op for what the C code does not take."""
        if fits_prefill_attention(q, k_cache, v_cache, chunk.block_table):
            keys = chunk.query_len * chunk.context_len
            threads = attention_threads(keys)
            size = prefill_scratch_size(chunk.context_len, k_cache.shape[2], q.shape[2])
            if self._prefill_scratch.numel() < size:  # grown, never shrunk: fresh memory costs page faults per call
                self._prefill_scratch = torch.empty(size, dtype=torch.float32)
            return self.native.paged_prefill_attention(
                q, k_cache, v_cache, chunk.block_table, chunk.context_len, scale, threads, self._prefill_scratch
            )
        return torch_ops.prefill_attention(q, k, v, k_cache, v_cache, chunk, scale, buffers)

    def paged_decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        if fits_decode_attention(q, k_cache, v_cache, block_tables, context_lens):
            keys = q.shape[0] * block_tables.shape[1] * k_cache.shape[1]  # an upper bound: tables span the contexts
            return self.native.paged_decode_attention(
                q, k_cache, v_cache, block_tables, context_lens, scale, attention_threads(keys)
            )
        return torch_ops.paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale, buffers=self.buffers
        )


def _row_threads(x: torch.Tensor) -> int:
    """Threads for a native row-wise op: the calling one alone for a decode's few rows, torch's for a prefill's."""
    return 1 if x.shape[0] <= NATIVE_SERIAL_ROWS else torch.get_num_threads()


@register_backend
class CpuBackend(torch_ops.TorchOpsBackend):
    name = "cpu"
    device_type = "cpu"

    @classmethod
    def availability(cls) -> Availability:
        kernels = "off" if os.environ.get(DISABLE_ENV) == "0" else isa.chosen().name
        return Availability(True, f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels: {kernels}")

    def linear_dtype_problem(self, dtype: torch.dtype) -> str | None:
        """bf16 only where the CPU multiplies it natively (AVX512-BF16 or AMX): oneDNN emulates it elsewhere, slower
        than fp32."""
        if dtype == torch.bfloat16 and not {"avx512_bf16", "amx_bf16"} & isa.cpu_flags():
            return "bfloat16 needs a CPU with AVX512-BF16 or AMX (this one has neither): use float32"
        return super().linear_dtype_problem(dtype)

    def prepare_linear_weight(self, weight: torch.Tensor, quantized: QuantizedWeight | None = None) -> CpuLinearWeight:
        return pack_linear_weight(weight, NativeKernels.load(), quantized)

    def kernels(self) -> KernelTable:
        """The torch ops with the CPU `linear`, and native kernels where a C compiler built them."""
        table = {**super().kernels(), "linear": linear}
        native = NativeKernels.load()
        return table if native is None else {**table, **NativeDispatch(native).ops()}
