"""The CPU backend: the shared torch ops, with `linear` on weight layouts measured to be fastest on x86 CPUs, and
native C kernels (backends/native) for small-batch decode.

A CPU LLM server is memory-bound at decode: every step streams every weight once. Each linear weight is held in one
form. A weight the GGUF file stored as blocks the kernels read (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) stays
blocks (block_linear.c: dequantized in registers to gguf-py's floats, a quarter to a fifth of fp32's bytes): the
kernel multiplies from them directly (SmolLM2's 210 layer linears with the AVX-512 kernels at 16 rows 11.1 vs 16.5 ms
for oneDNN on fp32, at 1 row 3.1 vs 18; the AVX2 kernels from 9 rows in panels, block_panel.c); from block_gemm_rows'
rows (long prefill chunks) on all but AMD's AVX-512 CPUs, the blocks are dequantized a tile at a time into a small
buffer torch's GEMM reads. Other fp32 weights stay dense [out, in]: the native `linear_f32` streams them on one
thread for one or two rows (24 vs 40 ms for oneDNN a batch-1 step), torch's GEMM reads them above (within a few
percent of oneDNN's blocked layout from 64 rows up), and a vocabulary projection tied to the embedding shares the
embedding's tensor. Without native kernels, weights take oneDNN's blocked layout (1.5-3x `F.linear` from two rows
up), and a single row against a wide output (gate_up) uses MKL's GEMV on an [in, out] copy, 1.4-2x faster than
oneDNN there (`GEMV_COPY_OUT`; the weights' forms: cpu_linear.py).

Around the linears, at a few rows per step torch spends more on dispatching RMSNorm, RoPE, SiLU and attention and on
waking its OpenMP worker than on their math, and its decode attention first copies every context into a padded
tensor; the C kernels do each op in one call on the calling thread and read the paged cache in place. At prefill's
hundreds of rows they share the rows among torch's threads, one pass over memory where torch's RMSNorm makes five.
`NativeDispatch` picks per call, by shape, and falls back to the torch ops for anything the C code does not take
(other dtypes, more rows) or when no C compiler is found. At decode even those calls cost: for a model whose linears
all read GGUF blocks, `decoder_layers` runs every layer of a decode-only step in one C call
(backends/native/decoder_layers.c; Llama-shaped layers and Qwen3.5's Gated DeltaNet and gated attention ones), the
same kernels in the same order. Qwen3.5's Gated DeltaNet layers run their
recurrence natively, decode and prefill alike, in place in each sequence's state slot (backends/native/delta_rule.c).
The C kernels are built per instruction set (avx512vnni, avx512, avx2, portable) and the best one this CPU runs is
loaded (backends/native/isa.py)."""

from __future__ import annotations

import functools
import os
from dataclasses import replace
from typing import Any

import torch

from sagellm.backends import torch_ops
from sagellm.backends.attention_metadata import AttentionMetadata, PrefillChunk
from sagellm.backends.base import Availability
from sagellm.backends.cpu_linear import CpuLinearWeight, linear, pack_block_weight, pack_linear_weight
from sagellm.backends.decoder_layer import DECODER_LINEARS, DecoderLayer, DecoderShape
from sagellm.backends.kernel_contracts import Attention, KernelTable
from sagellm.backends.layer_caches import PagedKv
from sagellm.backends.layer_specs import AttentionSpec, DeltaNetSpec, MoeSpec
from sagellm.backends.native import (
    DISABLE_ENV,
    InterleavedBlocks,
    NativeKernels,
    fits_decode_attention,
    fits_dense,
    fits_heads,
    fits_prefill_attention,
    fits_rows,
    isa,
    prefill_scratch_size,
)
from sagellm.backends.native.block_layout import Q8_X_KINDS
from sagellm.backends.native.decoder_layers import (
    NativeDecoderLayers,
    attention_threads,
    delta_rule_threads,
    seen_keys,
)
from sagellm.backends.native.experts import NativeExperts
from sagellm.backends.native.lora import add_lora as native_add_lora
from sagellm.backends.native.tensor_fits import fits_delta_rule, fits_strided_heads
from sagellm.backends.quantized import QuantizedWeight
from sagellm.backends.registry import register_backend
from sagellm.backends.torch_ops.linear_attention import gated_delta_net, gated_rmsnorm, seed_decode_states
from sagellm.backends.torch_ops.lora import add_lora as torch_add_lora

