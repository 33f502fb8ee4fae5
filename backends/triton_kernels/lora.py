"""Triton batched LoRA (punica's shrink and expand): out[t] += (x[t] @ A[s].T) @ B[s].T with s = row_slots[t], rows of
slot -1 left as they were; torch_ops/lora.py is the reference and says what the stacked slots hold.

Two kernels, each over (row block, slot) programs: a program reads its block's row slots and works only on the rows
of its own slot, so a row block with one request's rows (a prefill) costs one program's work and the others return
at once, and each adapter's A and B are read once per row block that uses them (decode: once per step). Nothing is
sorted or gathered on the host, and nothing syncs with it: a batch without adapter rows launches programs that all
return. The shrink writes x @ A[s].T into an fp32 [T, R] buffer; the expand adds buffer @ B[s].T into out's rows of
its slot, each element of out written by the one program of its row's slot, so no atomics.

The products are tl.dot in fp32 with input_precision "ieee": fp32 like the torch op (no TF32 rounding of x or the
buffer), and exact under the interpreter, whose bf16 dot multiplies raw bits."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 64  # inputs per shrink step
BLOCK_N = 64  # outputs per expand program
MAX_BLOCK_T = 64  # tl.dot wants 16 rows at least: decode's few rows fill a block of 16
MIN_BLOCK_R = 16  # and 16 wide: ranks 8 and below are padded (masked) to it


@triton.jit
def _shrink_kernel(
    buffer_ptr,
    x_ptr,
    slots_ptr,
    a_ptr,
    tokens,
    in_features,
    rank,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ar,
    stride_ak,
    stride_bt,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    slot = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mine = tl.load(slots_ptr + t, mask=t < tokens, other=-1) == slot  # [BT]: this block's rows of this slot
    if tl.max(mine.to(tl.int32), axis=0) == 0:
        return
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rank
    k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + t.to(tl.int64)[:, None] * stride_xt  # [BT, 1]
    a_rows = a_ptr + slot.to(tl.int64) * stride_as + r[None, :] * stride_ar  # [1, BR]: A[s] read transposed
    acc = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
    for first in range(0, in_features, BLOCK_K):
        kk = first + k
        k_ok = kk < in_features
        xs = tl.load(x_rows + kk[None, :] * stride_xk, mask=mine[:, None] & k_ok[None, :], other=0.0)  # [BT, BK]
        a = tl.load(a_rows + kk[:, None] * stride_ak, mask=k_ok[:, None] & r_ok[None, :], other=0.0)  # [BK, BR]
        acc = tl.dot(xs.to(tl.float32), a.to(tl.float32), acc, input_precision="ieee")
    buffer = buffer_ptr + t.to(tl.int64)[:, None] * stride_bt + r[None, :]
    tl.store(buffer, acc, mask=mine[:, None] & r_ok[None, :])


@triton.jit
def _expand_kernel(
    out_ptr,
    buffer_ptr,
    slots_ptr,
    b_ptr,
    tokens,
    out_features,
    rank,
    stride_ot,
    stride_on,
    stride_bt,
    stride_bs,
    stride_bn,
    stride_br,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    slot = tl.program_id(2)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mine = tl.load(slots_ptr + t, mask=t < tokens, other=-1) == slot  # [BT]
    if tl.max(mine.to(tl.int32), axis=0) == 0:
        return
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < out_features
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rank
    t64 = t.to(tl.int64)[:, None]  # [BT, 1]
    shrunk = tl.load(buffer_ptr + t64 * stride_bt + r[None, :], mask=mine[:, None] & r_ok[None, :], other=0.0)
    b_cols = b_ptr + slot.to(tl.int64) * stride_bs + n.to(tl.int64)[None, :] * stride_bn  # [1, BN]: B[s] transposed
    b = tl.load(b_cols + r[:, None] * stride_br, mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BR, BN]
    update = tl.dot(shrunk, b.to(tl.float32), input_precision="ieee")  # [BT, BN]
    out = out_ptr + t64 * stride_ot + n.to(tl.int64)[None, :] * stride_on
    ok = mine[:, None] & n_ok[None, :]
    summed = tl.load(out, mask=ok, other=0.0).to(tl.float32) + update  # rounded once, to out's dtype
    tl.store(out, summed.to(out_ptr.dtype.element_ty), mask=ok)


def add_lora(
    out: torch.Tensor, x: torch.Tensor, row_slots: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> torch.Tensor:
    """`AddLora` (backends/kernel_contracts.py), on tensors of any strides but row_slots'."""
    tokens, in_features = x.shape
    num_slots, rank, _ = lora_a.shape
    out_features = lora_b.shape[1]
    if tokens == 0 or num_slots == 0:
        return out
    if row_slots.stride(0) != 1:
        raise ValueError("add_lora needs contiguous row_slots")
    buffer = torch.empty((tokens, rank), dtype=torch.float32, device=x.device)  # [T, R]: rows of -1 never written
    block_t = min(MAX_BLOCK_T, max(16, triton.next_power_of_2(tokens)))
    block_r = max(MIN_BLOCK_R, triton.next_power_of_2(rank))
    row_blocks = triton.cdiv(tokens, block_t)
    _shrink_kernel[(row_blocks, num_slots)](
        buffer,
        x,
        row_slots,
        lora_a,
        tokens,
        in_features,
        rank,
        x.stride(0),
        x.stride(1),
        *lora_a.stride(),
        buffer.stride(0),
        BLOCK_T=block_t,
        BLOCK_R=block_r,
        BLOCK_K=BLOCK_K,
    )
    _expand_kernel[(triton.cdiv(out_features, BLOCK_N), row_blocks, num_slots)](
        out,
        buffer,
        row_slots,
        lora_b,
        tokens,
        out_features,
        rank,
        out.stride(0),
        out.stride(1),
        buffer.stride(0),
        *lora_b.stride(),
        BLOCK_T=block_t,
        BLOCK_R=block_r,
        BLOCK_N=BLOCK_N,
    )
    return out
