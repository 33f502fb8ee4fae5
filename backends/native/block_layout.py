"""Repacks GGUF blocks into the interleaved layouts block_linear.c reads: outputs in groups of eight, each block's
scales as fp32 and its eight outputs' values at one input side by side, so one input's weights for eight outputs
dequantize into one vector (the C file's header draws the layouts).

Q4_0 becomes q4x8 with m = -8 d (its value is d * (q - 8)); Q4_1 is q4x8 as stored; Q8_0 is q8x8. Scales widen
from fp16 to fp32 exactly, so the kernels dequantize to the same floats as gguf-py."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sagellm.backends.quantized import BLOCK_BYTES, BLOCK_INPUTS, QuantizedWeight

GROUP = 8  # outputs per interleaved group: one 8-float vector


@dataclass(frozen=True)
class InterleavedBlocks:
    layout: str  # "q4x8" or "q8x8": which kernel reads `data`
    data: torch.Tensor  # uint8 [out / 8, in / 32, bytes per (group, block)]
    out_features: int
    in_features: int


def interleave(weight: QuantizedWeight) -> InterleavedBlocks | None:
    """The kernels' layout of `weight`, or None for a shape they do not take (outputs not a multiple of 8).

    Each part is written straight into its place in the result through a strided view, in bytes: no wider
    temporaries than the blocks themselves (all of SmolLM2-135M's linears in ~0.1 s)."""
    n, k = weight.out_features, weight.in_features
    if n % GROUP or k % BLOCK_INPUTS or weight.kind not in BLOCK_BYTES:
        return None
    g, b = n // GROUP, k // BLOCK_INPUTS
    blocks = weight.blocks.numpy().reshape(n, b, BLOCK_BYTES[weight.kind])
    d = _fp16_to_f32(blocks, 0)  # [N, B]
    if weight.kind == "Q8_0":
        data = np.empty((g, b, 4 * GROUP + BLOCK_INPUTS * GROUP), np.uint8)  # per (group, block): 8 d, [32, 8] q
        data.view(np.float32)[..., :GROUP] = _by_group(d)
        data.reshape(g, b, -1, GROUP)[:, :, 4:] = _by_group(blocks[..., 2:])  # q [G, B, 32 inputs, 8 outputs]
        return InterleavedBlocks("q8x8", torch.from_numpy(data), n, k)
    m, packed = (_fp16_to_f32(blocks, 2), blocks[..., 4:]) if weight.kind == "Q4_1" else (-8.0 * d, blocks[..., 2:])
    data = np.empty((g, b, 8 * GROUP + BLOCK_INPUTS * 4), np.uint8)  # per (group, block): 8 d, 8 m, 32 words
    scales = data.view(np.float32)
    scales[..., :GROUP], scales[..., GROUP : 2 * GROUP] = _by_group(d), _by_group(m)
    # Input i's word holds output o's 4-bit value at bits 4o: byte j (little-endian) pairs outputs 2j (low nibble)
    # and 2j + 1. A block stores input i < 16 in byte i's low nibble and input 16 + i in its high one.
    pairs = packed.reshape(g, GROUP // 2, 2, b, BLOCK_INPUTS // 2)  # [G, 4, 2, B, 16]: output 8G + 2j + (0 or 1)
    even, odd = pairs[:, :, 0], pairs[:, :, 1]  # [G, 4, B, 16]
    words = data.reshape(g, b, -1, 4)[:, :, 2 * GROUP :]  # [G, B, 32 inputs, 4 bytes]
    words[:, :, : BLOCK_INPUTS // 2] = np.moveaxis((even & 0x0F) | (odd << 4), 1, -1)
    words[:, :, BLOCK_INPUTS // 2 :] = np.moveaxis((even >> 4) | (odd & 0xF0), 1, -1)
    return InterleavedBlocks("q4x8", torch.from_numpy(data), n, k)


def _fp16_to_f32(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of every block, widened exactly: [N, B]."""
    return blocks[..., at : at + 2].view(np.float16)[..., 0].astype(np.float32)


def _by_group(values: np.ndarray) -> np.ndarray:
    """[N, B, ...] per-output values as a view [N / 8, B, ..., 8]: the group's eight outputs side by side."""
    n, b = values.shape[:2]
    return np.moveaxis(values.reshape(n // GROUP, GROUP, b, *values.shape[2:]), 1, -1)
