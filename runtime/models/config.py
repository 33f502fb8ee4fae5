"""The architecture-independent description of a decoder-only transformer that every loader produces.

Loaders (Hugging Face directory, GGUF file) translate their own metadata into this one record, so the model-graph
builder, the KV cache and the scheduler never look at a loader's format."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # registry name of the graph builder: "llama", "qwen2" or "mixtral"
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
    # Hugging Face `rope_scaling` dict (e.g. {"rope_type": "llama3", "factor": 8.0, ...}) or None.
    rope_scaling: dict | None = field(default=None, hash=False, compare=False)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # A mixture of experts (Mixtral): each layer's MLP is `num_experts` MLPs of `intermediate_size`, of which a router
    # picks `experts_per_token` per token. 0 and 0: a dense model, one MLP per layer.
    num_experts: int = 0
    experts_per_token: int = 0

    @property
    def kv_heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def num_params(self) -> int:
        """Every parameter, every expert counted (not only those a token uses)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * h * i * max(self.num_experts, 1) + h * self.num_experts  # the experts and their router [E, H]
        layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h