I64 = torch.int64
# Rows up to which the native RMSNorm / RoPE / SiLU run on the calling thread; more rows (prefill) are shared
# among torch's threads.
NATIVE_SERIAL_ROWS = 64
# Rows up to which the native linear, streaming the dense weight on one thread, beats oneDNN's blocked one.
NATIVE_LINEAR_ROWS = 2
# Rows up to which a decode step runs its layers in one native call (decoder_layers), as far as the native linear on
# a GGUF weight's interleaved blocks beat oneDNN on an fp32 copy when measured against it. SmolLM2's
# layer linears, cold (`sagellm bench kernels`), AVX-512 kernels on a 2-core AMD EPYC whose oneDNN runs AVX-512 too:
# 16 rows 11.1 vs 16.4 ms, 48: 29.1 vs 36.0, 64: 44.5 vs 40.5 in one run and 37.0 vs 39.9 in another; AVX2 kernels on
# a machine without AVX-512: 16 rows 20.5 vs 26.7 ms, 48: 57.4 vs 61.1, 64: 76.6 vs 73.4.
NATIVE_BLOCK_ROWS = 48
# Rows from which a linear on blocks dequantizes tiles of the weight (4 MB, L2-sized) for torch's GEMM (MKL's sgemm)
# instead of multiplying in registers, by thread count; None: never. On Intel's CPUs with AVX-512 block_linear's cost
# grows with the rows where the GEMM's amortizes, and they cross near 256 rows on 2 threads, 128 on one (Sapphire
# Rapids, 2048x2048 Q4/Q6_K/Q8_0: at 512 rows 15.1 vs 21.7 ms, the dense fp32 GEMM 13.9; at 64 rows 3.1 vs 2.5). On
# AMD's with AVX-512 they never cross: a 2-core AMD EPYC (AVX-512 VNNI kernels), Q4_1 576x576 to 2048x8192, native
# over GEMM time at 256 / 1024 rows 0.76-0.96 / 0.95-1.05 on one thread, 0.47-0.58 / 0.50-0.60 on two; SmolLM2's
# 256-token prefill 308 vs 606 ms on one thread, 168 vs 316 on two (MKL's sgemm there runs K = 576 at 104 GFLOP/s,
# 1536 at 183); the int16 kernels (block_int16.c) have widened the gap since.
GEMM_ROWS_MEASURED = (128, 192)  # (rows on one thread, on more)
# The variants that read the 8-wide layouts (AVX2, portable) multiply from 9 rows on in block_panel.c's panels (each
# weight dequantized once, then an FMA-bound 6x16 tile), which keep up with the GEMM to ~384 rows: a 2-core AVX2 EPYC
# (Zen 3), SmolLM2's Q4_1 960x576 to 3072x576 and Q4_K 2048x2048 to 2048x8192, panel vs GEMM GFLOP/s (medians) at 256
# rows 77-139 vs 73-125, at 512 77-141 vs 76-150, at 1024 78-135 vs 75-151; one thread at 128-512 rows 53-77 vs
# 52-81. The portable variant, unmeasured, follows AVX2.
PANEL_GEMM_ROWS = (384, 384)


def block_gemm_rows(vendor: str, isa: str) -> tuple[int | None, int | None]:
    """(rows on one thread, on more) from which block linears take the dequantized tiles' GEMM on a CPU of `vendor`
    (/proc/cpuinfo's vendor_id) running the kernel variant `isa`: never on AMD's with AVX-512."""
    if not isa.startswith("avx512"):
        return PANEL_GEMM_ROWS
    return (None, None) if vendor == "AuthenticAMD" else GEMM_ROWS_MEASURED


