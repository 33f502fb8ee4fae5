"""A run of decoder layers as one native call (decoder_layers.c) for decode-only steps of a few rows.

Built once per model from the layers' bound weights: their pointers go into a ctypes array of `decoder_layer`
structs, so a step passes only its own tensors. The C code runs the same kernels in the same order and on the same
threads as the op-by-op path, so the two give bit-identical results; only the ~10 Python calls a layer makes are
gone (SmolLM2, one stream: ~1.5 ms of a ~6 ms step)."""

from __future__ import annotations

import ctypes

import torch

from sagellm.backends.attention_metadata import AttentionMetadata
from sagellm.backends.base import DecoderLayer, DecoderShape
from sagellm.backends.native.block_layout import InterleavedBlocks
from sagellm.backends.native.ops import MAX_HEAD_DIM, NativeKernels, fits_dense

# decoder_layers.c BLOCK_LINEARS, in its order
LAYOUTS = (
    *("q4x8", "q8x8", "q4x16", "q8x16", "q5kx8", "q5kx16", "q6kx8", "q6kx16", "q4kx8", "q4kx16"),
    *("mxfp4x8", "mxfp4x16"),
)
F32, I32, I64 = torch.float32, torch.int32, torch.int64
# Cached keys (rows x context) from which native attention shares its tasks among torch's threads (with fewer
# sequences than threads, shares of each sequence's keys); below it one thread finishes before a second would help.
# OpenMP's workers spin between regions (common/openmp.py), so at decode the second one is usually awake: one stream
# of ~300 tokens, 30 layers: 1.05 ms a token with its keys shared from 256, 1.29 ms with them not shared.
NATIVE_PARALLEL_KEYS = 256


MAX_PARTS = 3  # decoder_layers.c's: a fused linear's parts of different kinds (q, k, v)


class _Weight(ctypes.Structure):
    """decoder_layers.c's `block_weight`: a linear's blocks, or its parts side by side."""

    _fields_ = [
        ("data", ctypes.c_void_p * MAX_PARTS),
        ("layout", ctypes.c_int64 * MAX_PARTS),
        ("outputs", ctypes.c_int64 * MAX_PARTS),
        ("parts", ctypes.c_int64),
    ]


class _Layer(ctypes.Structure):
    """decoder_layers.c's `decoder_layer`."""

    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        *((name, _Weight) for name in ("qkv", "o_proj", "gate_up", "down")),
        *((name, ctypes.c_void_p) for name in ("qkv_bias", "o_bias", "gate_up_bias", "down_bias")),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
    ]


