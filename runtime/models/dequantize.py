"""GGUF tensor bytes to float32, a whole tensor in a few numpy operations for the kinds models ship in most.

gguf-py's `dequantize` works through a tensor sixteen rows at a time in Python (all of SmolLM2-135M: ~0.5 s, 1 s
under a profiler); here Q4_0, Q4_1, Q8_0, F16, BF16 and F32 are unpacked by whole-tensor array operations, in place
where they can be (~0.2 s), doing the same float32 arithmetic in the same order as gguf-py, so the results are bit
for bit its own; so is MXFP4 (gpt-oss's experts: gguf-py takes ~40 s for gpt-oss-20b's). Other kinds (the
K-quants, Q5_*) go through gguf-py."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

Q = GGMLQuantizationType


def dequantize(data: np.ndarray, kind: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """`data` (a tensor's stored bytes, uint8) as a float32 array of `shape` (numpy order) that owns its memory."""
    fast = _FAST.get(kind)
    if fast is not None:
        return fast(data.reshape(-1, GGML_QUANT_SIZES[kind][1])).reshape(shape)
    rows = data.reshape(math.prod(shape[:-1]), -1)  # gguf-py bounds its memory by working on rows
    return gguf_dequantize(rows, kind).reshape(shape)


def _f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float32).copy()  # [n, 1]; the mapped file's bytes are read-only


def _f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float16).astype(np.float32)


def _bf16(blocks: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32."""
    values = blocks.view(np.uint16).astype(np.uint32)  # [n, 1]
    values <<= 16
    return values.view(np.float32)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    """Block: fp16 d, 32 int8 q; value d * q."""
    values = blocks[:, 2:].view(np.int8).astype(np.float32)  # [B, 32]
    values *= _fp16(blocks, 0)
    return values


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    """Block: fp16 d, 16 bytes of nibbles (low ones are values 0-15, high ones 16-31); value d * (q - 8)."""
    values = _nibbles(blocks[:, 2:])
    values -= 8
    values *= _fp16(blocks, 0)
    return values


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    """Block: fp16 d, fp16 m, 16 bytes of nibbles as in Q4_0; value d * q + m."""
    values = _nibbles(blocks[:, 4:])
    values *= _fp16(blocks, 0)
    values += _fp16(blocks, 2)
    return values


# ggml's kvalues_mxfp4: the E2M1 values doubled, by 4-bit code (bit 3 the sign); MXFP4 scales them by half its
# exponent's power of two.
MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)


def _mxfp4(blocks: np.ndarray) -> np.ndarray:
    """Block: E8M0 exponent e, 16 bytes of 4-bit codes ordered as Q4_0's; value MXFP4_VALUES[code] * 2^(e - 128)."""
    codes = np.concatenate([blocks[:, 1:] & 0x0F, blocks[:, 1:] >> 4], axis=1)  # [B, 32]
    values = MXFP4_VALUES[codes]  # [B, 32]
    values *= e8m0_half(blocks[:, :1])
    return values


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """Exponent bytes as float32 2^(e - 128), built from bits as ggml's GGML_E8M0_TO_FP32_HALF (2^-128 and 2^-127
    subnormal)."""
    wide = e.astype(np.uint32)
    bits = np.where(wide < 2, np.uint32(0x00200000) << (wide & 1), (wide - 1) << 23).astype(np.uint32)
    return bits.view(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """[B, 16] bytes -> float32 [B, 32]: each block's low nibbles, then its high ones."""
    values = np.empty((packed.shape[0], 2, packed.shape[1]), np.float32)  # [B, 2, 16]
    values[:, 0] = packed & 0x0F
    values[:, 1] = packed >> 4
    return values.reshape(packed.shape[0], -1)


def _fp16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of every block, as float32 [B, 1]."""
    return blocks[:, at : at + 2].view(np.float16).astype(np.float32)


_FAST: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    Q.F32: _f32,
    Q.F16: _f16,
    Q.BF16: _bf16,
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.MXFP4: _mxfp4,
}
