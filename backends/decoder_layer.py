"""What a backend's optional `decoder_layers` kernel (kernel_contracts.py) is built from: each decoder layer's bound
constants as lowering bound its ops (`DecoderLayer`, with its LoRA adapters' parts, `LoraPart`) and what the layers of
one run share (`DecoderShape`: their attention, Gated DeltaNet and mixture of experts' parts)."""

from __future__ import annotations

from dataclasses import astuple, dataclass, field, replace
from typing import Any

import torch

# DecoderLayer's linear weights, in the order the native structs hold them (decoder_layers.c)
DECODER_LINEARS = ("qkv", "o_proj", "gate_up", "down")


@dataclass(frozen=True)
class LoraPart:
    """One weight's LoRA adapters as a linear adds them (the add_lora op's operands, stacked by slot): A [S, R, K] and
    B^T [S, R, end - begin] (rank padded with zeros, scaling folded in), into the linear's output columns
    begin .. end (a part of a fused q/k/v or gate/up). Their tensors are updated in place as adapters come and go."""

    a: torch.Tensor
    b_t: torch.Tensor
    begin: int
    end: int


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer's bound constants, as lowering bound its ops: x = rmsnorm(h + R), a mixer, x = rmsnorm(o + R),
    gate_up = linear, silu_mul, down = linear. The mixer (`kind`) is "attention": qkv = linear, rope, attention over
    the layer's cache, o = linear (with `q_norm` and `k_norm`: each head's q and k normed before rope, Qwen3's);
    "gated_attention" (Qwen3.5): the same with each head's query beside a gate in
    qkv, per-head norms of q and k before rope (`q_norm`, `k_norm`), the output times sigmoid(gate); or
    "gated_delta_net": qkv is the input projection (q k v | z | b | a), then gated_delta_net over the layer's
    states, gated_rmsnorm (`out_norm`), o_proj the output projection. Linear weights are what
    `prepare_linear_weight` packed. An attention layer's sliding `window` (0: none) and `sinks` (gpt-oss's [Hq]
    logits) are its own: models alternate them layer by layer. A mixture of experts' layer (`router` [E, H] set) has
    `add_rmsnorm, moe` for its MLP: gate_up and down are then its held experts' weights (lists), their biases
    stacked ([L, 2I], [L, H]), and DecoderShape.moe says how it routes."""

    input_norm: torch.Tensor  # [H]
    qkv: Any
    qkv_bias: torch.Tensor | None
    o_proj: Any
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [H]
    gate_up: Any
    gate_up_bias: torch.Tensor | None
    down: Any
    down_bias: torch.Tensor | None
    k_cache: torch.Tensor | None = None
    v_cache: torch.Tensor | None = None
    kind: str = "attention"
    q_norm: torch.Tensor | None = None  # [D]
    k_norm: torch.Tensor | None = None  # [D]
    # gated_delta_net's constants as lowering bound them: the states [S, C, K-1] and [S, Hv, Dk, Dv], conv_weight
    # [C, K], a_log and dt_bias [Hv], and the gated norm's weight [Dv]
    conv_states: torch.Tensor | None = None
    ssm_states: torch.Tensor | None = None
    conv_weight: torch.Tensor | None = None
    a_log: torch.Tensor | None = None
    dt_bias: torch.Tensor | None = None
    out_norm: torch.Tensor | None = None
    window: int = 0
    sinks: torch.Tensor | None = None
    router: torch.Tensor | None = None
    router_bias: torch.Tensor | None = None
    # LoRA adapters' parts of its linears, by field (qkv, o_proj, gate_up, down): a kernel taking the layer adds each
    # row's update after the linear (decoder_layers' `lora_rows`), or declines steps with adapter rows
    lora: dict[str, tuple[LoraPart, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class AttentionShape:
    """What a run's attention layers share."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    cos_sin: torch.Tensor  # [max_pos, R], as rope takes it (R < D: partial rotary)
    softcap: float = 0.0  # the score soft-cap (0: none), as `attention` takes it

    def key(self) -> tuple:
        return (self.num_heads, self.num_kv_heads, self.head_dim, self.scale, id(self.cos_sin), self.softcap)


@dataclass(frozen=True)
class DeltaNetShape:
    """What a run's Gated DeltaNet layers share: key heads and size, value heads and size, the convolution's width,
    whether the value heads are tiled by key head (`gated_delta_net`'s tiled_value_heads)."""

    num_k_heads: int
    head_k_dim: int
    num_v_heads: int
    head_v_dim: int
    conv_width: int
    tiled_value_heads: bool = False


@dataclass(frozen=True)
class MoeShape:
    """What a run's mixtures of experts share, as `moe` takes it: the router's experts, how many a token takes, the
    held ones (first_expert.., `held` of them), whether the chosen weights are renormalized, the activation."""

    num_experts: int
    top_k: int
    first_expert: int
    held: int
    normalize: bool
    activation: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0


@dataclass(frozen=True)
class DecoderShape:
    """What every layer of a run shares; `attention`, `delta_net` and `moe` are None in a run without such layers
    (`moe`: a run of mixture of experts' layers; its dense layers' MLPs otherwise)."""

    hidden_size: int
    intermediate_size: int
    eps: float
    attention: AttentionShape | None = None
    delta_net: DeltaNetShape | None = None
    moe: MoeShape | None = None

    def key(self) -> tuple:
        """What every two layers of one run agree on; their attention and delta net parts are matched by `joined`
        (the rotary table compared by identity)."""
        return (self.hidden_size, self.intermediate_size, self.eps, self.moe)

    def joined(self, other: DecoderShape) -> DecoderShape | None:
        """The shape of a run holding layers of both shapes, or None when they disagree."""
        if self.key() != other.key():
            return None
        parts = {}
        for name in ("attention", "delta_net"):
            mine, theirs = getattr(self, name), getattr(other, name)
            same = mine is None or theirs is None or _part_key(mine) == _part_key(theirs)
            if not same:
                return None
            parts[name] = mine if mine is not None else theirs
        return replace(self, **parts)


def _part_key(part: AttentionShape | DeltaNetShape) -> tuple:
    return part.key() if isinstance(part, AttentionShape) else astuple(part)