class NativeDecoderLayers:
    """`(hidden, residual, positions, meta) -> (hidden, residual) | None` over the layers given to `build`, whose
    linears are tuples of InterleavedBlocks: one, or a fused linear's parts of different kinds."""

    def __init__(self, native: NativeKernels, layers: list[DecoderLayer], shape: DecoderShape, max_rows: int) -> None:
        self._lib = native.library
        self._shape = shape
        self._max_rows = max_rows
        self._keep = layers  # the tensors whose addresses the structs hold
        self._structs = (_Layer * len(layers))(*(_struct(layer) for layer in layers))
        self._block_size = layers[0].k_cache.shape[1]
        self._workspace = torch.empty(0, dtype=F32)  # grown to the most rows seen, never shrunk (no page faults)

    @classmethod
    def build(
        cls, native: NativeKernels, layers: list[DecoderLayer], shape: DecoderShape, max_rows: int
    ) -> NativeDecoderLayers | None:
        """The fused kernel when every weight is interleaved blocks of the expected shape, biases and norms dense
        fp32 and the caches what the decode attention reads; else None."""
        s = shape
        h, q_size, kv_size = s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        linears = (("qkv", q_size + 2 * kv_size, h), ("o_proj", h, q_size))
        linears += (("gate_up", 2 * s.intermediate_size, h), ("down", h, s.intermediate_size))
        cache = layers[0].k_cache.shape
        if s.head_dim % 8 or s.head_dim > MAX_HEAD_DIM or not fits_dense(s.cos_sin):
            return None
        for layer in layers:
            for name, n, k in linears:
                blocks = getattr(layer, name)
                bias = getattr(layer, name.removesuffix("_proj") + "_bias")
                if not _fits_blocks(blocks, n, k) or not (bias is None or (fits_dense(bias) and bias.shape == (n,))):
                    return None
            norms_fit = all(w.shape == (h,) and fits_dense(w) for w in (layer.input_norm, layer.post_norm))
            caches = layer.k_cache, layer.v_cache
            caches_fit = all(c.shape == cache for c in caches) and fits_dense(*caches)
            if not (norms_fit and caches_fit and cache[2:] == (s.num_kv_heads, s.head_dim)):
                return None
        return cls(native, layers, shape, max_rows)

    def __call__(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        rows = hidden.shape[0]
        tables, lens = meta.decode_block_tables, meta.decode_context_lens
        if (
            rows > self._max_rows
            or meta.num_decode_tokens != rows  # prefill chunks in the step
            or not fits_dense(hidden, *(() if residual is None else (residual,)))
            or not (fits_dense(positions, meta.slot_mapping, dtype=I64) and fits_dense(tables, lens, dtype=I32))
        ):
            return None
        s = self._shape
        size = self._lib.decoder_layers_workspace(
            rows, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size
        )
        if self._workspace.numel() < size:
            self._workspace = torch.empty(size, dtype=F32)
        hidden_out = torch.empty((rows, s.hidden_size), dtype=F32)  # [T, H]
        residual_out = torch.empty((rows, s.hidden_size), dtype=F32)  # [T, H]
        keys = rows * seen_keys(tables.shape[1] * self._block_size, s.window)  # as NativeDispatch counts them
        self._lib.decoder_layers_f32(
            self._structs,
            len(self._structs),
            hidden.data_ptr(),
            None if residual is None else residual.data_ptr(),
            hidden_out.data_ptr(),
            residual_out.data_ptr(),
            positions.data_ptr(),
            meta.slot_mapping.data_ptr(),
            tables.data_ptr(),
            tables.shape[1],
            lens.data_ptr(),
            s.cos_sin.data_ptr(),
            rows,
            s.hidden_size,
            s.num_heads,
            s.num_kv_heads,
            s.head_dim,
            s.intermediate_size,
            self._block_size,
            s.eps,
            s.scale,
            s.window,
            s.softcap,
            self._workspace.data_ptr(),
            torch.get_num_threads(),
            attention_threads(keys),
        )
        return hidden_out, residual_out


def attention_threads(keys: int) -> int:
    """Threads for native attention over `keys` query-key pairs (decode: rows x table width in tokens, an upper
    bound; prefill: a chunk's queries x its context)."""
    return torch.get_num_threads() if keys >= NATIVE_PARALLEL_KEYS else 1


def seen_keys(context: int, window: int) -> int:
    """The keys a query reads of `context` cached ones: the last `window` under a sliding window (window > 0)."""
    return min(context, window) if window > 0 else context


def _fits_blocks(parts: tuple[InterleavedBlocks, ...], n: int, k: int) -> bool:
    return (
        0 < len(parts) <= MAX_PARTS
        and all(p.layout in LAYOUTS and p.in_features == k for p in parts)
        and sum(p.out_features for p in parts) == n
    )


def _weight(parts: tuple[InterleavedBlocks, ...]) -> _Weight:
    def each(values: list[int]) -> list[int]:
        return values + [0] * (MAX_PARTS - len(values))

    return _Weight(
        (ctypes.c_void_p * MAX_PARTS)(*each([p.data.data_ptr() for p in parts])),
        (ctypes.c_int64 * MAX_PARTS)(*each([LAYOUTS.index(p.layout) for p in parts])),
        (ctypes.c_int64 * MAX_PARTS)(*each([p.out_features for p in parts])),
        len(parts),
    )


def _struct(layer: DecoderLayer) -> _Layer:
    def address(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    return _Layer(
        address(layer.input_norm),
        address(layer.post_norm),
        *(_weight(getattr(layer, name)) for name in ("qkv", "o_proj", "gate_up", "down")),
        *(address(b) for b in (layer.qkv_bias, layer.o_bias, layer.gate_up_bias, layer.down_bias)),
        address(layer.k_cache),
        address(layer.v_cache),
    )
