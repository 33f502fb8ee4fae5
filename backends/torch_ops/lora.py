"""Batched LoRA: each row of a batch gets its own adapter's low-rank update added to the base linear's output,
out[t] += (x[t] @ A[s].T) @ B[s].T with s = row_slots[t], and a row of slot -1 (no adapter) is left as it was.

Rows of requests on different adapters (and on none) share one base matmul. On the CPU their updates share two more:
every row is shrunk by every slot's A at once (x @ [A_0; ..; A_S-1].T, [T, S R]), the columns of the slots a row does
not use are zeroed by a mask, and one expand by every slot's B adds the updates into out. That is S times the
multiplies a per-slot grouping does (which gathers each slot's rows and runs two small matmuls over them), but three
calls a linear instead of four or more per slot: at decode the calls are the cost, and S R is small beside the
linear's own width. The mask depends only on the step's rows, so it is made once a step (the same `row_slots` tensor
reaches every linear) and reused. A batch with no adapter rows does nothing. Both products are taken in float32, and
out keeps its dtype.

The slots are the stacked adapters the caller keeps: lora_a [S, R, K] and lora_b [S, N, R], each adapter's rank
padded to R with zeros (which adds nothing) and its scaling (alpha / r) folded into its B. lora_b is read as
[S R, N]: pass a transposed view of a contiguous [S, R, N] (as the engine's slots do) and no copy is made. This is
the CPU op and the reference the CUDA backend's triton kernel (triton_kernels/lora.py) is checked against."""

from __future__ import annotations

import torch

_mask: tuple[torch.Tensor, int, int, torch.Tensor | None] | None = None  # (row_slots, S, R, its mask) of the step


def add_lora(
    out: torch.Tensor, x: torch.Tensor, row_slots: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor
) -> torch.Tensor:
    """`AddLora` (backends/kernel_contracts.py)."""
    num_slots, rank = lora_a.shape[0], lora_a.shape[1]
    mask = _slot_mask(row_slots, num_slots, rank)
    if mask is None:
        return out
    shrunk = torch.mm(x.float(), lora_a.reshape(num_slots * rank, -1).float().t())  # [T, S R]
    shrunk.mul_(mask)
    expand = lora_b.transpose(1, 2).reshape(num_slots * rank, -1).float()  # [S R, N]
    if out.dtype == torch.float32:
        out.addmm_(shrunk, expand)
    else:
        out.add_(torch.mm(shrunk, expand).to(out.dtype))
    return out


def _slot_mask(row_slots: torch.Tensor, num_slots: int, rank: int) -> torch.Tensor | None:
    """[T, S R] float32: 1 where column j belongs to row t's slot (j // R == slot); None when no row has one."""
    global _mask
    cached = _mask
    if cached is not None and cached[0] is row_slots and cached[1:3] == (num_slots, rank):
        return cached[3]
    mask = None
    if row_slots.numel() and int(row_slots.max()) >= 0:
        columns = torch.arange(num_slots, device=row_slots.device).repeat_interleave(rank)  # [S R]: each one's slot
        mask = (row_slots[:, None] == columns[None, :]).float()
    _mask = (row_slots, num_slots, rank, mask)
    return mask
