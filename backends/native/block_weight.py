"""A linear's GGUF blocks as the fused native kernels hold them (block_weight.h's `block_weight`): one interleaved
weight, or a fused linear's parts of different kinds side by side. Shared by the decoder layers and the experts."""

from __future__ import annotations

import ctypes

from sagellm.backends.native.block_layout import InterleavedBlocks

# block_weight.h BLOCK_LINEARS, in its order: each kernel's layout and x_type (InterleavedBlocks')
LINEARS = (
    *("q4x8_f32", "q8x8_f32", "q4x16_f32", "q8x16_f32", "q5kx8_f32", "q5kx16_f32", "q6kx8_f32", "q6kx16_f32"),
    *("q4kx8_f32", "q4kx16_f32", "mxfp4x8_f32", "mxfp4x16_f32", "q4cx8_q8", "q4cx16_q8", "q4kx8_q8", "q4kx16_q8"),
    *("q5kx8_q8", "q5kx16_q8", "q6cx8_q8", "q6cx16_q8"),
)
MAX_PARTS = 3  # block_weight.h's: a fused linear's parts of different kinds (q, k, v)


class BlockWeight(ctypes.Structure):
    """block_weight.h's `block_weight`: a linear's blocks, or its parts side by side."""

    _fields_ = [
        ("data", ctypes.c_void_p * MAX_PARTS),
        ("linear", ctypes.c_int64 * MAX_PARTS),
        ("outputs", ctypes.c_int64 * MAX_PARTS),
        ("parts", ctypes.c_int64),
    ]


def fits_blocks(parts: tuple[InterleavedBlocks, ...], n: int, k: int) -> bool:
    """Whether `parts` are a [n, k] linear the fused kernels read: layouts they know, the outputs summing to n."""
    return (
        0 < len(parts) <= MAX_PARTS
        and all(_linear(p) in LINEARS and p.in_features == k for p in parts)
        and sum(p.out_features for p in parts) == n
    )


def block_weight(parts: tuple[InterleavedBlocks, ...]) -> BlockWeight:
    def each(values: list[int]) -> list[int]:
        return values + [0] * (MAX_PARTS - len(values))

    return BlockWeight(
        (ctypes.c_void_p * MAX_PARTS)(*each([p.data.data_ptr() for p in parts])),
        (ctypes.c_int64 * MAX_PARTS)(*each([LINEARS.index(_linear(p)) for p in parts])),
        (ctypes.c_int64 * MAX_PARTS)(*each([p.out_features for p in parts])),
        len(parts),
    )


def _linear(blocks: InterleavedBlocks) -> str:
    """The name of the kernel that multiplies by `blocks`, without its `linear_` prefix."""
    return f"{blocks.layout}_{blocks.x_type}"
