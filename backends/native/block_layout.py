"""Repacks GGUF blocks into the interleaved layouts block_linear.c reads: outputs in groups of 8 or 16 (one vector
register of the kernels' instruction set: AVX2's 8 floats, AVX-512's 16), each block's scales as fp32 and the
group's values at one input side by side, so one input's weights for the group dequantize into one vector (the C
file's header draws the layouts).

Q4_0 becomes q4x8 / q4x16 with m = -8 d (its value is d * (q - 8)); Q4_1 is q4xG as stored; Q8_0 is q8xG. Scales
widen from fp16 to fp32 exactly, so the kernels dequantize to the same floats as gguf-py."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sagellm.backends.quantized import BLOCK_BYTES, BLOCK_INPUTS, QuantizedWeight

GROUPS = (8, 16)  # outputs per interleaved group: one vector of 8 (AVX2) or 16 (AVX-512) floats
# The order in which a q4x16 word holds its outputs' nibbles, lowest first: the even outputs in the low 32 bits, the
# odd ones in the high 32 (block_linear.c's header says why); q4x8 holds them in order.
NIBBLE_ORDER = {8: np.arange(8), 16: np.r_[0:16:2, 1:16:2]}


@dataclass(frozen=True)
class InterleavedBlocks:
    layout: str  # "q4x8", "q8x8", "q4x16" or "q8x16": which kernel reads `data`
    data: torch.Tensor  # uint8 [out / G, in / 32, bytes per (group, block)]
    out_features: int
    in_features: int


def interleave(weight: QuantizedWeight, group: int = 8) -> InterleavedBlocks | None:
    """The kernels' layout of `weight` in groups of `group` outputs (8 or 16), or None for a shape they do not take
    (outputs not a multiple of `group`).

    Each part is written straight into its place in the result through a strided view, in bytes: no wider
    temporaries than the blocks themselves (all of SmolLM2-135M's linears in ~0.1 s)."""
    if group not in GROUPS:
        raise ValueError(f"interleaved groups are {GROUPS} outputs wide, not {group}")
    n, k = weight.out_features, weight.in_features
    if n % group or k % BLOCK_INPUTS or weight.kind not in BLOCK_BYTES:
        return None
    g, b = n // group, k // BLOCK_INPUTS
    blocks = weight.blocks.numpy().reshape(n, b, BLOCK_BYTES[weight.kind])
    d = _fp16_to_f32(blocks, 0)  # [N, B]
    if weight.kind == "Q8_0":
        data = np.empty((g, b, 4 * group + BLOCK_INPUTS * group), np.uint8)  # per (group, block): G d, [32, G] q
        data.view(np.float32)[..., :group] = _by_group(d, group)
        data.reshape(g, b, -1, group)[:, :, 4:] = _by_group(blocks[..., 2:], group)  # q [G, B, 32 inputs, G]
        return InterleavedBlocks(f"q8x{group}", torch.from_numpy(data), n, k)
    m, packed = (_fp16_to_f32(blocks, 2), blocks[..., 4:]) if weight.kind == "Q4_1" else (-8.0 * d, blocks[..., 2:])
    data = np.empty((g, b, 8 * group + BLOCK_INPUTS * group // 2), np.uint8)  # per (group, block): d, m, 32 words
    scales = data.view(np.float32)
    scales[..., :group], scales[..., group : 2 * group] = _by_group(d, group), _by_group(m, group)
    # Input i's word holds the group's 4-bit values in NIBBLE_ORDER: byte j (little-endian) pairs its outputs 2j (low
    # nibble) and 2j + 1. A block stores input i < 16 in byte i's low nibble and input 16 + i in its high one.
    ordered = packed.reshape(g, group, b, -1)[:, NIBBLE_ORDER[group]]  # [G, group, B, 16]
    pairs = ordered.reshape(g, group // 2, 2, b, BLOCK_INPUTS // 2)  # [G, group / 2, 2, B, 16]
    even, odd = pairs[:, :, 0], pairs[:, :, 1]  # [G, group / 2, B, 16]
    words = data.reshape(g, b, -1, group // 2)[:, :, 16:]  # [G, B, 32 inputs, word bytes]: after d and m's 16 words
    words[:, :, : BLOCK_INPUTS // 2] = np.moveaxis((even & 0x0F) | (odd << 4), 1, -1)
    words[:, :, BLOCK_INPUTS // 2 :] = np.moveaxis((even >> 4) | (odd & 0xF0), 1, -1)
    return InterleavedBlocks(f"q4x{group}", torch.from_numpy(data), n, k)


def _fp16_to_f32(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of every block, widened exactly: [N, B]."""
    return blocks[..., at : at + 2].view(np.float16)[..., 0].astype(np.float32)


def _by_group(values: np.ndarray, group: int) -> np.ndarray:
    """[N, B, ...] per-output values as a view [N / group, B, ..., group]: the group's outputs side by side."""
    n, b = values.shape[:2]
    return np.moveaxis(values.reshape(n // group, group, b, *values.shape[2:]), 1, -1)