class NativeDispatch:
    """The kernel-table ops that run a native kernel or the torch op, chosen per call by shape and layout."""

    def __init__(self, native: NativeKernels) -> None:
        self.native = native
        self._gemm_rows = block_gemm_rows(isa.cpu_vendor(), native.isa)
        self.buffers = torch_ops.GatherBuffers()  # for the torch decode attention, and prefill chunks' gathers
        self._prefill_scratch = torch.empty(0)  # the native prefill attention's transposed keys, reused
        self._experts: dict[int, tuple[Any, NativeExperts | None]] = {}  # id(gate_up list) -> (it, its experts)
        # The torch attention with each part native where it fits: the K/V write, the decode tokens' attention and
        # each prefill chunk's. Whether decode attention is native depends only on the model and the cache (dtype,
        # head size, layouts), not on the step, so a model's decodes all go one way: the torch path's kept K/V
        # (GatherBuffers) is never left missing the tokens of steps that ran natively.
        self.attention: Attention = functools.partial(
            torch_ops.attention,
            decode=self.paged_decode_attention,
            buffers=self.buffers,
            write=self.write_kv,
            prefill=self.prefill_attention,
        )

    def kernels(self, torch_kernels: KernelTable) -> KernelTable:
        """`torch_kernels` with the ops that pick a native kernel or the torch one per call in their place."""
        return {
            **torch_kernels,
            "linear": self.linear,
            "rmsnorm": self.rmsnorm,
            "add_rmsnorm": self.add_rmsnorm,
            "head_rmsnorm": self.head_rmsnorm,
            "rope": self.rope,
            "silu_mul": self.silu_mul,
            "sigmoid": self.sigmoid,
            "attention": self.attention,
            "paged_decode_attention": self.paged_decode_attention,
            "decoder_layers": self.decoder_layers,
            "gated_delta_net": self.gated_delta_net,
            "gated_rmsnorm": self.gated_rmsnorm,
            "moe": self.moe,
            "add_lora": self.add_lora,
        }

    def decoder_layers(self, layers: list[DecoderLayer], shape: DecoderShape) -> NativeDecoderLayers | None:
        """The layers in one native call for decode-only steps of up to NATIVE_BLOCK_ROWS rows, the steps whose
        linears all read GGUF blocks one op at a time too; None unless every linear has its blocks or its parts'
        (`build` checks)."""
        blocks = [
            replace(layer, **{name: _blocks_of(getattr(layer, name)) for name in DECODER_LINEARS}) for layer in layers
        ]
        return NativeDecoderLayers.build(self.native, blocks, shape, NATIVE_BLOCK_ROWS)

    def linear(self, x: torch.Tensor, weight: CpuLinearWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
        if weight.parts:
            out = torch.cat([self._block_linear(x, blocks, None) for blocks in weight.parts], dim=1)  # [T, N]
            return out if bias is None else out.add_(bias)
        if weight.blocks is not None:
            return self._block_linear(x, weight.blocks, bias)
        fits = fits_rows(x) and (bias is None or fits_dense(bias))
        if weight.dense is not None and x.shape[0] <= NATIVE_LINEAR_ROWS and fits:
            return self.native.linear(x, weight.dense, bias)
        return linear(x, weight, bias)

    def _block_linear(self, x: torch.Tensor, blocks: InterleavedBlocks, bias: torch.Tensor | None) -> torch.Tensor:
        """Every row count from the blocks, the weight's one form: the native kernels (registers, AVX2's panels,
        AVX-512's int16), or from the CPU's block_gemm_rows on, tiles dequantized for torch's GEMM (long prefill
        chunks on all but AMD's AVX-512 CPUs); a weight whose linear rounds x (x_type q8) takes its kernel at every
        row count."""
        x = x if fits_rows(x) else x.float().contiguous()
        bias = None if bias is None else bias.float().contiguous()
        threads = torch.get_num_threads()
        gemm_rows = self._gemm_rows[0 if threads == 1 else 1]
        if gemm_rows is not None and x.shape[0] >= gemm_rows and blocks.x_type == "f32":
            return self.native.block_linear_large(x, blocks, bias, threads)
        return self.native.block_linear(x, blocks, bias, threads)

    def add_lora(
        self, out: torch.Tensor, x: torch.Tensor, row_slots: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor
    ) -> torch.Tensor:
        """Each row's adapter update in one native call (each row reading only its own slot's weights), else the
        torch op (bf16 rows)."""
        added = native_add_lora(self.native, out, x, row_slots, lora_a, lora_b, torch.get_num_threads())
        return added if added is not None else torch_add_lora(out, x, row_slots, lora_a, lora_b)

    def moe(self, x: torch.Tensor, spec: MoeSpec, **options: Any) -> torch.Tensor:
        """The experts' MLP in one native call (moe.c) for decode's few rows when every expert is GGUF blocks and
        the router picks them alone (not Gemma 4's scaled experts routed from their own input); else the torch op."""
        routed_alone = options.get("routing") is None and spec.expert_scale is None
        few_rows = x.shape[0] <= NATIVE_BLOCK_ROWS
        experts = self._native_experts(spec.gate_up, spec.down) if routed_alone and few_rows else None
        if experts is not None:
            out = experts(x, spec)
            if out is not None:
                return out
        return torch_ops.moe(x, spec, **options)

    def _native_experts(self, gate_up: Any, down: Any) -> NativeExperts | None:
        """The native experts of a layer's expert lists, built on first use (None: floats, or blocks moe.c lacks)."""
        if isinstance(gate_up, torch.Tensor) or isinstance(down, torch.Tensor):
            return None
        key = id(gate_up)
        if key not in self._experts:  # the lists live as long as the plan that binds them; kept here besides
            parts = [[_block_parts(w) for w in weights] for weights in (gate_up, down)]
            self._experts[key] = (gate_up, NativeExperts.build(self.native, *parts))
        return self._experts[key][1]

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

    def head_rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if fits_strided_heads(x) and fits_dense(weight):
            return self.native.head_rmsnorm(x, weight, eps, _row_threads(x))
        return torch_ops.head_rmsnorm(x, weight, eps)

    def gated_rmsnorm(self, x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if fits_rows(x, z) and fits_dense(weight):
            return self.native.gated_rmsnorm(x, z, weight, eps, _row_threads(x))
        return gated_rmsnorm(x, z, weight, eps)

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

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        if fits_rows(x):
            return self.native.sigmoid(x, _row_threads(x))
        return torch.sigmoid(x)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, cache: PagedKv, slot_mapping: torch.Tensor) -> None:
        """The native K/V write where it fits (torch's index_copy_ takes ~1.5 ms a layer for 500 tokens)."""
        if fits_heads(k, v) and fits_dense(*cache) and fits_dense(slot_mapping, dtype=I64):
            self.native.write_kv(k, v, cache, slot_mapping)
        else:
            torch_ops.write_kv(k, v, cache, slot_mapping)

    def prefill_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: PagedKv,
        chunk: PrefillChunk,
        spec: AttentionSpec,
        *,
        buffers: torch_ops.GatherBuffers | None = None,
    ) -> torch.Tensor:
        """A prefill chunk's causal attention (sliding-window, soft-capped) read from the paged cache in place (its
        K/V are written first), or the torch op for what the C code does not take: other layouts, and picture runs
        that attend both ways (the C kernel's mask is causal only)."""
        if not chunk.bidirectional and fits_prefill_attention(q, cache, chunk.block_table):
            n, ctx = chunk.query_len, chunk.context_len
            threads = attention_threads(n * seen_keys(ctx, spec.window))
            size = prefill_scratch_size(ctx, cache.k.shape[2], q.shape[2], n, spec.window)
            if self._prefill_scratch.numel() < size:  # grown, never shrunk: fresh memory costs page faults per call
                self._prefill_scratch = torch.empty(size, dtype=torch.float32)
            table, scratch = chunk.block_table, self._prefill_scratch
            return self.native.paged_prefill_attention(q, cache, table, ctx, spec, threads, scratch)
        return torch_ops.prefill_attention(q, k, v, cache, chunk, spec, buffers=buffers)

    def paged_decode_attention(
        self,
        q: torch.Tensor,
        cache: PagedKv,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        spec: AttentionSpec,
    ) -> torch.Tensor:
        if fits_decode_attention(q, cache, block_tables, context_lens):
            # An upper bound: tables span the contexts. NativeDecoderLayers counts the same, for the same threads.
            keys = q.shape[0] * seen_keys(block_tables.shape[1] * cache.k.shape[1], spec.window)
            threads = attention_threads(keys)
            return self.native.paged_decode_attention(q, cache, block_tables, context_lens, spec, threads)
        return torch_ops.paged_decode_attention(q, cache, block_tables, context_lens, spec, buffers=self.buffers)

    def gated_delta_net(
        self, mixed_qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor, meta: AttentionMetadata, spec: DeltaNetSpec
    ) -> torch.Tensor:
        """Natively (delta_rule.c), each head's state updated in place in its slot: the decode rows in one call,
        each prefill chunk token by token, in two calls around a checkpoint. Token by token beats the torch op's
        chunked form at every length measured: Qwen3.5-0.8B's linear layer on a 2-core AMD EPYC (AVX2 kernels),
        one thread / two, a 64-token chunk 3 / 1.9 ms against 18-21 / 7, 512 tokens 25-33 / 17-22 against 104 /
        82-102; a decode row (its states from memory) 0.16 / 0.11 ms against 0.8-1.8 / 0.7, 8 rows 1.0 / 0.6-0.8
        against 14-18 / 7-12."""
        if not fits_delta_rule(mixed_qkv, b, a, spec):
            return gated_delta_net(mixed_qkv, b, a, meta, spec)
        states = spec.states

        def run(start: int, end: int, starts: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
            """Rows start .. end - 1, sequences as in NativeKernels.gated_delta_net."""
            threads = delta_rule_threads((end - start) * states.ssm[0].numel())
            rows = slice(start, end)
            return self.native.gated_delta_net(mixed_qkv[rows], b[rows], a[rows], starts, slots, spec, threads)

        nd = meta.num_decode_tokens
        if nd:
            seed_decode_states(meta, states)
        decoded = run(0, nd, torch.arange(nd + 1), meta.decode_state_slots) if nd else None
        if not meta.prefills:
            return decoded
        out = torch.empty(mixed_qkv.shape[0], b.shape[1] * spec.head_v_dim)  # [T, Hv * Dv]
        if decoded is not None:
            out[:nd] = decoded
        for chunk in meta.prefills:
            slot, n, first = chunk.state_slot, chunk.query_len, chunk.query_start
            states.copy_slot(chunk.source_slot, slot)  # the chunk's starting states
            cut = n if chunk.checkpoint is None else chunk.checkpoint[0]
            for start, end in ((0, cut), (cut, n)):
                if end > start:
                    starts, slots = torch.tensor([0, end - start]), torch.tensor([slot])
                    out[first + start : first + end] = run(first + start, first + end, starts, slots)
                if chunk.checkpoint is not None and start == 0:  # the states after `cut` tokens, kept
                    states.copy_slot(slot, chunk.checkpoint[1])
        return out


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

    def prepare_linear_weight(self, weight: torch.Tensor) -> CpuLinearWeight:
        return pack_linear_weight(weight, NativeKernels.load())

    def int8_activations_problem(self, kinds: set[str]) -> str | None:
        if NativeKernels.load() is None:
            return f"int8 activations need the native kernels, which are off or not built ({DISABLE_ENV})"
        if not kinds & set(Q8_X_KINDS):
            held = ", ".join(sorted(kinds)) or "none: the weights are floats"
            return f"only linears on {', '.join(Q8_X_KINDS)} blocks round x to int8; this model's blocks: {held}"
        return None

    def prepare_block_weight(
        self, parts: list[QuantizedWeight], int8_activations: bool = False
    ) -> CpuLinearWeight | None:
        native = NativeKernels.load()
        return None if native is None else pack_block_weight(parts, native, int8_activations)

    def kernels(self) -> KernelTable:
        """The torch ops with the CPU `linear`, and native kernels where a C compiler built them."""
        table: KernelTable = {**super().kernels(), "linear": linear}
        native = NativeKernels.load()
        return table if native is None else NativeDispatch(native).kernels(table)


def _blocks_of(weight: CpuLinearWeight | list[CpuLinearWeight]) -> Any:
    """A fused layer's linear as block parts: one weight's, or each of a mixture's experts' (a list)."""
    return [_block_parts(w) for w in weight] if isinstance(weight, list) else _block_parts(weight)


def _block_parts(weight: CpuLinearWeight) -> tuple[InterleavedBlocks, ...]:
    """A linear's blocks as the parts the fused layers read: its parts, its one blocks, or none (floats)."""
    return weight.parts or (() if weight.blocks is None else (weight.blocks,))
