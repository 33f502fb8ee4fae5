"""The architecture-independent description of a decoder-only transformer that every loader produces.

Loaders (Hugging Face directory, GGUF file) translate their own metadata into this one record, so the model-graph
builder, the KV cache and the scheduler never look at a loader's format. What sets one family apart (Qwen3's q/k
norms, Gemma's sandwich norms, GeGLU, soft-caps and sliding windows, Phi-3's partial rotary) is recorded here as a
feature, and the one graph builder reads features, never family names. The defaults are the Llama layer."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sagellm.runtime.models.audio_config import AudioConfig
from sagellm.runtime.models.vision_config import VisionConfig


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # the name of its row in architectures.families.ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v projections
    o_bias: bool = False  # and gpt-oss on the output projection too
    # A learned logit per query head joins each softmax's denominator and takes no value (gpt-oss's attention sinks):
    # a query may attend to "nothing", so its output can shrink towards zero. Weights [num_heads].
    attention_sinks: bool = False
    # Hugging Face `rope_scaling` dict (e.g. {"rope_type": "llama3", "factor": 8.0, ...}) or None.
    rope_scaling: dict | None = field(default=None, hash=False, compare=False)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # A mixture of experts (Mixtral): each layer's MLP is `num_experts` MLPs of `intermediate_size`, of which a router
    # picks `experts_per_token` per token. 0 and 0: a dense model, one MLP per layer.
    num_experts: int = 0
    experts_per_token: int = 0
    normalize_expert_weights: bool = True  # the chosen experts' weights rescaled to sum to 1 (Qwen's norm_topk_prob)
    # gpt-oss's experts: the router and every expert projection have biases, and the activation is its clamped
    # SwiGLU, (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = clamp(gate, max=limit).
    expert_bias: bool = False
    # A shared expert beside the routed ones (Qwen3.5-MoE): an MLP of this size every token takes, its output scaled
    # by sigmoid of a learned gate [1, H]; 0: none.
    shared_expert_intermediate_size: int = 0
    # Gemma 4's mixture (26B-A4B): experts of this size beside a dense MLP of intermediate_size, each side with its
    # own norms, routed from their own norm of the stream (weight `router.scale`, times hidden^-1/2), each chosen
    # expert's weight times its learned scale (`router.per_expert_scale`); 0: the experts replace the MLP (Mixtral).
    expert_intermediate_size: int = 0
    expert_activation: str = "silu"  # silu (Mixtral's SwiGLU), swiglu_oai (gpt-oss's) or gelu_tanh (Gemma 4's)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # RMSNorm over each head of q and k after their projections, before rope (Qwen3, Gemma 3): weights [head_dim].
    qk_norm: bool = False
    # Gemma's sandwich: the attention and MLP outputs are normed before joining the residual stream, and the pre-MLP
    # norm is `pre_feedforward_layernorm` (Gemma names its post-attention output norm `post_attention_layernorm`).
    sandwich_norms: bool = False
    activation: str = "silu"  # the gated MLP's: silu (SwiGLU) or gelu_tanh (GeGLU, Gemma)
    embedding_scale: float = 1.0  # the embedding rows are multiplied by it (Gemma: sqrt(hidden_size))
    attention_scale: float | None = None  # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_softcap: float = 0.0  # scores become c * tanh(s / c) when > 0 (Gemma 2)
    final_softcap: float = 0.0  # and the logits too (Gemma 2 and 3)
    # Sliding-window attention: a layer of type "sliding_attention" sees only the last `sliding_window` positions.
    # Every layer slides when `layer_types` is empty and the window is set (Mistral).
    sliding_window: int = 0
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None  # the sliding layers' own rope (Gemma 3: theta 1e4, unscaled)
    rotary_dim: int = 0  # rope turns only the first rotary_dim of each head (Phi-3's partial rotary); 0: head_dim
    # Qwen-VL's multimodal rope (M-RoPE): each rotary frequency turns by one of a token's three positions (time,
    # height, width): `mrope_section[i]` frequencies by position i, in turn (Qwen2-VL, Qwen2.5-VL) or interleaved
    # t h w t h w ... (`mrope_interleaved`: Qwen3-VL, Qwen3.5). A text token's three are equal, so text alone turns
    # as plain rope; a picture's tokens get their own table rows (models/mrope.py). (): plain rope.
    mrope_section: tuple[int, ...] = ()
    mrope_interleaved: bool = False
    # Gated attention (Qwen3.5, Qwen3-Next): q_proj gives each head's query and a gate of the same size, interleaved
    # per head; the attention output is multiplied by sigmoid(gate) before o_proj.
    attn_output_gate: bool = False
    # Gated DeltaNet (Qwen3.5, Qwen3-Next): a layer of type "linear_attention" mixes tokens through a recurrent state
    # per sequence instead of a KV cache (backends/torch_ops/linear_attention.py): its key and value heads, their
    # sizes, and the width of its causal convolution.
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0
    # The value heads in llama.cpp's order, tiled by key head (value head h reads key head h % Hk), as a GGUF stores
    # them when there are more value heads than key heads; Hugging Face groups them (h reads key head h // (Hv / Hk)).
    # Kept as stored: out_proj's inputs run over the same heads, so its quantized blocks stay whole.
    linear_value_heads_tiled: bool = False
    # Gemma 4: full attention layers have a head size and a KV head count of their own (0: the other layers'), and
    # with `full_values_from_keys` no v_proj: their values are their keys' projection, normed but not turned.
    full_head_dim: int = 0
    full_num_kv_heads: int = 0
    full_values_from_keys: bool = False
    value_norm: bool = False  # values RMS-normed per head, without a weight (Gemma 4)
    # The last `num_kv_shared_layers` layers compute no K/V: each attends over the cache of the last earlier layer of
    # its type (Gemma 4, Gemma 3n), and with `double_wide_shared_mlp` their MLPs are twice as wide.
    num_kv_shared_layers: int = 0
    double_wide_shared_mlp: bool = False
    # Per-layer embeddings (Gemma 4, Gemma 3n): a second table of `per_layer_vocab_size` rows gives each token a
    # vector of this size per layer, joined with a projection of its embedding and fed to each layer after its MLP.
    per_layer_input_size: int = 0
    per_layer_vocab_size: int = 0
    layer_scalar: bool = False  # each layer's output multiplied by a learned scalar (Gemma 4)
    # Gemma 3n: the residual stream as `altup_num_inputs` streams of which each layer computes on the active one
    # (AltUp, backends/torch_ops/altup.py), a low-rank LAuReL branch beside its attention, MLP widths per layer
    # (`layer_intermediate_sizes`) and activation sparsity per layer (the share of each gate's row cut, 0: none).
    altup_num_inputs: int = 0
    altup_active_idx: int = 0
    altup_correct_scale: bool = False
    laurel_rank: int = 0
    layer_intermediate_sizes: tuple[int, ...] = ()
    activation_sparsity: tuple[float, ...] = ()
    # Qwen3.5's and Qwen3-Next's multi-token prediction layers (`mtp.*` in the checkpoint: mtp_head.py), read only
    # by the MTP proposer.
    num_mtp_layers: int = 0
    # The vision encoder whose image embeddings replace the placeholder tokens' rows (LLaVA); None: text only.
    vision: VisionConfig | None = field(default=None, hash=False, compare=False)
    # The audio encoder whose clip embeddings replace the placeholder tokens' rows (Qwen2-Audio); None: no audio.
    audio: AudioConfig | None = field(default=None, hash=False, compare=False)

    @property
    def takes_media(self) -> bool:
        """Some prompt rows may take an encoder's embeddings instead of their tokens' (images, audio)."""
        return self.vision is not None or self.audio is not None

    @property
    def media_attends_both_ways(self) -> bool:
        """A picture's placeholder rows attend to each other both ways in a prefill (Gemma 3), not causally."""
        return self.vision is not None and self.vision.bidirectional

    def first_layers(self, n: int) -> ModelConfig:
        """The model's first `n` layers as a model of their own (what `sagellm inspect` prints in full): its
        per-layer lists cut, and of the layers that share KV only those among them."""
        n = min(n, self.num_layers)
        shared = max(0, n - (self.num_layers - self.num_kv_shared_layers))
        return replace(
            self,
            num_layers=n,
            layer_types=self.layer_types[:n],
            num_kv_shared_layers=shared,
            layer_intermediate_sizes=self.layer_intermediate_sizes[:n],
            activation_sparsity=self.activation_sparsity[:n],
        )

    def window_of(self, layer: int) -> int:
        """The sliding window of `layer`'s attention, 0 for full attention."""
        if not self.sliding_window or (self.layer_types and self.layer_types[layer] != "sliding_attention"):
            return 0
        return self.sliding_window

    def is_linear_attention(self, layer: int) -> bool:
        """Whether `layer` is a Gated DeltaNet layer (a recurrent state, no KV cache)."""
        return bool(self.layer_types) and self.layer_types[layer] == "linear_attention"

    @property
    def num_kv_layers(self) -> int:
        """The layers that keep K and V in a cache of their own: all but the linear attention ones and those that
        read another layer's."""
        return self.num_layers - self.num_linear_layers - self.num_kv_shared_layers

    def head_dim_of(self, layer: int) -> int:
        return self.full_head_dim if self.full_head_dim and self._is_full(layer) else self.head_dim

    def num_kv_heads_of(self, layer: int) -> int:
        return self.full_num_kv_heads if self.full_num_kv_heads and self._is_full(layer) else self.num_kv_heads

    def values_from_keys(self, layer: int) -> bool:
        return self.full_values_from_keys and self._is_full(layer)

    def _is_full(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "full_attention"

    def kv_source(self, layer: int) -> int:
        """The layer whose K/V `layer` attends over: itself, or for one of the last `num_kv_shared_layers`, the last
        earlier layer of its type (transformers' "store" layer)."""
        first_shared = self.num_layers - self.num_kv_shared_layers
        if layer < first_shared:
            return layer
        kind = self.layer_types[layer] if self.layer_types else None
        for source in range(first_shared - 1, -1, -1):
            if not self.layer_types or self.layer_types[source] == kind:
                return source
        raise ValueError(f"layer {layer} shares the KV of an earlier {kind} layer, and there is none")

    def intermediate_size_of(self, layer: int) -> int:
        if self.layer_intermediate_sizes:
            return self.layer_intermediate_sizes[layer]
        wide = self.double_wide_shared_mlp and self.kv_source(layer) != layer
        return self.intermediate_size * (2 if wide else 1)

    @property
    def kv_layers(self) -> list[int]:
        """The layers with a KV cache of their own, in order: the cache index is the place in this list."""
        return [i for i in range(self.num_layers) if not self.is_linear_attention(i) and self.kv_source(i) == i]

    @property
    def kv_row_shape(self) -> tuple[int, int]:
        """(KV heads, head size) of a token's K or V in the widest cache: the shape KV travels in between engines,
        a narrower layer's rows padded to it."""
        layers = self.kv_layers or [0]
        return max(self.num_kv_heads_of(i) for i in layers), max(self.head_dim_of(i) for i in layers)

    @property
    def one_pipeline_stage(self) -> bool:
        """Whether the graph needs every layer: per-layer embeddings (one table read for all layers), shared KV (a
        layer attends with an earlier layer's K and V), layer scalars (a stream with no residual beside it) or AltUp
        ([T, K, H] between layers): Gemma 4 and 3n."""
        shared = self.per_layer_input_size or self.num_kv_shared_layers or self.layer_scalar or self.altup_num_inputs
        return bool(shared)

    @property
    def num_linear_layers(self) -> int:
        return sum(self.is_linear_attention(i) for i in range(self.num_layers))

    @property
    def linear_conv_dim(self) -> int:
        """The channels of a linear attention layer's convolution: its q, k and v, 2 Hk Dk + Hv Dv."""
        keys = self.linear_num_key_heads * self.linear_key_head_dim
        return 2 * keys + self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def rotary_dims(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_params(self) -> int:
        """Every parameter, every expert counted (not only those a token uses)."""
        h = self.hidden_size
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        if self.per_layer_input_size:  # the per-layer table, the embedding's projection to it and that one's norm
            size = self.num_layers * self.per_layer_input_size
            embed += (self.per_layer_vocab_size + h) * size + self.per_layer_input_size
        embed += 2 * (self.altup_num_inputs - 1) * h * h if self.altup_num_inputs else 0  # streams' projections
        return embed + h + sum(self._layer_params(i) for i in range(self.num_layers))

    def _layer_params(self, i: int) -> int:
        h, i_size = self.hidden_size, self.intermediate_size_of(i)
        mixer = self._linear_attention_params() if self.is_linear_attention(i) else self._attention_params(i)
        mlp = 3 * h * i_size * max(self.num_experts, 1) + h * self.num_experts  # the experts and their router [E, H]
        mlp += (2 * i_size + h + 1) * self.num_experts if self.expert_bias else 0
        if self.expert_intermediate_size:  # Gemma 4: a dense MLP beside the experts, their norms and scales
            mlp = 3 * h * i_size + (3 * h * self.expert_intermediate_size + h + 1) * self.num_experts + 4 * h
        mlp += (3 * self.shared_expert_intermediate_size + 1) * h if self.shared_expert_intermediate_size else 0
        norms = (4 if self.sandwich_norms else 2) * h
        per_layer = 2 * h * self.per_layer_input_size + h if self.per_layer_input_size else 0  # gate, projection, norm
        k = self.altup_num_inputs
        altup = (k * k * k + k * k + k * h + 2 * h) if k else 0  # coefficients, router, its norm, output scale
        laurel = 2 * h * self.laurel_rank + h if self.laurel_rank else 0
        return mixer + mlp + norms + per_layer + altup + laurel  # a layer scalar is a buffer, not a parameter

    def _attention_params(self, i: int) -> int:
        h, d, heads = self.hidden_size, self.head_dim_of(i), self.num_heads
        kv_heads = self.num_kv_heads_of(i) if self.kv_source(i) == i else 0  # a layer sharing KV has no k/v
        values = 0 if self.values_from_keys(i) else kv_heads
        params = h * d * (heads * (3 if self.attn_output_gate else 2) + kv_heads + values)
        params += (d + (d if kv_heads else 0)) if self.qk_norm else 0
        params += (heads + kv_heads + values) * d if self.qkv_bias else 0
        return params + (h if self.o_bias else 0) + (heads if self.attention_sinks else 0)

    def _linear_attention_params(self) -> int:
        h, dv = self.hidden_size, self.linear_num_value_heads * self.linear_value_head_dim
        params = h * (self.linear_conv_dim + dv + 2 * self.linear_num_value_heads) + dv * h  # in and out projections
        params += self.linear_conv_dim * self.linear_conv_kernel + 2 * self.linear_num_value_heads
        return params + self.linear_value_head_dim
