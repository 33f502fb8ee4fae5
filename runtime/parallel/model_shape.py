"""`ModelShape`: a model as the planner sizes it, and what one device holds of it under a `ParallelismConfig`.

`ModelConfig` describes a dense decoder; a mixture of experts adds how many MLPs (experts) each layer has and how many
a token uses, which `ModelShape` carries beside it. The arithmetic follows how the split lays weights out: tensor
parallel gives a rank whole GQA groups (a query-head group with its KV head), so the largest share is ceil(kv_heads /
tp) groups, slices the MLP and the output head's vocabulary, and keeps the embedding whole on every rank (as
`runtime/models/tensor_parallel.py` lays a rank out); pipeline parallel gives a stage ceil(layers / pp) layers, with
the embedding on the first and the output head on the last; expert parallel gives a rank num_experts / ep whole
experts. Norms and the router are small and every rank keeps its own."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sagellm.common.errors import InvalidInput
from sagellm.runtime.models.config import ModelConfig
from sagellm.runtime.parallel.config import ParallelismConfig

GIB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}  # the dtypes a plan may size weights and KV cache in


@dataclass(frozen=True)
class ModelShape:
    config: ModelConfig
    num_experts: int = 1  # MLPs per layer; 1 for a dense model
    experts_per_token: int = 1  # MLPs a token goes through
    name: str = ""  # how explanations call it; the architecture's name when empty

    def __post_init__(self) -> None:
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise InvalidInput(f"experts_per_token must be in 1..{self.num_experts}, got {self.experts_per_token}")

    @classmethod
    def of(cls, config: ModelConfig, name: str = "") -> ModelShape:
        """A loaded model's shape: its experts (a dense model's 0 in its config is one MLP every token uses)."""
        return cls(config, config.num_experts or 1, config.experts_per_token or 1, name)

    @property
    def label(self) -> str:
        return self.name or self.config.architecture

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    # -- parameters, by where they live --------------------------------------------------------------------------
    @property
    def attention_params(self) -> int:
        """One layer's q, k, v and o projections."""
        c = self.config
        return c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)

    @property
    def expert_params(self) -> int:
        """One MLP (gate, up, down)."""
        return 3 * self.config.hidden_size * self.config.intermediate_size

    @property
    def replicated_params(self) -> int:
        """One layer's two norms and router, which every rank keeps whole."""
        return self.config.hidden_size * (2 + (self.num_experts if self.is_moe else 0))

    @property
    def vocab_params(self) -> int:
        """The embedding, or the output head when untied."""
        return self.config.vocab_size * self.config.hidden_size

    def num_params(self) -> int:
        """Every parameter: ModelConfig.num_params() for a dense model."""
        c = self.config
        layer = self.attention_params + self.num_experts * self.expert_params + self.replicated_params
        return c.num_layers * layer + self.vocab_params * (1 if c.tie_word_embeddings else 2) + c.hidden_size

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token, on one replica."""
        c = self.config
        return c.num_layers * 2 * c.num_kv_heads * c.head_dim * dtype_bytes

    # -- one device's share ---------------------------------------------------------------------------------------
    def weights_per_device(self, split: ParallelismConfig, bytes_per_param: float) -> int:
        """Bytes of weights on the fullest device of `split`."""
        c = self.config
        attention = self.attention_params * self.kv_groups_per_rank(split.tp) / c.num_kv_heads
        if split.ep > 1:  # whole experts on each of ep ranks
            mlp = math.ceil(self.num_experts / split.ep) * self.expert_params
        else:  # every expert sliced tp ways
            mlp = self.num_experts * self.expert_params / split.tp
        layers = self.layers_per_stage(split.pp) * (attention + mlp + self.replicated_params)
        # The first stage's embedding is whole on every rank, the last stage's untied head a vocabulary slice; one
        # stage holding both keeps both (a tied head is the embedding itself).
        head = self.vocab_params / split.tp if split.pp == 1 and not c.tie_word_embeddings else 0
        return math.ceil((layers + self.vocab_params + head + c.hidden_size) * bytes_per_param)

    def kv_per_device(self, split: ParallelismConfig, tokens: int, dtype_bytes: int) -> int:
        """Bytes of KV cache on the fullest device for `tokens` tokens of one replica."""
        c = self.config
        per_layer_token = 2 * self.kv_groups_per_rank(split.tp) * c.head_dim * dtype_bytes
        return tokens * self.layers_per_stage(split.pp) * per_layer_token

    def kv_groups_per_rank(self, tp: int) -> int:
        return math.ceil(self.config.num_kv_heads / tp)

    def layers_per_stage(self, pp: int) -> int:
        return math.ceil(self.config.num_layers / pp)
