"""Triton linear on MXFP4 weights kept as GGML blocks (gpt-oss's experts): y = x W^T (+ bias), W never dequantized
in memory, so the CUDA backend holds gpt-oss-20b's experts in ~13 GB rather than ~40 GB of floats.

A block is one E8M0 exponent byte e and 16 bytes qs: input j of the block is qs[j]'s low nibble, input j + 16 its
high one, each an E2M1 code. Like gguf-py (gguf.quants.MXFP4) a code reads as ggml's doubled value (kvalues_mxfp4:
0, 1, 2, 3, 4, 6, 8, 12, sign in bit 3) times 2^(e - 128), the scale built from its float bits, so every weight is
exactly gguf-py's float. One program per [BLOCK_T, BLOCK_N] tile of y steps over K a few blocks at a time: it loads
each qs byte once, decodes both nibbles in registers and multiplies the low and the high ones against the two halves
of each block's x.

The products are tl.dot in fp32 with input_precision "ieee" (not TF32): both operands exact for fp32 and bf16 x,
FMA on a GPU like torch's fp32 linear, one numpy matmul under the interpreter, whose bf16 dot multiplies raw bits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sagellm.backends.quantized import BLOCK_INPUTS, QuantizedWeight

BLOCK_N = 64
BLOCK_K = 128  # inputs per step: 4 MXFP4 blocks, 64 qs bytes of each row
MAX_BLOCK_T = 64  # tl.dot wants 16 rows at least: decode's few rows fill a tile of 16


@dataclass(frozen=True)
class Mxfp4Weight:
    """A linear's [out, in] weight as GGML MXFP4 blocks on the device, as `mxfp4_linear` reads it."""

    blocks: torch.Tensor  # uint8 [out_features, in_features / 32 * 17]
    in_features: int

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]


def mxfp4_weight(parts: list[QuantizedWeight], device: torch.device) -> Mxfp4Weight | None:
    """The rows of `parts` stacked as one Mxfp4Weight on `device` when every part is MXFP4 of one width, else None
    (other kinds are read as floats)."""
    whole = QuantizedWeight.concat(parts)
    if whole is None or whole.kind != "MXFP4":
        return None
    return Mxfp4Weight(whole.blocks.to(device).contiguous(), whole.in_features)


@triton.jit
def _e2m1_doubled(code):
    """ggml's kvalues_mxfp4[code] as int32: bit 3 the sign, bits 1-2 the exponent, bit 0 the mantissa."""
    exponent = (code >> 1) & 3
    mantissa = code & 1
    magnitude = tl.where(exponent == 0, mantissa, ((2 + mantissa) << exponent) >> 1)
    return tl.where((code & 8) != 0, -magnitude, magnitude)


@triton.jit
def _mxfp4_linear_kernel(
    y_ptr,
    x_ptr,
    blocks_ptr,
    bias_ptr,
    tokens,
    out_features,
    stride_xt,
    stride_xk,
    stride_yt,
    stride_w,
    NUM_BLOCKS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = t < tokens
    n_ok = n < out_features
    p = tl.arange(0, BLOCK_K // 2)  # qs byte p of a step: block p // 16, its inputs p % 16 (low) and p % 16 + 16
    j = p % 16
    t64 = t.to(tl.int64)[:, None]  # [BT, 1]
    rows = blocks_ptr + n.to(tl.int64)[None, :] * stride_w  # [1, BN]
    x_rows = x_ptr + t64 * stride_xt
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for first in range(0, NUM_BLOCKS, BLOCK_K // 32):
        b = first + p // 16  # [BK/2]: the block each byte is in
        b_ok = b < NUM_BLOCKS
        w_mask = b_ok[:, None] & n_ok[None, :]
        block = rows + b[:, None] * 17  # [BK/2, BN]
        e = tl.load(block, mask=w_mask, other=0).to(tl.int32)
        qs = tl.load(block + 1 + j[:, None], mask=w_mask, other=0).to(tl.int32)
        # gguf-py's e8m0_to_fp32_half: 2^(e - 128) from its bits (fp32 denormals for e < 2)
        scale = tl.where(e < 2, 0x00200000 << (e & 1), (e - 1) << 23).to(tl.float32, bitcast=True)
        w_lo = _e2m1_doubled(qs & 15).to(tl.float32) * scale  # [BK/2, BN]
        w_hi = _e2m1_doubled(qs >> 4).to(tl.float32) * scale
        x_mask = t_ok[:, None] & b_ok[None, :]
        x_lo = x_rows + (b * 32 + j)[None, :] * stride_xk  # [BT, BK/2]: the inputs of the low nibbles
        x_hi = x_lo + 16 * stride_xk
        acc = tl.dot(tl.load(x_lo, mask=x_mask, other=0.0).to(tl.float32), w_lo, acc, input_precision="ieee")
        acc = tl.dot(tl.load(x_hi, mask=x_mask, other=0.0).to(tl.float32), w_hi, acc, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + t64 * stride_yt + n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


def mxfp4_linear(x: torch.Tensor, weight: Mxfp4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] (fp32 or bf16) -> [T, N] in x's dtype (+ bias [N]), summed in fp32."""
    tokens, in_features = x.shape
    if in_features != weight.in_features:
        raise ValueError(f"mxfp4_linear: x has {in_features} inputs, the weight {weight.in_features}")
    if weight.blocks.stride(1) != 1:
        raise ValueError("mxfp4_linear needs weight rows with a unit-stride byte dim")
    out_features = weight.out_features
    y = torch.empty((tokens, out_features), dtype=x.dtype, device=x.device)  # [T, N]
    if tokens == 0:
        return y
    block_t = min(MAX_BLOCK_T, max(16, triton.next_power_of_2(tokens)))
    grid = (triton.cdiv(out_features, BLOCK_N), triton.cdiv(tokens, block_t))
    _mxfp4_linear_kernel[grid](
        y,
        x,
        weight.blocks,
        bias if bias is not None else y,
        tokens,
        out_features,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        weight.blocks.stride(0),
        NUM_BLOCKS=in_features // BLOCK_INPUTS["MXFP4"],
        BLOCK_T=block_t,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        HAS_BIAS=bias is not None,
    )
    return y
