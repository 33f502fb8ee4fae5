"""The contract between the runtime and a hardware backend.

A backend is a device plus a kernel table: op name -> callable. Lowering a model graph binds every node to an entry
of this table, so adding hardware means writing these ops, not touching the model or the engine. The ops and their
shapes (T tokens in the batch, H hidden, Hq/Hk query/kv heads, D head dim, I intermediate, V vocab, E experts of
which L are held):

  embedding(ids[T] int64, weight[V, H]) -> [T, H]
  rmsnorm(x[T, H], weight[H], eps) -> [T, H]
  add_rmsnorm(x[T, H], residual[T, H], weight[H], eps) -> (normed[T, H], summed[T, H])   # summed = x + residual
  head_rmsnorm(x[T, Hx, D], weight[D], eps) -> [T, Hx, D]            # each head normed (Qwen3's q/k norms)
  linear(x[T, K], weight: packed, bias[N] | None) -> [T, N]        # weight packed by prepare_linear_weight
  rope(q[T, Hq, D], k[T, Hk, D], positions[T] int64, cos_sin[max_pos, R]) -> (q, k)
        # rotate-half (Hugging Face / NeoX) style; cos_sin = cat(cos[:, :R/2], sin[:, :R/2], dim=-1); R < D (partial
        # rotary) turns each head's first R dims and keeps the rest
  silu_mul(x[T, 2I]) -> [T, I]                                      # silu(x[:, :I]) * x[:, I:]
  gelu_tanh_mul(x[T, 2I]) -> [T, I]                                 # gelu(x[:, :I], tanh approximation) * x[:, I:]
  add(x, y) -> x + y
  sigmoid(x[T, N]) -> [T, N]                                        # Qwen3.5's attention output gate
  moe(x[T, H], router[E, H], gate_up[L, 2I, H], down[L, H, I], top_k, first_expert, normalize,
      router_bias[E] | None, gate_up_bias[L, 2I] | None, down_bias[L, H] | None, *, linear, activation, alpha, limit)
      -> [T, H]
        # Mixtral's sparse MLP: softmax over the router's E experts, top_k, weights renormalized to sum to 1 (if
        # `normalize`), then
        # the weighted sum of (silu(x W1^T) * x W3^T) W2^T over the chosen experts that are among the L held, numbers
        # first_expert.. (all E, or an expert parallel rank's share); gate_up[e] = cat(W1, W3). The experts may also
        # be lists of L weights the backend's `linear` reads (packed GGUF blocks), which moe multiplies through
        # `linear`; gpt-oss adds the biases and `activation` "swiglu_oai": (clamp(up, ±limit) + 1) * g *
        # sigmoid(alpha * g), g = min(gate, limit)
  attention(q[T, Hq, D], k[T, Hk, D], v[T, Hk, D], k_cache, v_cache, meta: AttentionMetadata, scale, window,
            softcap, sinks[Hq] | None) -> [T, Hq, D]
        # first writes k, v at meta.slot_mapping, then attends; caches are [num_blocks, block_size, Hk, D];
        # window > 0: a query sees only the last `window` positions (its own included); softcap > 0: each scaled
        # score s becomes softcap * tanh(s / softcap) before the softmax; sinks (gpt-oss): a logit per query head
        # that joins its softmax's denominator and takes no value
  paged_decode_attention(q[B, Hq, D], k_cache, v_cache, block_tables[B, M] int32, context_lens[B] int32, scale,
                         window=0, softcap=0.0, sinks=None) -> [B, Hq, D]
  gated_delta_net(mixed_qkv[T, C], b[T, Hv], a[T, Hv], meta, conv_states[S, C, K-1], ssm_states[S, Hv, Dk, Dv],
                  conv_weight[C, K], a_log[Hv], dt_bias[Hv], num_k_heads, head_k_dim, head_v_dim,
                  tiled_value_heads=False) -> [T, Hv * Dv]
        # a Gated DeltaNet layer's core (Qwen3.5): causal depthwise convolution + SiLU, q/k L2-normed, the gated
        # delta rule over each sequence's state slot (meta.decode_state_slots, PrefillChunk.state_slot), states
        # updated in place; C = 2 Hk Dk + Hv Dv; value head h reads key head h // (Hv / Hk), or h % Hk when tiled
        # (a GGUF's order); torch_ops/linear_attention.py is the reference
  gated_rmsnorm(x[T, Hv * Dv], z[T, Hv * Dv], weight[Dv], eps) -> [T, Hv * Dv]   # per-head RMSNorm, times silu(z)
  add_lora(out[T, N], x[T, K], row_slots[T] int64, lora_a[S, R, K], lora_b[S, N, R]) -> out
        # LoRA adapters' updates added in place: out[t] += x[t] A[s]^T B[s]^T for s = row_slots[t] >= 0 (rows of -1
        # untouched), grouped by slot; B holds the adapter's scaling; torch_ops/lora.py is the reference. Needed only
        # by an engine with enable_lora

One entry is optional, and builds a kernel rather than being one:

  decoder_layers(layers: list[DecoderLayer], shape: DecoderShape) -> DecoderLayersKernel | None
        # a kernel running a run of whole decoder layers (the ops above, in the order DecoderLayer lists them) in one
        # call, for the steps it takes; None when it takes none with these weights. Lowering asks for it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import astuple, dataclass, field, replace
from typing import Any, ClassVar

import torch

from sagellm.backends.quantized import QuantizedWeight
from sagellm.common.errors import InvalidInput, Unavailable

KernelTable = dict[str, Callable[..., Any]]


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


# (hidden[T, H], residual[T, H] | None (the model's first layer: R = h), positions[T] | None (a run without
# attention), meta, lora_rows[T] int64 | None (each row's LoRA slot, -1: none; None: no row has an adapter))
# -> (hidden, residual) after the run's layers, or None for a step it does not take (the ops then run one by one).
DecoderLayersKernel = Callable[
    [torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", Any, "torch.Tensor | None"], "tuple | None"
]

REQUIRED_OPS = (
    "embedding",
    "rmsnorm",
    "add_rmsnorm",
    "linear",
    "rope",
    "silu_mul",
    "gelu_tanh_mul",
    "head_rmsnorm",
    "add",
    "sigmoid",
    "moe",
    "attention",
    "paged_decode_attention",
    "gated_delta_net",
    "gated_rmsnorm",
)


class BackendUnavailableError(Unavailable, RuntimeError):
    """The backend is registered but its software stack or device is missing on this machine."""


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str  # why not, or what was found ("torch 2.13.0, 2 threads")


class HardwareBackend(ABC):
    name: ClassVar[str]
    # The library the ranks of a model split over this backend's devices talk through (runtime/comm/collectives.py).
    collective_library: ClassVar[str] = "gloo"

    def __init__(self) -> None:
        status = self.availability()
        if not status.available:
            raise BackendUnavailableError(f"backend {self.name!r} is not available: {status.reason}")

    @classmethod
    @abstractmethod
    def availability(cls) -> Availability: ...

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def kernels(self) -> KernelTable: ...

    def select_device(self, index: int) -> None:
        """Makes device `index` this process's current one (an engine given `device_ids`)."""
        raise InvalidInput(f"backend {self.name!r} has no numbered devices to select")

    def linear_dtype_problem(self, dtype: torch.dtype) -> str | None:
        """Why this backend's linears cannot compute in `dtype` (None: they can); float32 always can."""
        return None if dtype in (torch.float32, torch.bfloat16) else f"{self.name} linears take float32 or bfloat16"

    def prepare_linear_weight(self, weight: torch.Tensor) -> Any:
        """Packs a [out, in] weight into the layout this backend's `linear` reads fastest."""
        return weight.to(self.device).contiguous()

    def prepare_block_weight(self, parts: list[QuantizedWeight]) -> Any | None:
        """A linear weight this backend's `linear` reads from GGUF blocks (its parts' rows stacked: a fused q/k/v
        may mix kinds, as a Q4_K_M file's does), or None when it does not read them: the caller then packs the
        dequantized floats with `prepare_linear_weight`. Held in one form: no float copy beside the blocks."""
        return None
