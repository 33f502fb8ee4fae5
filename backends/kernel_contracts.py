"""The kernel table's contract, declared once: each kernel family's signature as a `typing.Protocol` whose docstring
says what it takes, returns and writes, and the table (`KernelTable`) typed by them.

A backend is a device plus a kernel table: op name -> kernel. Lowering binds every model graph node to an entry of the
table, so adding hardware means writing these kernels, not touching the model or the engine. A backend's kernels say
how they compute and which inputs they take natively; what they take and return is here, and
tests/backends/test_kernel_contracts.py checks every registered backend's table against these signatures (names,
kinds and defaults of the parameters), so a kernel that drifts from its family fails a test, not a model.

Shapes: T tokens in the batch (decodes first, then prefill chunks: AttentionMetadata), H hidden, Hq/Hk query/kv heads,
D head dim, R rotary dims, I intermediate, V vocabulary, E experts of which L are held, B decode rows, M blocks per
table, S slots. Hidden states are float32; token ids, positions, cache slots, state slots and LoRA row slots int64;
block tables and context lengths int32. A layer's KV cache is one `PagedKv` (k and v [num_blocks, block_size, Hk, D])
and a Gated DeltaNet layer's states one `RecurrentStates` (layer_caches.py). A kernel returns new tensors and leaves
its inputs alone unless its docstring says it writes one in place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, TypedDict

import torch

if TYPE_CHECKING:
    from sagellm.backends.attention_metadata import AttentionMetadata, PrefillChunk
    from sagellm.backends.decoder_layer import DecoderLayer, DecoderShape
    from sagellm.backends.layer_caches import PagedKv
    from sagellm.backends.layer_specs import AttentionSpec, DeltaNetSpec, MoeSpec
    from sagellm.backends.torch_ops.gather_buffers import GatherBuffers
    from sagellm.backends.torch_ops.vision import EncoderMetadata


class Embedding(Protocol):
    def __call__(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """ids [T] int64, weight [V, H] -> their rows [T, H]."""


class RmsNorm(Protocol):
    def __call__(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) * weight over x's last dim, into a new tensor of x's shape. `rmsnorm`: x [T, H],
        weight [H]. `head_rmsnorm`: x [T, Hx, D] (a strided view of a fused projection will do), each head normed
        with one weight [D] (Qwen3's q/k norms)."""


class AddRmsNorm(Protocol):
    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [T, H], weight [H] -> (rmsnorm(x + residual) [T, H], x + residual [T, H]): the residual
        stream's new sum beside its norm, so a layer boundary reads the stream once."""


