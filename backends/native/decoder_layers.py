"""A run of decoder layers as one native call (decoder_layers.c) for decode-only steps of a few rows.

Built once per model from the layers' bound weights: their pointers go into a ctypes array of `decoder_layer`
structs, so a step passes only its own tensors. The C code runs the same kernels in the same order and on the same
threads as the op-by-op path, so the two give bit-identical results; only the 10-15 Python calls a layer makes are
gone (SmolLM2, one stream: ~1.5 ms of a ~6 ms step). Attention layers (each with its own sliding window and sinks),
Qwen3.5's gated attention and its Gated DeltaNet layers (`KINDS`) mix in one run, their MLPs dense or a mixture of
experts (moe.c, the op's own kernel)."""

from __future__ import annotations

import ctypes
from dataclasses import astuple

import torch

from sagellm.backends.attention_metadata import AttentionMetadata
from sagellm.backends.decoder_layer import DECODER_LINEARS, AttentionShape, DecoderLayer, DecoderShape, MoeShape
from sagellm.backends.layer_caches import RecurrentStates
from sagellm.backends.native.block_weight import BlockWeight, block_weight, fits_blocks
from sagellm.backends.native.experts import ACTIVATIONS, routing_fits
from sagellm.backends.native.lora import MAX_PARTS, LayerLora, layer_lora, parts_fit
from sagellm.backends.native.ops import NativeKernels
from sagellm.backends.native.tensor_fits import (
    MAX_CONV_WIDTH,
    MAX_DELTA_HEAD_DIM,
    MAX_HEAD_DIM,
    fits_dense,
    slots_inside,
)
from sagellm.backends.torch_ops.linear_attention import seed_decode_states

F32, I32, I64 = torch.float32, torch.int32, torch.int64
# Cached keys (rows x context) from which native attention shares its tasks among torch's threads (with fewer
# sequences than threads, shares of each sequence's keys); below it one thread finishes before a second would help.
# OpenMP's workers spin between regions (common/openmp.py), so at decode the second one is usually awake: one stream
# of ~300 tokens, 30 layers: 1.05 ms a token with its keys shared from 256, 1.29 ms with them not shared.
NATIVE_PARALLEL_KEYS = 256


# Floats of delta-rule state (tokens x Hv x Dk x Dv) from which the native Gated DeltaNet shares its heads among
# torch's threads: a quarter of a Qwen3.5-0.8B token's 1 MB, read twice and written once. One whole decode row, its
# states from memory, on a 2-core AMD EPYC (AVX2 kernels): 0.16 ms on one thread, 0.11 on two.
NATIVE_PARALLEL_STATE = 1 << 16
KINDS = ("attention", "gated_attention", "gated_delta_net")  # decoder_layers.c's, in its order


BIASES = ("qkv_bias", "o_bias", "gate_up_bias", "down_bias")
TENSORS = ("k_cache", "v_cache", "q_norm", "k_norm", "conv_states", "ssm_states", "conv_weight", "a_log", "dt_bias")
TENSORS += ("out_norm",)


class _Layer(ctypes.Structure):
    """decoder_layers.c's `decoder_layer`."""

    _fields_ = [
        ("kind", ctypes.c_int64),
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        *((name, BlockWeight) for name in DECODER_LINEARS),
        *((name, ctypes.c_void_p) for name in (*BIASES, *TENSORS)),
        ("sinks", ctypes.c_void_p),
        ("window", ctypes.c_int64),
        *((name, ctypes.c_void_p) for name in ("router", "router_bias", "experts_gate_up", "experts_down")),
    ]


