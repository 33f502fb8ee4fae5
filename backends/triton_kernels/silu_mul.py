"""Triton SiLU-and-multiply for the gated MLP: out = silu(x[:, :I]) * x[:, I:], computed in fp32 registers.

Fusing it avoids materialising silu(gate) before the multiply: one read of [T, 2I], one write of [T, I]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(out_ptr, x_ptr, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)  # [BLOCK]
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=ok, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """`GatedActivation` (backends/kernel_contracts.py) on rows with a unit-stride last dim."""
    if x.stride(-1) != 1:
        raise ValueError("silu_mul needs rows with a unit-stride last dim")
    rows, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, inter), dtype=x.dtype, device=x.device)  # [T, I]
    block = min(_BLOCK, triton.next_power_of_2(inter))
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](out, x, x.stride(0), out.stride(0), INTER=inter, BLOCK=block)
    return out
