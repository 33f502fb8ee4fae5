"""A layer's fixed inputs to its kernel family, as one value: an attention layer's settings (`AttentionSpec`), a
Gated DeltaNet layer's states, weights and shape (`DeltaNetSpec`) and a mixture of experts' weights and routing
(`MoeSpec`).

Lowering builds each once per layer (runtime/execution_graph/lowering.py) and binds it as a constant, so every call
passes the same object and a decode step allocates nothing for it. As vLLM's Attention layer carries its scale,
sliding window, soft-cap and sinks as attributes, the kernel families (kernel_contracts.py) take the layer's spec
in one parameter instead of each backend restating four to twelve of them; what each field means is there. As
vLLM's Mamba layers hold their own states, a Gated DeltaNet layer's spec names its state tensors too (fixed tensors
whose contents its kernel advances), where an attention layer's KV cache is a parameter of its own, as vLLM's
attention backends take it (layer_caches.py). Specs compare by identity (`eq=False`): they hold tensors, whose `==`
is no bool."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sagellm.backends.layer_caches import RecurrentStates


@dataclass(frozen=True, slots=True, eq=False)
class AttentionSpec:
    """What an attention layer's kernels (`Attention`, `PagedDecodeAttention`, `PrefillAttention`) hold fixed."""

    scale: float  # scores are scale * q.k
    window: int = 0  # a query sees only its last `window` positions (0: all)
    softcap: float = 0.0  # each scaled score s becomes softcap * tanh(s / softcap) (0.0: none; Gemma 2)
    sinks: torch.Tensor | None = None  # float32 [Hq]: a logit per query head in its softmax's denominator (gpt-oss)


@dataclass(frozen=True, slots=True, eq=False)
class DeltaNetSpec:
    """What a Gated DeltaNet layer's kernel (`GatedDeltaNet`) holds fixed: its states, weights and head shape."""

    states: RecurrentStates  # a slot per sequence, read and advanced in place
    conv_weight: torch.Tensor  # [C, K]: the causal depthwise convolution
    a_log: torch.Tensor  # [Hv]
    dt_bias: torch.Tensor  # [Hv]
    num_k_heads: int  # Hk
    head_k_dim: int  # Dk
    head_v_dim: int  # Dv
    tiled_value_heads: bool = False  # value head h reads key head h % Hk (a GGUF's order), not h // (Hv / Hk)


@dataclass(frozen=True, slots=True, eq=False)
class MoeSpec:
    """What a mixture of experts' kernel (`Moe`) holds fixed: the router, the held experts' weights and biases, how
    it routes and its activation."""

    router: torch.Tensor  # [E, H]
    gate_up: torch.Tensor | Sequence[Any]  # [L, 2I, H] floats stacked, or L weights the table's `linear` reads
    down: torch.Tensor | Sequence[Any]  # [L, H, I], or L weights
    top_k: int  # experts a token takes
    first_expert: int = 0  # the held experts are first_expert .. first_expert + L - 1 of the E
    normalize: bool = True  # the chosen experts' weights renormalized to sum to 1
    router_bias: torch.Tensor | None = None  # [E]
    gate_up_bias: torch.Tensor | None = None  # [L, 2I]
    down_bias: torch.Tensor | None = None  # [L, H]
    activation: str = "silu"  # "silu", "gelu_tanh" or "swiglu_oai"
    alpha: float = 1.702  # swiglu_oai's
    limit: float = 7.0  # swiglu_oai's
    expert_scale: torch.Tensor | None = None  # [E]: each chosen expert's weight scaled (Gemma 4)
