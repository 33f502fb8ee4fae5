"""The architecture-independent description of a decoder-only transformer that every loader produces.

Loaders (Hugging Face directory, GGUF file) translate their own metadata into this one record, so the model-graph
builder, the KV cache and the scheduler never look at a loader's format. What sets one family apart (Qwen3's q/k
norms, Gemma's sandwich norms, GeGLU, soft-caps and sliding windows, Phi-3's partial rotary) is recorded here as a
feature, and the one graph builder reads features, never family names. The defaults are the Llama layer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # the name of its row in architectures.ARCHITECTURES
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
    expert_activation: str = "silu"  # silu (Mixtral's SwiGLU) or swiglu_oai (gpt-oss's)
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
        """The layers that keep K and V: all but the linear attention ones."""
        return self.num_layers - self.num_linear_layers

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
    def kv_heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_params(self) -> int:
        """Every parameter, every expert counted (not only those a token uses)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2) + (2 * d if self.qk_norm else 0)
        attn += (self.num_heads + 2 * self.num_kv_heads) * d if self.qkv_bias else 0
        attn += (h if self.o_bias else 0) + (self.num_heads if self.attention_sinks else 0)
        mlp = 3 * h * i * max(self.num_experts, 1) + h * self.num_experts  # the experts and their router [E, H]
        mlp += (2 * i + h + 1) * self.num_experts if self.expert_bias else 0
        mlp += (3 * self.shared_expert_intermediate_size + 1) * h if self.shared_expert_intermediate_size else 0
        attn += h * d * self.num_heads if self.attn_output_gate else 0
        norms = (4 if self.sandwich_norms else 2) * h
        dv = self.linear_num_value_heads * self.linear_value_head_dim
        linear = h * (self.linear_conv_dim + dv + 2 * self.linear_num_value_heads) + dv * h  # in and out projections
        linear += self.linear_conv_dim * self.linear_conv_kernel + 2 * self.linear_num_value_heads
        linear += self.linear_value_head_dim
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_kv_layers * attn + self.num_linear_layers * linear + self.num_layers * (mlp + norms) + embed + h
