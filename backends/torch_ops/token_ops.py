"""The torch ops that work on tokens' hidden states and nothing else (no KV cache): embedding, the norms, linear,
rotary embedding, the gated activations, the sigmoid gate, the residual add, and a mixture of experts' sparse MLP;
what each takes and returns is its kernel_contracts.py protocol's."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sagellm.backends.layer_specs import MoeSpec


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, weight)  # [T, H]


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)  # [T, H]


def head_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H, D] (a strided view of a fused projection will do) normed over each head, weight [D]."""
    return F.rms_norm(x, weight.shape, weight, eps)  # [T, H, D]


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual  # [T, H]
    return rmsnorm(summed, weight, eps), summed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reads the default packing of `HardwareBackend.prepare_linear_weight`: the [out, in] weight as given."""
    return F.linear(x, weight, bias)  # [T, N]


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`Rope`. When k's heads directly follow q's in memory (the fused qkv output), both are rotated in one pass over
    a joint [T, Hq + Hk, D] view: half the ops, which is what a one-token decode step pays for (measured ~2x per
    layer)."""
    half = cos_sin.shape[-1] // 2
    cs = cos_sin.index_select(0, positions)  # [T, D]
    cos = cs[:, None, :half]  # [T, 1, D/2]
    sin = cs[:, None, half:]  # [T, 1, D/2]
    joint = _joint_heads(q, k)
    if joint is not None:
        return _rotate(joint, cos, sin, half).split([q.shape[1], k.shape[1]], dim=1)
    return _rotate(q, cos, sin, half), _rotate(k, cos, sin, half)


def _joint_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q [T, Hq, D] and k [T, Hk, D] as one [T, Hq + Hk, D] view when k's heads follow q's in every row."""
    d = q.shape[2]
    heads_packed = q.stride()[1:] == (d, 1) and k.stride()[1:] == (d, 1) and q.dtype == k.dtype
    if not heads_packed or (q.shape[0] > 1 and q.stride(0) != k.stride(0)):  # a row's stride is moot for one row
        return None
    if k.data_ptr() != q.data_ptr() + q.shape[1] * d * q.element_size():
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], d), q.stride())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    x1, x2 = x[..., :half], x[..., half : 2 * half]  # [T, H, R/2] each
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # [T, H, D]
    o1, o2 = out[..., :half], out[..., half : 2 * half]
    if 2 * half < x.shape[-1]:
        out[..., 2 * half :] = x[..., 2 * half :]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)  # x2 cos + x1 sin
    return out


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return F.silu(x[:, :half]).mul_(x[:, half:])  # [T, I]


def gelu_tanh_mul(x: torch.Tensor) -> torch.Tensor:
    """GeGLU (Gemma): gelu(x[:, :I], tanh approximation) * x[:, I:]."""
    half = x.shape[-1] // 2
    return F.gelu(x[:, :half], approximate="tanh").mul_(x[:, half:])  # [T, I]


def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + y


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """torch.sigmoid as a Python function: a builtin's signature cannot be inspected, and the table's kernels are
    checked against their contract (kernel_contracts.py) by theirs."""
    return torch.sigmoid(x)


def moe(
    x: torch.Tensor,
    spec: MoeSpec,
    *,
    linear: Callable[..., torch.Tensor] = F.linear,
    routing: torch.Tensor | None = None,
) -> torch.Tensor:
    """`Moe`: each token routed over all E experts in fp32, as transformers does (`normalize` is Qwen's
    norm_topk_prob); the (token, choice) pairs are then sorted by expert so each held expert runs once, one matmul over
    the tokens that chose it, and its weighted output is added to theirs. Pairs routed to experts held elsewhere add
    nothing here, so the ranks' outputs sum to the whole layer's."""
    gate_up, down, top_k = spec.gate_up, spec.down, spec.top_k
    gate_up_bias, down_bias = spec.gate_up_bias, spec.down_bias
    probs = torch.softmax(F.linear(x if routing is None else routing, spec.router, spec.router_bias).float(), dim=-1)
    weights, chosen = torch.topk(probs, top_k, dim=-1)  # [T, K]
    weights = weights / weights.sum(dim=-1, keepdim=True) if spec.normalize else weights
    expert_scale = spec.expert_scale
    weights = (weights if expert_scale is None else weights * expert_scale[chosen]).flatten()  # [T * K], fp32
    held = len(gate_up)
    local = chosen.flatten() - spec.first_expert  # [T * K]: 0..held-1 for experts held here
    order = local.argsort(stable=True)  # pairs grouped by expert, those held elsewhere below 0 first
    counts = torch.bincount(local.clamp(-1, held) + 1, minlength=held + 2).tolist()  # [below, expert 0.., above]
    out = torch.zeros_like(x)  # [T, H]
    project_up = F.linear if isinstance(gate_up, torch.Tensor) else linear  # floats stacked, or packed weights
    project_down = F.linear if isinstance(down, torch.Tensor) else linear
    start = counts[0]
    for expert, count in enumerate(counts[1:-1]):
        if count == 0:
            continue
        pairs = order[start : start + count]  # [n]
        start += count
        tokens = pairs // top_k  # [n]
        up_bias = None if gate_up_bias is None else gate_up_bias[expert]
        projected = project_up(x.index_select(0, tokens), gate_up[expert], up_bias)  # [n, 2I]
        hidden = _expert_activation(projected, spec.activation, spec.alpha, spec.limit)  # [n, I]
        out_bias = None if down_bias is None else down_bias[expert]
        contribution = project_down(hidden, down[expert], out_bias) * weights[pairs, None]  # [n, H]
        out.index_add_(0, tokens, contribution.to(x.dtype))
    return out


def _expert_activation(x: torch.Tensor, activation: str, alpha: float, limit: float) -> torch.Tensor:
    if activation == "silu":
        return silu_mul(x)
    if activation == "gelu_tanh":
        return gelu_tanh_mul(x)
    return swiglu_oai_mul(x, alpha, limit)


def swiglu_oai_mul(x: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU of a fused [T, 2I] gate_up output (gate first): (up + 1) * g * sigmoid(alpha * g),
    with g = min(gate, limit) and up clamped to [-limit, limit]."""
    half = x.shape[-1] // 2
    gate, up = x[:, :half].clamp(max=limit), x[:, half:].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))