class _Dims(ctypes.Structure):
    """decoder_layers.c's `decoder_dims`."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("hidden", "inter", "hq", "hk", "d", "rot", "block_size")),
        *((name, ctypes.c_float) for name in ("eps", "scale", "softcap")),
        ("cos_sin", ctypes.c_void_p),
        *((name, ctypes.c_int64) for name in ("lhk", "ldk", "lhv", "ldv", "conv_width", "tiled")),
        *((name, ctypes.c_int64) for name in ("experts", "top_k", "normalize", "first_expert", "held", "activation")),
        *((name, ctypes.c_float) for name in ("alpha", "limit")),
    ]


class NativeDecoderLayers:
    """`(hidden, residual, positions, meta) -> (hidden, residual) | None` over the layers given to `build`, whose
    linears are tuples of InterleavedBlocks: one, or a fused linear's parts of different kinds (a mixture of experts'
    gate_up and down: a list of such tuples, one per held expert)."""

    def __init__(self, native: NativeKernels, layers: list[DecoderLayer], shape: DecoderShape, max_rows: int) -> None:
        self._lib = native.library
        self._shape = shape
        self._max_rows = max_rows
        self._keep: list = [layers]  # the tensors and expert arrays whose addresses the structs hold
        self._structs = (_Layer * len(layers))(*(_struct(layer, self._keep) for layer in layers))
        attending = [layer.window for layer in layers if layer.kind != "gated_delta_net"]
        self._window = 0 if not attending or 0 in attending else max(attending)  # the widest a layer reads
        self._dims = _dims(shape, layers)
        deltas = [layer for layer in layers if layer.kind == "gated_delta_net"]
        self._states = [RecurrentStates(layer.conv_states, layer.ssm_states) for layer in deltas]
        self._state_floats = self._states[0].ssm[0].numel() if self._states else 0  # a slot's delta-rule state
        self._starts = torch.arange(max_rows + 1)  # a decode's rows: one token per sequence
        self._workspace = torch.empty(0, dtype=F32)  # grown to the most rows seen, never shrunk (no page faults)
        self._lora, self._lora_rank = _lora_structs(layers, shape)  # None: steps with adapter rows are declined
        self._shrunk = torch.empty(max_rows * MAX_PARTS * self._lora_rank, dtype=F32)

    @classmethod
    def build(
        cls, native: NativeKernels, layers: list[DecoderLayer], shape: DecoderShape, max_rows: int
    ) -> NativeDecoderLayers | None:
        """The fused kernel when every weight is interleaved blocks of the expected shape, biases and norms dense
        fp32 and the caches and states what the decode kernels read; else None."""
        if shape.attention is not None and not _attention_fits(shape.attention):
            return None
        if not all(_layer_fits(layer, shape) for layer in layers):
            return None
        return cls(native, layers, shape, max_rows)

    def __call__(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor | None,
        meta: AttentionMetadata,
        lora_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        rows = hidden.shape[0]
        s = self._shape
        tables, state_slots = meta.decode_block_tables, meta.decode_state_slots
        lora_fits = lora_rows is None or (
            self._lora is not None and fits_dense(lora_rows, dtype=I64) and lora_rows.shape == (rows,)
        )
        if (
            not lora_fits
            or rows > self._max_rows
            or meta.num_decode_tokens != rows  # prefill chunks in the step
            or not fits_dense(hidden, *(() if residual is None else (residual,)))
            or (s.attention is not None and not _attention_step_fits(positions, meta))
            or (self._states and not self._slots_fit(state_slots))
        ):
            return None
        if self._states and meta.decode_state_seeds:
            for states in self._states:
                seed_decode_states(meta, states)
        size = self._lib.decoder_layers_workspace(ctypes.byref(self._dims), rows)
        if self._workspace.numel() < size:
            self._workspace = torch.empty(size, dtype=F32)
        hidden_out = torch.empty((rows, s.hidden_size), dtype=F32)  # [T, H]
        residual_out = torch.empty((rows, s.hidden_size), dtype=F32)  # [T, H]
        keys = rows * seen_keys(tables.shape[1] * self._dims.block_size, self._window) if s.attention else 0
        self._lib.decoder_layers_f32(
            self._structs,
            len(self._structs),
            ctypes.byref(self._dims),
            hidden.data_ptr(),
            None if residual is None else residual.data_ptr(),
            hidden_out.data_ptr(),
            residual_out.data_ptr(),
            positions.data_ptr() if s.attention else None,
            meta.slot_mapping.data_ptr() if s.attention else None,
            tables.data_ptr() if s.attention else None,
            tables.shape[1] if s.attention else 0,
            meta.decode_context_lens.data_ptr() if s.attention else None,
            self._starts.data_ptr(),
            state_slots.data_ptr() if self._states else None,
            rows,
            *_window_blocks(meta if s.attention else None),
            self._workspace.data_ptr(),
            torch.get_num_threads(),
            attention_threads(keys),
            delta_rule_threads(rows * self._state_floats),
            None if lora_rows is None else self._lora,
            None if lora_rows is None else lora_rows.data_ptr(),
            self._lora_rank,
            self._shrunk.data_ptr(),
        )
        return hidden_out, residual_out

    def _slots_fit(self, slots: torch.Tensor | None) -> bool:
        """int64 state slots, each one of the states' (a wrong one would write outside them: the ops one by one
        then refuse it by name)."""
        fits = slots is not None and fits_dense(slots, dtype=I64)
        return fits and slots_inside(slots, self._states[0][1].shape[0])


def delta_rule_threads(state: int) -> int:
    """Threads for the native Gated DeltaNet over `state` floats of delta-rule state."""
    return torch.get_num_threads() if state >= NATIVE_PARALLEL_STATE else 1


def attention_threads(keys: int) -> int:
    """Threads for native attention over `keys` query-key pairs (decode: rows x table width in tokens, an upper
    bound; prefill: a chunk's queries x its context)."""
    return torch.get_num_threads() if keys >= NATIVE_PARALLEL_KEYS else 1


def seen_keys(context: int, window: int) -> int:
    """The keys a query reads of `context` cached ones: the last `window` under a sliding window (window > 0)."""
    return min(context, window) if window > 0 else context


def _attention_fits(a: AttentionShape) -> bool:
    heads_fit = a.head_dim % 8 == 0 and a.head_dim <= MAX_HEAD_DIM
    return heads_fit and fits_dense(a.cos_sin) and a.cos_sin.dim() == 2 and a.cos_sin.shape[1] <= a.head_dim


def _attention_step_fits(positions: torch.Tensor | None, meta: AttentionMetadata) -> bool:
    """What the attention layers read of a step: its positions, slots, block tables and context lengths (and the
    sliding-window layers' own slots and tables)."""
    tables, lens = meta.decode_block_tables, meta.decode_context_lens
    sliding = meta.sliding
    return (
        positions is not None
        and fits_dense(positions, meta.slot_mapping, dtype=I64)
        and fits_dense(tables, lens, dtype=I32)
        and (sliding is None or fits_dense(sliding.slot_mapping, dtype=I64))
        and (sliding is None or fits_dense(sliding.decode_block_tables, dtype=I32))
    )


def _window_blocks(meta: AttentionMetadata | None) -> tuple[int | None, int | None, int]:
    """The sliding-window layers' own slots, tables and table width (window_blocks.py), or NULLs."""
    sliding = meta.sliding if meta is not None else None
    if sliding is None:
        return None, None, 0
    tables = sliding.decode_block_tables
    return sliding.slot_mapping.data_ptr(), tables.data_ptr(), tables.shape[1]


def _layer_fits(layer: DecoderLayer, shape: DecoderShape) -> bool:
    """Whether `layer`'s weights, norms and caches or states are what decoder_layers.c reads for its kind."""
    h, inter = shape.hidden_size, shape.intermediate_size
    if (layer.router is not None) != (shape.moe is not None):
        return False
    if shape.moe is not None:
        if not _experts_fit(layer, shape.moe, h, inter):
            return False
        mlp: tuple = ()
    else:
        mlp = (("gate_up", 2 * inter, h), ("down", h, inter))
    if layer.kind == "gated_delta_net":
        dn = shape.delta_net
        if dn is None or layer.qkv_bias is not None or layer.o_bias is not None:
            return False
        value = dn.num_v_heads * dn.head_v_dim
        channels = 2 * dn.num_k_heads * dn.head_k_dim + value
        linears = (("qkv", channels + value + 2 * dn.num_v_heads, h), ("o_proj", h, value), *mlp)
        states = layer.conv_states, layer.ssm_states, layer.conv_weight, layer.a_log, layer.dt_bias, layer.out_norm
        if not (all(t is not None for t in states) and fits_dense(*states)):
            return False
        fits_own = (
            layer.conv_weight.shape == (channels, dn.conv_width)
            and layer.conv_states.shape[1:] == (channels, dn.conv_width - 1)
            and layer.ssm_states.shape[1:] == (dn.num_v_heads, dn.head_k_dim, dn.head_v_dim)
            and layer.a_log.shape == layer.dt_bias.shape == (dn.num_v_heads,)
            and layer.out_norm.shape == (dn.head_v_dim,)
            and max(dn.head_k_dim, dn.head_v_dim) <= MAX_DELTA_HEAD_DIM
            and dn.conv_width <= MAX_CONV_WIDTH
            and dn.num_v_heads % dn.num_k_heads == 0
        )
    else:
        a = shape.attention
        if a is None or layer.kind not in KINDS:
            return False
        q_size, kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        gated = layer.kind == "gated_attention"
        linears = (("qkv", (2 if gated else 1) * q_size + 2 * kv_size, h), ("o_proj", h, q_size), *mlp)
        caches = layer.k_cache, layer.v_cache
        cache_shape = (a.num_kv_heads, a.head_dim)
        fits_own = all(c is not None and c.shape[2:] == cache_shape for c in caches) and fits_dense(*caches)
        fits_own = fits_own and layer.k_cache.shape == layer.v_cache.shape
        sinks = layer.sinks
        fits_own = fits_own and (sinks is None or (sinks.shape == (a.num_heads,) and fits_dense(sinks)))
        norms = layer.q_norm, layer.k_norm
        if gated or any(n is not None for n in norms):  # Qwen3.5's gated attention, Qwen3's normed heads
            fits_own = fits_own and all(n is not None and n.shape == (a.head_dim,) and fits_dense(n) for n in norms)
    for name, n, k in linears:
        bias = getattr(layer, name.removesuffix("_proj") + "_bias")
        bias_fits = bias is None or (fits_dense(bias) and bias.shape == (n,))
        if not (fits_blocks(getattr(layer, name), n, k) and bias_fits):
            return False
    norms_fit = all(w.shape == (h,) and fits_dense(w) for w in (layer.input_norm, layer.post_norm))
    return fits_own and norms_fit


def _experts_fit(layer: DecoderLayer, moe: MoeShape, h: int, inter: int) -> bool:
    """A mixture of experts' layer: the router and biases moe.c reads, `held` experts of GGUF blocks."""
    router, held = layer.router, moe.held
    biases = (layer.router_bias, layer.gate_up_bias, layer.down_bias)
    return (
        router is not None
        and router.shape == (moe.num_experts, h)
        and routing_fits(router, *biases, held, inter, moe.top_k, moe.activation)
        and len(layer.gate_up) == len(layer.down) == held
        and all(fits_blocks(w, 2 * inter, h) for w in layer.gate_up)
        and all(fits_blocks(w, h, inter) for w in layer.down)
    )


def _lora_structs(layers: list[DecoderLayer], shape: DecoderShape) -> tuple[ctypes.Array | None, int]:
    """The layers' LoRA structs and the adapters' rank; (None, 0) when no layer has adapters or lora.c cannot read
    theirs (a mixture of experts' MLP, or parts of another layout: such steps then run op by op)."""
    if not any(layer.lora for layer in layers):
        return None, 0
    ranks = {part.a.shape[1] for layer in layers for parts in layer.lora.values() for part in parts}
    fits = len(ranks) == 1 and all(
        name in (inputs := _linear_inputs(shape, layer.kind))
        and parts_fit(parts, inputs[name])
        and not (shape.moe and name in ("gate_up", "down"))
        for layer in layers
        for name, parts in layer.lora.items()
    )
    if not fits:
        return None, 0
    return (LayerLora * len(layers))(*(layer_lora(layer.lora) for layer in layers)), ranks.pop()


def _linear_inputs(shape: DecoderShape, kind: str) -> dict[str, int]:
    """Each linear's input width in a layer of `kind`: what the adapters' A of its parts must read."""
    a, dn = shape.attention, shape.delta_net
    mixed = dn.num_v_heads * dn.head_v_dim if kind == "gated_delta_net" and dn else a.num_heads * a.head_dim if a else 0
    return {"qkv": shape.hidden_size, "o_proj": mixed, "gate_up": shape.hidden_size, "down": shape.intermediate_size}


def _dims(shape: DecoderShape, layers: list[DecoderLayer]) -> _Dims:
    a, dn, moe = shape.attention, shape.delta_net, shape.moe
    block_size = next((layer.k_cache.shape[1] for layer in layers if layer.k_cache is not None), 0)
    no_attention = (0, 0, 0, 0, 0, shape.eps, 0.0, 0.0, None)
    attention = no_attention if a is None else (
        a.num_heads, a.num_kv_heads, a.head_dim, a.cos_sin.shape[1], block_size, shape.eps, a.scale, a.softcap,
        a.cos_sin.data_ptr(),
    )  # fmt: skip
    delta = (0,) * 6 if dn is None else (*astuple(dn)[:5], int(dn.tiled_value_heads))
    experts = (0, 0, 0, 0, 0, 0, 0.0, 0.0) if moe is None else (
        moe.num_experts, moe.top_k, int(moe.normalize), moe.first_expert, moe.held, ACTIVATIONS.index(moe.activation),
        moe.alpha, moe.limit,
    )  # fmt: skip
    return _Dims(shape.hidden_size, shape.intermediate_size, *attention, *delta, *experts)


def _struct(layer: DecoderLayer, keep: list) -> _Layer:
    """The layer's struct; the arrays of its experts' weights it points at are appended to `keep`."""

    def address(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    moe = layer.router is not None
    experts = [(BlockWeight * len(ws))(*map(block_weight, ws)) for ws in (layer.gate_up, layer.down)] if moe else []
    keep.extend(experts)
    return _Layer(
        KINDS.index(layer.kind),
        address(layer.input_norm),
        address(layer.post_norm),
        *(
            BlockWeight() if moe and name in ("gate_up", "down") else block_weight(getattr(layer, name))
            for name in DECODER_LINEARS
        ),
        *(address(getattr(layer, name)) for name in (*BIASES, *TENSORS)),
        address(layer.sinks),
        layer.window,
        address(layer.router),
        address(layer.router_bias),
        *([ctypes.addressof(array) for array in experts] if moe else [None, None]),
    )
