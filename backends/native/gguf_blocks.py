"""Decoders of llama.cpp's block bytes (ggml-common.h's block_q5_0, block_q4_K, block_q5_K, block_q6_K) into the
small integers and scales block_layout.py interleaves, the same values gguf-py's `dequantize` multiplies out.

Kept apart from the interleaving so each bit map is read in one place, next to the ggml code it mirrors: the
K-quants' 6-bit scales (`get_scale_min_k4`), Q5_0's and Q5_K's fifth bits, Q6_K's two high bits. Every function
takes blocks as uint8 [N, B, block bytes] and works on whole arrays (no per-block Python)."""

from __future__ import annotations

import numpy as np


def fp16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of every block, widened exactly to fp32: [N, B]."""
    return blocks[..., at : at + 2].view(np.float16)[..., 0].astype(np.float32)


def q5_0_values(blocks: np.ndarray) -> np.ndarray:
    """Q5_0 [N, B, 22] (fp16 d, u32 qh, u8 qs[16]) -> int8 [N, B, 32] q - 16, so w = d * value. Input e < 16 is the
    low nibble of qs[e], input 16 + e its high one; bit e of the little-endian qh is input e's fifth bit."""
    qs = blocks[..., 6:22]
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # [N, B, 32]
    fifth = np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little")  # [N, B, 32]: bit e of qh
    return (nibbles | (fifth << 4)).astype(np.int8) - np.int8(16)


def k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of Q4_K / Q5_K [N, S, 12] -> the 6-bit (sc, m) of the 8 sub-blocks, uint8 [N, S, 8] each
    (ggml's get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes 0-3 and 4-7, sub-blocks 4-7 from the
    nibbles of bytes 8-11 and the top 2 bits of bytes 0-7)."""
    d, m, low = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (low & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (low >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mins


def k_steps(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K [N, S, bytes] -> fp32 (D, M) [N, S, 8]: sub-block j's w = D * q + M, D = d * sc_j and
    M = -(dmin * m_j), each product exact in fp32 (an fp16 times a 6-bit integer), as gguf-py forms them."""
    sc, mins = k_scales(blocks[..., 4:16])
    steps = fp16(blocks, 0)[..., None] * sc.astype(np.float32)
    offsets = -(fp16(blocks, 2)[..., None] * mins.astype(np.float32))
    return steps, offsets


def q5_k_fifth_bits(blocks: np.ndarray) -> np.ndarray:
    """Q5_K [N, S, 176] -> uint8 [N, S, 8, 32] (0 or 1): the fifth bit of sub-block j's input l, bit j of qh[l]."""
    qh = blocks[..., 16:48, None]  # [N, S, 32, 1]
    return np.moveaxis(np.unpackbits(qh, axis=-1, bitorder="little"), -1, -2)  # [N, S, 8 sub-blocks, 32]


def q6_k_values(blocks: np.ndarray) -> np.ndarray:
    """Q6_K [N, S, 210] (ql[128], qh[64], int8 scales[16], fp16 d) -> int8 [N, S, 256] q - 32, so input e's w is
    d * scales[e / 16] * value. Half h (128 inputs) reads ql[64h..], qh[32h..]; its quarter c's input l has its low
    4 bits in ql[64h + 32 (c % 2) + l] (low nibble for c < 2) and its high 2 at bits 2c of qh[32h + l]."""
    n, s = blocks.shape[:2]
    ql = blocks[..., :128].reshape(n, s, 2, 2, 32)  # [N, S, half, c % 2, l]
    qh = blocks[..., 128:192].reshape(n, s, 2, 1, 32)  # [N, S, half, 1, l]
    low = np.stack([ql & 0x0F, ql >> 4], axis=3).reshape(n, s, 2, 4, 32)  # quarter c = 2 (c >= 2) + c % 2
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(4, 1)) & 0x03  # [N, S, half, quarter, l]
    return ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(n, s, 256)