class GatedRmsNorm(Protocol):
    def __call__(self, x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x, z [T, Hv * Dv], weight [Dv] -> [T, Hv * Dv]: each head of x (Dv wide) RMS-normed, times silu(z) (the
        Gated DeltaNet's output norm)."""


class LayerNorm(Protocol):
    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        """(x - mean) / sqrt(var + eps) * weight + bias over x's last dim: x [T, D], weight and bias [D] -> [T, D]
        (a vision encoder's norms)."""


class Linear(Protocol):
    def __call__(self, x: torch.Tensor, weight: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, K], the weight as the backend packed it (`prepare_linear_weight` from [N, K] floats, or
        `prepare_block_weight` from GGUF blocks), bias [N] | None -> x W^T + bias [T, N], in x's dtype."""


class Rope(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hk, D] (strided views of a fused qkv output will do), positions [T] int64,
        cos_sin [max_pos, R] -> rotated (q, k), new tensors of their shapes. Rotate-half (Hugging Face / NeoX) style,
        cos_sin = cat(cos[:, :R/2], sin[:, :R/2], dim=-1); R < D (partial rotary) turns each head's first R dims and
        keeps the rest."""


class GatedActivation(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, 2I] (gate, then up) -> act(x[:, :I]) * x[:, I:] [T, I]. `silu_mul`: act = silu; `gelu_tanh_mul`:
        act = gelu, tanh approximation (Gemma's GeGLU)."""


class Elementwise(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, N] -> f(x) [T, N] elementwise. `sigmoid`: Qwen3.5's attention output gate; `gelu`: the exact (erf)
        GELU and `quick_gelu`: x * sigmoid(1.702 x), a vision encoder's activations."""


class Add(Protocol):
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + y, a new tensor of their (broadcast) shape."""


class Moe(Protocol):
    def __call__(
        self, x: torch.Tensor, spec: MoeSpec, *, linear: Linear = ..., routing: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mixtral's sparse MLP: x [T, H] -> [T, H], the layer's weights and routing in `spec` (layer_specs.py).
        Softmax over the router's [E, H] scores (of `routing` [T, H] when given, Gemma 4's own norm of the stream; x
        otherwise), top_k experts, their weights renormalized to sum to 1 if spec.normalize and scaled by
        spec.expert_scale [E] if given; then the weighted sum of act(x W1^T) * (x W3^T) W2^T over the chosen experts
        among the L held, numbers first_expert.. (all E, or an expert parallel rank's share: pairs routed elsewhere
        add nothing here). The experts are float tensors stacked, gate_up [L, 2I, H] (gate_up[e] = cat(W1, W3)) and
        down [L, H, I], or lists of L weights `linear` reads (packed GGUF blocks). act is silu, gelu_tanh (Gemma 4)
        or "swiglu_oai" (gpt-oss, with the biases: router_bias [E], gate_up_bias [L, 2I], down_bias [L, H]):
        (clamp(up, ±limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)."""


class KvWrite(Protocol):
    def __call__(self, k: torch.Tensor, v: torch.Tensor, cache: PagedKv, slot_mapping: torch.Tensor) -> None:
        """Writes the batch's k, v [T, Hk, D] into the cache in place, token t at flat slot slot_mapping[t] int64
        (block * block_size + offset). `attention`'s first part (its `write`)."""


class PagedDecodeAttention(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        cache: PagedKv,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        spec: AttentionSpec,
    ) -> torch.Tensor:
        """One query per sequence, q [B, Hq, D], against its whole cached context (its own token's K/V already
        written): block_tables [B, M] int32 (padded with 0), context_lens [B] int32, each >= 1 -> [B, Hq, D].
        Query head h reads kv head h // (Hq / Hk). The layer's `spec` (layer_specs.py): scores are spec.scale * q.k;
        window > 0: a query sees only its last `window` positions (its own included); softcap > 0: each scaled score
        s becomes softcap * tanh(s / softcap) before the softmax; sinks [Hq] float32 (gpt-oss): a logit per query
        head that joins its softmax's denominator and takes no value. Padded cache positions are masked, so they
        must hold finite values."""


class PrefillAttention(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: PagedKv,
        chunk: PrefillChunk,
        spec: AttentionSpec,
        *,
        buffers: GatherBuffers | None = None,
    ) -> torch.Tensor:
        """One prefill chunk's causal attention: q [n, Hq, D] and its fresh k, v [n, Hk, D] (already written to the
        caches) over the sequence's context_len cached tokens (chunk.block_table), query i at position
        context_len - n + i -> [n, Hq, D]; a query inside one of `chunk.bidirectional`'s picture runs [s, e) sees the
        run's keys up to e - 1 too (Gemma 3's images). `spec` as PagedDecodeAttention's; `buffers`: the torch path's
        reusable gather memory (a kernel reading the cache in place ignores it). `attention`'s prefill part (its
        `prefill`)."""


class Attention(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: PagedKv,
        meta: AttentionMetadata,
        spec: AttentionSpec,
    ) -> torch.Tensor:
        """A layer's attention over the paged KV cache for the whole batch: q [T, Hq, D], k, v [T, Hk, D] ->
        [T, Hq, D]. First writes k, v into the cache in place at meta.slot_mapping (KvWrite), then attends: the
        meta.num_decode_tokens decode rows as PagedDecodeAttention (meta.decode_block_tables, decode_context_lens),
        each of meta.prefills as PrefillAttention; `spec` as theirs."""


class EncoderAttention(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: EncoderMetadata, scale: float
    ) -> torch.Tensor:
        """A vision encoder's attention: q, k, v [T, H, D] (strided views of a fused qkv output will do) -> [T, H, D],
        each image's rows (meta.seq_lens, in order) attending to all of that image's rows and no other's, scores
        scale * q.k, no cache."""


class GatedDeltaNet(Protocol):
    def __call__(
        self, mixed_qkv: torch.Tensor, b: torch.Tensor, a: torch.Tensor, meta: AttentionMetadata, spec: DeltaNetSpec
    ) -> torch.Tensor:
        """A Gated DeltaNet layer's core (Qwen3.5) over the batch: mixed_qkv [T, C] (C = 2 Hk Dk + Hv Dv, the
        projected q, k, v before the convolution), b, a [T, Hv] -> the delta rule's output [T, Hv * Dv] float32,
        before the gated norm. The layer's `spec` (layer_specs.py) holds its weights and heads: a causal depthwise
        convolution (spec.conv_weight [C, K]) + SiLU, q and k L2-normed, then the gated delta rule (spec.a_log,
        spec.dt_bias [Hv]) over each sequence's states (spec.states: conv [S, C, K-1], ssm [S, Hv, Dk, Dv]), read
        and updated in place in its slot (meta.decode_state_slots, meta.decode_state_seeds; a chunk's
        PrefillChunk.state_slot, source_slot and checkpoint). Value head h reads key head h // (Hv / Hk), or h % Hk
        when spec.tiled_value_heads (a GGUF's order). torch_ops/linear_attention.py is the reference."""


class AddLora(Protocol):
    def __call__(
        self, out: torch.Tensor, x: torch.Tensor, row_slots: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor
    ) -> torch.Tensor:
        """Adds LoRA adapters' updates into out [T, N] in place and returns it: out[t] += x[t] A[s]^T B[s]^T for
        s = row_slots[t] int64 >= 0 (rows of -1 untouched); x [T, K] (float32 or bfloat16), lora_a [S, R, K],
        lora_b [S, N, R] (each adapter's rank padded to R with zeros, its scaling folded into B). out may be a
        strided view (one part of a fused projection's output). torch_ops/lora.py is the reference."""


class DecoderLayersKernel(Protocol):
    def __call__(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor | None,
        meta: AttentionMetadata,
        lora_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A run of whole decoder layers in one call: hidden [T, H], residual [T, H] | None (the model's first layer:
        the residual is the hidden), positions [T] int64 | None (a run without attention), lora_rows [T] int64 |
        None (each row's LoRA slot, -1: none; None: no row has an adapter) -> (hidden, residual) after the run, or
        None for a step it does not take (the layers' ops then run one by one). Writes the layers' caches and states
        as their ops would."""


class DecoderLayers(Protocol):
    def __call__(self, layers: list[DecoderLayer], shape: DecoderShape) -> DecoderLayersKernel | None:
        """Builds a kernel running these layers (the ops above, in the order DecoderLayer lists them) in one call,
        or None when it takes no step with these weights. Lowering asks for it once per run of layers."""


class OptionalKernels(TypedDict, total=False):
    """The entries a backend may leave out: `add_lora`, needed only by an engine with enable_lora, and
    `decoder_layers`, which builds a kernel rather than being one (fuse_layers.py asks for it)."""

    add_lora: AddLora
    decoder_layers: DecoderLayers


class KernelTable(OptionalKernels):
    """Op name -> kernel, as `HardwareBackend.kernels()` returns it; every entry below must be present."""

    embedding: Embedding
    rmsnorm: RmsNorm
    add_rmsnorm: AddRmsNorm
    head_rmsnorm: RmsNorm
    gated_rmsnorm: GatedRmsNorm
    linear: Linear
    rope: Rope
    silu_mul: GatedActivation
    gelu_tanh_mul: GatedActivation
    sigmoid: Elementwise
    add: Add
    moe: Moe
    attention: Attention
    paged_decode_attention: PagedDecodeAttention
    gated_delta_net: GatedDeltaNet
    layernorm: LayerNorm
    gelu: Elementwise
    quick_gelu: Elementwise
    encoder_attention: EncoderAttention


REQUIRED_OPS = tuple(sorted(KernelTable.__required_keys__))
