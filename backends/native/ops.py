"""The native kernels as kernel-table ops on torch tensors: allocate the output, pass pointers and strides, return
what the torch op of the same name returns (its contract: backends/kernel_contracts.py).

The C code trusts its arguments, so the `fits_*` predicates (tensor_fits.py) say whether tensors have the dtype and
layout it reads; the CPU backend's dispatch asks them before calling and runs the torch op otherwise. The wrappers
also check that the shapes agree (raising NativeShapeError, where C would read out of bounds); what they do not
check is stated per op. Outputs are fresh tensors, never views of an input, like the torch ops'."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from sagellm.backends.layer_caches import PagedKv
from sagellm.backends.layer_specs import AttentionSpec, DeltaNetSpec
from sagellm.backends.native.block_layout import InterleavedBlocks
from sagellm.backends.native.build import native_library
from sagellm.backends.native.isa import Variant
from sagellm.backends.native.tensor_fits import F32, fits_strided_heads, prefill_scratch_size, slots_inside
from sagellm.common.errors import InternalError

# Most bytes of the fp32 weight tile `block_linear_large` dequantizes at a time, a trade measured on two AVX-512
# cores (2 MB of L2 each): each tile is one GEMM call, which packs all of x again (2048 x 2048 at T = 512: tiles of
# 1 MB take 1.3x the dense GEMM's time, 2 MB 1.2x, 4 MB 1.1x), while tiles past the L2 dequantize slower (Q6_K at 1,
# 4, 8 MB: 13.5, 8, 6.5 Gweights/s; at T = 128 8 MB tiles take 1.2x the time of 4 MB ones).
DEQUANTIZED_TILE_BYTES = 4 << 20


class NativeShapeError(InternalError, ValueError):
    """Tensors passed to a native kernel whose shapes do not fit together (the caller's bug)."""


class NativeKernels:
    """The ops of the loaded library; `load()` is None where it cannot be built (see build.py)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._lib = library

    @classmethod
    def load(cls, variant: Variant | None = None) -> NativeKernels | None:
        """The kernels built for `variant` (default: the instruction set this CPU runs best)."""
        library = native_library(variant)
        return None if library is None else cls(library)

    @property
    def library(self) -> ctypes.CDLL:
        """The loaded library, for callers that pass it more than tensors (decoder_layers.py's structs)."""
        return self._lib

    @property
    def isa(self) -> str:
        """The instruction-set variant the loaded library was built for (avx512vnni, avx512, avx2, portable)."""
        return self._lib.isa

    def amx_tiles(self, enabled: bool | None = None) -> bool:
        """Whether the q8 linears (`--int8-activations`) run their rows in 16s on AMX's tile multiplies: a CPU with
        AMX-INT8 whose kernel grants the tile state. `enabled` turns that off or back on for this process (to
        compare both paths); the floats are the same either way."""
        return bool(self._lib.q8_amx(-1 if enabled is None else int(enabled)))

    @property
    def block_group(self) -> int:
        """Outputs per group of the interleaved layouts this library reads fastest: one vector register of floats
        (16 with AVX-512, else 8). Every library reads both."""
        return 16 if self.isa.startswith("avx512") else 8

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, num_threads: int = 1) -> torch.Tensor:
        rows, hidden = x.shape
        _expect(weight.shape == (hidden,), "rmsnorm weight", weight, x)
        normed = torch.empty((rows, hidden), dtype=F32)  # [T, H]
        self._lib.rmsnorm_f32(
            x.data_ptr(), x.stride(0), None, 0, _f32(weight), normed.data_ptr(), None, rows, hidden, eps, num_threads
        )
        return normed

    def head_rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, num_threads: int = 1) -> torch.Tensor:
        """RMSNorm over each head of x [T, H, D] (the weight [D] shared; fits_strided_heads). Returns [T, H, D]."""
        tokens, heads, d = x.shape
        _expect(weight.shape == (d,), "head_rmsnorm weight", weight, x)
        _expect(fits_strided_heads(x), "head_rmsnorm x", x, x)
        normed = torch.empty((tokens, heads, d), dtype=F32)
        self._lib.head_rmsnorm_f32(
            x.data_ptr(), x.stride(0), x.stride(1), _f32(weight), normed.data_ptr(), tokens, heads, d, eps, num_threads
        )
        return normed

    def gated_rmsnorm(
        self, x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, num_threads: int = 1
    ) -> torch.Tensor:
        """rmsnorm(x) * silu(z) per head of weight's size D, x and z [T, H * D] with unit-stride rows."""
        tokens, width = x.shape
        d = weight.shape[0]
        _expect(z.shape == x.shape and width % d == 0, "gated_rmsnorm z and weight", z, x)
        out = torch.empty((tokens, width), dtype=F32)
        self._lib.gated_rmsnorm_f32(
            x.data_ptr(), x.stride(0), z.data_ptr(), z.stride(0), _f32(weight), out.data_ptr(), tokens, width // d, d,
            eps, num_threads,
        )  # fmt: skip
        return out

    def add_rmsnorm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, num_threads: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, hidden = x.shape
        _expect(residual.shape == x.shape, "add_rmsnorm residual", residual, x)
        _expect(weight.shape == (hidden,), "add_rmsnorm weight", weight, x)
        normed = torch.empty((rows, hidden), dtype=F32)  # [T, H]
        summed = torch.empty((rows, hidden), dtype=F32)  # [T, H] = x + residual
        self._lib.rmsnorm_f32(
            x.data_ptr(),
            x.stride(0),
            residual.data_ptr(),
            residual.stride(0),
            _f32(weight),
            normed.data_ptr(),
            summed.data_ptr(),
            rows,
            hidden,
            eps,
            num_threads,
        )
        return normed, summed

    def rope(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, num_threads: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hk, D] rotated into one [T, Hq + Hk, D] tensor, returned as its q and k views; a
        table narrower than the head ([max_pos, R], partial rotary) turns each head's first R dims. Positions are
        not checked against the table's length (the runner's are below max_model_len, its size)."""
        tokens, hq, d = q.shape
        hk = k.shape[1]
        _expect(k.shape == (tokens, hk, d) and positions.shape == (tokens,), "rope k and positions", k, q)
        rot = cos_sin.shape[-1]
        _expect(cos_sin.dim() == 2 and rot <= d and rot % 2 == 0, "rope cos_sin table", cos_sin, q)
        out = torch.empty((tokens, hq + hk, d), dtype=F32)  # [T, Hq + Hk, D]
        self._lib.rope_f32(
            q.data_ptr(),
            q.stride(0),
            k.data_ptr(),
            k.stride(0),
            _contiguous(positions, torch.int64),
            _f32(cos_sin),
            out.data_ptr(),
            tokens,
            hq,
            hk,
            d,
            rot,
            num_threads,
        )
        return out[:, :hq], out[:, hq:]  # [T, Hq, D], [T, Hk, D]

    def silu_mul(self, x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        rows, inter = x.shape[0], x.shape[1] // 2
        _expect(x.shape[1] % 2 == 0, "silu_mul input (gate and up halves)", x, x)
        out = torch.empty((rows, inter), dtype=F32)  # [T, I]
        self._lib.silu_mul_f32(x.data_ptr(), x.stride(0), out.data_ptr(), rows, inter, num_threads)
        return out

    def sigmoid(self, x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        rows, n = x.shape
        out = torch.empty((rows, n), dtype=F32)  # [T, N]
        self._lib.sigmoid_f32(x.data_ptr(), x.stride(0), out.data_ptr(), rows, n, num_threads)
        return out

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, K] @ weight [N, K]^T (+ bias [N]) -> [T, N]; weight and bias contiguous fp32."""
        n, k = weight.shape[0], x.shape[1]
        _expect(weight.shape == (n, k) and (bias is None or bias.shape == (n,)), "linear weight and bias", weight, x)
        return _linear_rows(self._lib.linear_f32, x, _f32(weight), bias, n)

    def block_linear(
        self, x: torch.Tensor, weight: InterleavedBlocks, bias: torch.Tensor | None, num_threads: int = 1
    ) -> torch.Tensor:
        """x [T, K] @ the dequantized weight^T (+ bias [N]) -> [T, N], reading the interleaved blocks (x rounded to
        int8 per 32 inputs first where the weight's x_type is q8)."""
        n = _block_outputs(x, weight, bias)
        scratch = torch.empty(x.numel(), dtype=F32)  # x's rows repacked k-major (or rounded) by the kernel
        kernel = getattr(self._lib, f"linear_{weight.layout}_{weight.x_type}")
        return _linear_rows(kernel, x, weight.data.data_ptr(), bias, n, scratch.data_ptr(), num_threads)

    def block_linear_large(
        self, x: torch.Tensor, weight: InterleavedBlocks, bias: torch.Tensor | None, num_threads: int = 1
    ) -> torch.Tensor:
        """`block_linear` for prefill-sized calls of an x_type f32 weight, without an fp32 copy of it: a tile of
        output groups at a time is dequantized k-major (the floats `block_linear` multiplies by, by `num_threads`
        threads) and torch's GEMM multiplies x by it straight into the output's columns, adding the bias; so the sums
        are torch's. The tile is allocated per call: reusing one measured no faster."""
        tokens, k = x.shape
        n = _block_outputs(x, weight, bias)
        groups = weight.data.shape[0]
        width = n // groups  # outputs per group
        tiles = -(-groups // max(1, DEQUANTIZED_TILE_BYTES // (4 * k * width)))
        tile_groups = -(-groups // tiles)  # as even as whole groups allow: no small last GEMM
        scratch = torch.empty(k * tile_groups * width, dtype=F32)  # the tile, [K, outputs] of its groups
        out = torch.empty((tokens, n), dtype=F32)  # [T, N]
        kernel = getattr(self._lib, f"dequantize_{weight.layout}_f32")
        data = _contiguous(weight.data, torch.uint8)
        for first in range(0, groups, tile_groups):
            count = min(tile_groups, groups - first)
            kernel(data, k, first, count, scratch.data_ptr(), num_threads)
            tile = scratch[: k * count * width].view(k, count * width)  # [K, the tile's outputs]
            columns = slice(first * width, (first + count) * width)
            if bias is None:
                torch.mm(x, tile, out=out[:, columns])
            else:
                torch.addmm(bias[columns], x, tile, out=out[:, columns])
        return out

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, cache: PagedKv, slots: torch.Tensor) -> None:
        """Stores k, v [T, Hk, D] at their flat slots of the cache (k and v [num_blocks, block_size, Hk, D]); the
        slots are not checked against the cache's size (the runner's come from the block manager)."""
        tokens, hk, d = k.shape
        k_cache, v_cache = cache
        _expect(v.shape == k.shape and slots.shape == (tokens,), "write_kv v and slots", v, k)
        _expect(k_cache.shape == v_cache.shape and k_cache.shape[2:] == (hk, d), "write_kv caches", k_cache, k)
        self._lib.write_kv_f32(
            k.data_ptr(),
            k.stride(0),
            v.data_ptr(),
            v.stride(0),
            _contiguous(slots, torch.int64),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            tokens,
            hk,
            d,
        )

    def paged_decode_attention(
        self,
        q: torch.Tensor,
        cache: PagedKv,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        spec: AttentionSpec,
        num_threads: int = 1,
    ) -> torch.Tensor:
        """q [B, Hq, D] against each row's context_lens[b] cached tokens (the last spec.window of them when
        window > 0), scores soft-capped when spec.softcap > 0, each head's sink logit (fp32 [Hq]) in its denominator;
        [B, Hq, D]. Block tables must only name blocks of the caches and context_lens be at most the table's width in
        tokens, as the runner's are."""
        batch = q.shape[0]
        layer = _attention_layer(q, cache, spec)
        _expect(block_tables.shape[0] == batch and context_lens.shape == (batch,), "tables", block_tables, q)
        out = torch.empty(q.shape, dtype=F32)  # [B, Hq, D]
        self._lib.paged_decode_attention_f32(
            q.data_ptr(),
            q.stride(0),
            cache.k.data_ptr(),
            cache.v.data_ptr(),
            _contiguous(block_tables, torch.int32),
            block_tables.shape[1],
            _contiguous(context_lens, torch.int32),
            out.data_ptr(),
            batch,
            *layer,
            num_threads,
        )
        return out

    def paged_prefill_attention(
        self,
        q: torch.Tensor,
        cache: PagedKv,
        block_table: torch.Tensor,
        context_len: int,
        spec: AttentionSpec,
        num_threads: int = 1,
        scratch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of a chunk's queries q [n, Hq, D], the sequence's tokens context_len - n ..
        context_len - 1, over its first context_len cached tokens (the chunk's own K/V written first); [n, Hq, D].
        With spec.window > 0 the query at position i sees only keys above i - window; spec.softcap > 0 caps the
        scores; spec.sinks (fp32 [Hq]) join each head's softmax denominator. The block table must name the sequence's
        blocks of the caches, as the runner's do. `scratch`: fp32 memory to reuse for the transposed keys
        (`prefill_scratch_size` floats), else it is allocated."""
        n, _, d = q.shape
        _, block_size, hk, _ = cache.k.shape
        layer = _attention_layer(q, cache, spec)
        _expect(0 < n <= context_len <= block_table.shape[0] * block_size, "block table", block_table, q)
        out = torch.empty(q.shape, dtype=F32)  # [n, Hq, D]
        size = prefill_scratch_size(context_len, hk, d, n, spec.window)
        if scratch is None or scratch.numel() < size or scratch.dtype != F32 or not scratch.is_contiguous():
            scratch = torch.empty(size, dtype=F32)
        self._lib.paged_prefill_attention_f32(
            q.data_ptr(),
            q.stride(0),
            cache.k.data_ptr(),
            cache.v.data_ptr(),
            _contiguous(block_table, torch.int32),
            context_len,
            n,
            out.data_ptr(),
            *layer,
            scratch.data_ptr(),
            num_threads,
        )
        return out

    def gated_delta_net(
        self,
        mixed_qkv: torch.Tensor,
        b: torch.Tensor,
        a: torch.Tensor,
        starts: torch.Tensor,
        slots: torch.Tensor,
        spec: DeltaNetSpec,
        num_threads: int = 1,
    ) -> torch.Tensor:
        """`GatedDeltaNet` (backends/kernel_contracts.py) over N sequences, each continuing from its slot's states: rows
        starts[i] .. starts[i + 1] - 1 of mixed_qkv [T, C], b and a [T, Hv] are sequence i's tokens, in order, and
        slots[i] its slot (starts int64 [N + 1] from 0 to T, slots int64 [N]; a decode step: one token each).
        spec.states (conv [S, C, K-1], ssm [S, Hv, Dk, Dv]) are advanced in place; value head h reads key head
        h // (Hv / Hk), or h % Hk with spec.tiled_value_heads. Returns [T, Hv * Dv]. Slots are checked to be slots (a
        few numbers: a wrong one would write outside the states); starts are not: they must rise from 0 to T, and
        slots be distinct."""
        tokens, channels = mixed_qkv.shape
        hk, dk, hv, dv = spec.num_k_heads, spec.head_k_dim, b.shape[1], spec.head_v_dim
        conv_weight, a_log, dt_bias = spec.conv_weight, spec.a_log, spec.dt_bias
        conv_states, ssm_states = spec.states
        width = conv_weight.shape[1]
        _expect(channels == 2 * hk * dk + hv * dv and hv % hk == 0, "gated_delta_net heads", mixed_qkv, b)
        _expect(b.shape == a.shape == (tokens, hv), "gated_delta_net b and a", a, mixed_qkv)
        _expect(starts.shape == (slots.shape[0] + 1,), "gated_delta_net starts and slots", starts, slots)
        _expect(conv_weight.shape == (channels, width), "gated_delta_net conv_weight", conv_weight, mixed_qkv)
        _expect(conv_states.shape[1:] == (channels, width - 1), "gated_delta_net conv_states", conv_states, mixed_qkv)
        _expect(ssm_states.shape[1:] == (hv, dk, dv), "gated_delta_net ssm_states", ssm_states, b)
        _expect(a_log.shape == dt_bias.shape == (hv,), "gated_delta_net a_log and dt_bias", a_log, b)
        inside = slots_inside(slots, ssm_states.shape[0])
        _expect(inside, "gated_delta_net slots (each within the states)", slots, ssm_states)
        out = torch.empty((tokens, hv * dv), dtype=F32)  # [T, Hv * Dv]
        scratch = torch.empty(tokens * (channels + 2 * hv), dtype=F32)  # each token's convolved q, k, v and gates
        self._lib.gated_delta_net_f32(
            mixed_qkv.data_ptr(),
            mixed_qkv.stride(0),
            a.data_ptr(),
            a.stride(0),
            b.data_ptr(),
            b.stride(0),
            _contiguous(starts, torch.int64),
            _contiguous(slots, torch.int64),
            slots.shape[0],
            _f32(conv_states),
            _f32(ssm_states),
            _f32(conv_weight),
            _f32(a_log),
            _f32(dt_bias),
            out.data_ptr(),
            hk,
            dk,
            hv,
            dv,
            int(spec.tiled_value_heads),
            width,
            scratch.data_ptr(),
            num_threads,
        )
        return out


def _linear_rows(
    kernel: Callable[..., None], x: torch.Tensor, weight: int, bias: torch.Tensor | None, n: int, *rest: int
) -> torch.Tensor:
    """x [T, K] through a linear kernel of the C code's calling convention for them (x's rows and row stride, the
    weight's address, the bias's or NULL, the output's, T, N, K, then the kernel's own arguments `rest`) -> [T, N]."""
    tokens, k = x.shape
    out = torch.empty((tokens, n), dtype=F32)  # [T, N]
    kernel(x.data_ptr(), x.stride(0), weight, None if bias is None else _f32(bias), out.data_ptr(), tokens, n, k, *rest)
    return out


def _block_outputs(x: torch.Tensor, weight: InterleavedBlocks, bias: torch.Tensor | None) -> int:
    """N, the outputs of a linear on `weight`'s blocks, once x [T, K] and bias [N] are checked to fit them."""
    n = weight.out_features
    _expect(x.shape[1] == weight.in_features and (bias is None or bias.shape == (n,)), "block weight and bias", x, x)
    return n


def _expect(fits: bool, what: str, tensor: torch.Tensor, against: torch.Tensor) -> None:
    if not fits:
        raise NativeShapeError(f"{what} of shape {tuple(tensor.shape)} does not fit {tuple(against.shape)}")


def _attention_layer(q: torch.Tensor, cache: PagedKv, spec: AttentionSpec) -> tuple:
    """What the C attention kernels take of a layer, after the tokens' own arguments: its query and kv heads, head
    size, block size and spec (scale, window, softcap, the sinks' address or NULL); the cache checked to fit q."""
    hq, d = q.shape[1:]
    k_cache, v_cache = cache
    _, block_size, hk, _ = k_cache.shape
    _expect(v_cache.shape == k_cache.shape and k_cache.shape[3] == d and hq % hk == 0, "caches", k_cache, q)
    return hq, hk, d, block_size, spec.scale, spec.window, spec.softcap, _sinks(spec.sinks, hq)


def _sinks(sinks: torch.Tensor | None, heads: int) -> int | None:
    """The address of one fp32 sink logit per query head, or None (NULL: no sinks)."""
    if sinks is None:
        return None
    _expect(sinks.shape == (heads,), "sinks", sinks, torch.empty(heads))
    return _f32(sinks)


def _f32(t: torch.Tensor) -> int:
    return _contiguous(t, F32)


def _contiguous(t: torch.Tensor, dtype: torch.dtype) -> int:
    """The address of t's data, which the C code reads as a dense array of `dtype`."""
    if t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"native kernel input must be contiguous {dtype}, got {t.dtype} with strides {t.stride()}")
    return t.data_ptr()
