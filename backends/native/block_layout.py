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
    """The kernels' layout of `weight`, or None for a shape they do not take (outputs not a multiple of 8)."""
    n, k = weight.out_features, weight.in_features
    if n % GROUP or k % BLOCK_INPUTS or weight.kind not in BLOCK_BYTES:
        return None
    blocks = weight.blocks.numpy().reshape(n, k // BLOCK_INPUTS, BLOCK_BYTES[weight.kind])
    d = _fp16_to_f32(blocks[..., 0:2])  # [N, B]
    if weight.kind == "Q8_0":
        q = _by_group(blocks[..., 2:]).reshape(n // GROUP, -1, BLOCK_INPUTS * GROUP)  # int8 bytes [G, B, 32 * 8]
        data = np.concatenate([_by_group(d), q], -1)
        return InterleavedBlocks("q8x8", torch.from_numpy(np.ascontiguousarray(data)), n, k)
    if weight.kind == "Q4_1":
        m, packed = _fp16_to_f32(blocks[..., 2:4]), blocks[..., 4:]
    else:
        m, packed = -8.0 * d, blocks[..., 2:]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.uint32)  # [N, B, 32]: low nibbles first
    words = (_by_group(q) << (4 * np.arange(GROUP, dtype=np.uint32))).sum(-1, dtype=np.uint32)  # [G, B, 32]
    data = np.concatenate([_by_group(d), _by_group(m), words.view(np.uint8)], -1)
    return InterleavedBlocks("q4x8", torch.from_numpy(np.ascontiguousarray(data)), n, k)


def _fp16_to_f32(pairs: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pairs).view(np.float16)[..., 0].astype(np.float32)


def _by_group(values: np.ndarray) -> np.ndarray:
    """[N, B, ...] per-output values -> [N / 8, B, ..., 8]; fp32 scales come back as their bytes, [G, B, 32]."""
    n, b = values.shape[:2]
    grouped = np.ascontiguousarray(np.moveaxis(values.reshape(n // GROUP, GROUP, b, *values.shape[2:]), 1, -1))
    return grouped.view(np.uint8) if grouped.dtype == np.float32 else grouped
