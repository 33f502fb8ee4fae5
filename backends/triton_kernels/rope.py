"""Triton rotary position embedding (`Rope`, backends/kernel_contracts.py) for q and k in one launch.

One program per (token, head) over q's heads then k's, reading the token's cos/sin row once from the [max_pos, R]
table; a head's dims past R (partial rotary) are copied. q and k may be strided views of a fused qkv projection
output; results go to new contiguous tensors, like the torch op."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    q_out_ptr,
    k_out_ptr,
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cs,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    KEPT: tl.constexpr,
    KEPT_P: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    j = tl.arange(0, HALF_P)
    ok = j < HALF
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + j, mask=ok, other=0.0).to(tl.float32)  # [R/2]
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + j, mask=ok, other=0.0).to(tl.float32)
    if head < NUM_Q_HEADS:
        src = q_ptr + token * stride_qt + head * stride_qh
        dst = q_out_ptr + (token * NUM_Q_HEADS + head) * HEAD_DIM
    else:
        src = k_ptr + token * stride_kt + (head - NUM_Q_HEADS) * stride_kh
        dst = k_out_ptr + (token * NUM_KV_HEADS + head - NUM_Q_HEADS) * HEAD_DIM
    x1 = tl.load(src + j, mask=ok, other=0.0).to(tl.float32)  # [R/2]
    x2 = tl.load(src + HALF + j, mask=ok, other=0.0).to(tl.float32)
    tl.store(dst + j, (x1 * cos - x2 * sin).to(dst.dtype.element_ty), mask=ok)
    tl.store(dst + HALF + j, (x2 * cos + x1 * sin).to(dst.dtype.element_ty), mask=ok)
    if KEPT > 0:  # partial rotary: the head's dims past R, as they were
        r = tl.arange(0, KEPT_P)
        kept = r < KEPT
        tl.store(dst + 2 * HALF + r, tl.load(src + 2 * HALF + r, mask=kept), mask=kept)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`Rope` (backends/kernel_contracts.py) on q, k and cos_sin with a unit-stride last dim; new contiguous q, k."""
    if q.stride(2) != 1 or k.stride(2) != 1 or cos_sin.stride(1) != 1:
        raise ValueError("rope needs q, k and cos_sin with a unit-stride last dim")
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half = cos_sin.shape[1] // 2  # R/2: a table narrower than the head turns its first R dims
    kept = head_dim - 2 * half
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, Hq, D]
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)  # [T, Hk, D]
    _rope_kernel[(tokens, num_q_heads + num_kv_heads)](
        q_out,
        k_out,
        q,
        k,
        positions,
        cos_sin,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HALF=half,
        HALF_P=triton.next_power_of_2(half),
        KEPT=kept,
        KEPT_P=triton.next_power_of_2(max(kept, 1)),
    )
    return q_out, k_out
