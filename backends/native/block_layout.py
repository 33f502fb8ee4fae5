"""Repacks GGUF blocks into the interleaved layouts block_linear.c reads: outputs in groups of 8 or 16 (one vector
register of the kernels' instruction set: AVX2's 8 floats, AVX-512's 16), each block's scales side by side for the
group and the group's values at one input side by side, so one input's weights for the group dequantize into one
vector (the C file's header draws the layouts).

Layouts per kind, in bits per weight (bpw) resident, against the file's:
  q4xG  Q4_0 (4.5), Q4_1 (5.0)                6.0 bpw: per 32 inputs fp32 d, m and a 4-bit q; w = d * q + m.
        Q4_0's m = -8 d.
  q8xG  Q8_0 (8.5), Q5_0 (5.5)                9.0 bpw: per 32 inputs fp32 d and an int8 q (Q5_0's q - 16).
  q4kxG Q4_K (4.5)                            4.75 bpw: per 256 inputs fp32 d, dmin and int8 sc[8], m[8] (the 6-bit
        scales, unpacked), per input a 4-bit q, in chunks of 8 inputs a 32-bit lane per output (the int8 dot
        products' operands); the kernel forms D = d * sc_j, M = -(dmin * m_j).
  q5kxG Q5_K (5.5)                            5.75 bpw: q4kxG's fields, then per 32 inputs a 32-bit lane per output of
        their fifth bits.
  q6kxG Q6_K (6.56)                           8.625 bpw: per 256 inputs fp32 d and int8 sc[16], per input an int8
        q - 32; the kernel forms D = d * sc_j per 16 inputs.
  mxfp4xG MXFP4 (4.25)                        4.25 bpw: per 32 inputs the 4-bit E2M1 codes in q4kxG's chunks of 8
        inputs, then the uint8 E8M0 exponent e per output; w = kvalues_mxfp4[code] * 2^(e - 128), formed in the
        kernel (exact in fp32).
  q4cxG Q4_0, Q4_1 with --int8-activations    6.0 bpw: q4xG's d and m, then the 4-bit q in q4kxG's chunks of 8
        inputs (a 32-bit lane per output, the int8 dot products' operands): read only by block_q8.c's kernel, which
        multiplies x rounded to int8.
  q6cxG Q6_K with --int8-activations          8.625 bpw: q6kxG's d and sc, then q + 32 as unsigned bytes, 4 inputs a
        32-bit lane per output (block_q8.c's operands). Q4_K and Q5_K keep q4kxG and q5kxG, whose chunks already are.
Q4_K fits q4x too (its D, M per 32 inputs as floats: 6.0 bpw); q4kx forms them per 32 inputs in the kernel instead,
so decode streams 4.75 bits a weight for the same floats.
Scales widen from fp16 to fp32 exactly and every D = d * sc is exact in fp32 (at most 11 + 8 bits), so the kernels
dequantize to the same floats as gguf-py, the K-quants included."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sagellm.backends.native.gguf_blocks import fp16, k_scales, q5_0_values, q5_k_fifth_bits, q6_k_values
from sagellm.backends.quantized import BLOCK_BYTES, BLOCK_INPUTS, QuantizedWeight

GROUPS = (8, 16)  # outputs per interleaved group: one vector of 8 (AVX2) or 16 (AVX-512) floats
# The order in which a q4x16 word holds its outputs' nibbles, lowest first: the even outputs in the low 32 bits, the
# odd ones in the high 32 (block_linear.c's header says why); q4x8 holds them in order.
NIBBLE_ORDER = {8: np.arange(8), 16: np.r_[0:16:2, 1:16:2]}
# The layout (without its group width) each kind is interleaved into.
LAYOUT_OF = {
    **{"Q4_0": "q4x", "Q4_1": "q4x", "Q4_K": "q4kx", "Q5_0": "q8x", "Q8_0": "q8x", "Q5_K": "q5kx", "Q6_K": "q6kx"},
    "MXFP4": "mxfp4x",
}
# Per layout: inputs per block, and bytes per block per output of the group (block_linear.c's *_BLOCK / G).
LAYOUT_INPUTS = {"q4x": 32, "q4cx": 32, "q8x": 32, "q4kx": 256, "q5kx": 256, "q6kx": 256, "q6cx": 256, "mxfp4x": 32}
LAYOUT_BYTES = {"q4x": 24, "q4cx": 24, "q8x": 36, "q4kx": 152, "q5kx": 184, "q6kx": 276, "q6cx": 276, "mxfp4x": 17}
# The kinds whose linears also run on x rounded to int8 per 32 inputs (block_q8.c, `--int8-activations`): the
# layout each is packed in then, with its packer where that layout is not its own.
Q8_X_LAYOUT_OF = {"Q4_0": "q4cx", "Q4_1": "q4cx", "Q4_K": "q4kx", "Q5_K": "q5kx", "Q6_K": "q6cx"}
Q8_X_KINDS = tuple(Q8_X_LAYOUT_OF)
# Weights interleaved at a time: the decoders' temporaries (up to ~5 bytes a weight) stay ~20 MB on any tensor.
CHUNK_WEIGHTS = 1 << 22


@dataclass(frozen=True)
class InterleavedBlocks:
    layout: str  # LAYOUT_OF[kind] + group width ("q4x8", "q6kx16", ...): which kernel reads `data`
    data: torch.Tensor  # uint8 [out / G, in / block inputs, bytes per (group, block)]
    out_features: int
    in_features: int
    # What the kernel multiplies the weights by: x as it is ("f32"), or x rounded per 32 inputs to int8 as llama.cpp
    # rounds it ("q8": block_q8.c's int8 dot products). The suffix of the kernel's name.
    x_type: str = "f32"


def interleave(weight: QuantizedWeight, group: int = 8, int8_activations: bool = False) -> InterleavedBlocks | None:
    """The kernels' layout of `weight` in groups of `group` outputs (8 or 16), or None for a shape they do not take
    (outputs not a multiple of `group`, inputs not whole blocks of the kind). `int8_activations`: its linears multiply x
    rounded to int8 where its kind has such a kernel (Q8_X_KINDS), else x as it is.

    Each part is written straight into its place in the result through a strided view, in bytes, a chunk of
    outputs at a time (CHUNK_WEIGHTS), so the temporaries stay small beside the result (all of SmolLM2-135M's Q4
    linears in ~0.1 s)."""
    if group not in GROUPS:
        raise ValueError(f"interleaved groups are {GROUPS} outputs wide, not {group}")
    n, k, kind = weight.out_features, weight.in_features, weight.kind
    if kind not in LAYOUT_OF or n % group or k % BLOCK_INPUTS[kind]:
        return None
    rounded = int8_activations and kind in Q8_X_KINDS
    layout = Q8_X_LAYOUT_OF[kind] if rounded else LAYOUT_OF[kind]
    pack = _CHUNK_PACKERS.get(kind, _PACKERS[kind]) if rounded else _PACKERS[kind]
    blocks = weight.blocks.numpy().reshape(n, k // BLOCK_INPUTS[kind], BLOCK_BYTES[kind])
    data = np.empty((n // group, k // LAYOUT_INPUTS[layout], LAYOUT_BYTES[layout] * group), np.uint8)
    rows = max(group, CHUNK_WEIGHTS // k // group * group)
    for start in range(0, n, rows):
        pack(blocks[start : start + rows], group, data[start // group : (start + rows) // group])
    return InterleavedBlocks(f"{layout}{group}", torch.from_numpy(data), n, k, "q8" if rounded else "f32")


# Each packer writes the layout of blocks [N, B, block bytes] (a chunk of outputs) into `out` [N / G, blocks of the
# layout, bytes per (group, block)].


def _q8_0(blocks: np.ndarray, group: int, out: np.ndarray) -> None:
    _q8x(fp16(blocks, 0), blocks[..., 2:], group, out)


def _q5_0(blocks: np.ndarray, group: int, out: np.ndarray) -> None:
    _q8x(fp16(blocks, 0), q5_0_values(blocks).view(np.uint8), group, out)


def _q8x(d: np.ndarray, q: np.ndarray, group: int, out: np.ndarray) -> None:
    """q8xG from d [N, B] and int8 q (as bytes) [N, B, 32]: per (group, block) float d[G], then q [32 inputs, G]."""
    out.view(np.float32)[..., :group] = _by_group(d, group)
    _part(out, 4 * group, 32, group)[:] = _by_group(q, group)


def _q4_0(blocks: np.ndarray, group: int, out: np.ndarray) -> None:
    _q4_simple(fp16(blocks, 0), -8.0 * fp16(blocks, 0), blocks[..., 2:], group, out)


def _q4_1(blocks: np.ndarray, group: int, out: np.ndarray) -> None:
    _q4_simple(fp16(blocks, 0), fp16(blocks, 2), blocks[..., 4:], group, out)


def _q4_simple(d: np.ndarray, m: np.ndarray, packed: np.ndarray, group: int, out: np.ndarray) -> None:
    """q4xG of Q4_0 / Q4_1, whose block stores input i < 16 in byte i's low nibble and input 16 + i in its high."""
    _q4x_scales(d, m, group, out)
    words = _part(out, 8 * group, 2, 16, group // 2)  # [G, B, low / high half, 16 inputs, word bytes]
    words[:, :, 0], words[:, :, 1] = _nibble_words(packed, group, False), _nibble_words(packed, group, True)


def _q4_0_chunks(blocks: np.ndarray, group: int, out: np.ndarray) -> None:
    _q4_chunks(fp16(blocks, 0), -8.0 * fp16(blocks, 0), blocks[..., 2:], group, out)


def _q4_1_chunks(blocks: np.ndarray, group: int, out: np.ndarray) -> None:
    _q4_chunks(fp16(blocks, 0), fp16(blocks, 2), blocks[..., 4:], group, out)


def _q4_chunks(d: np.ndarray, m: np.ndarray, packed: np.ndarray, group: int, out: np.ndarray) -> None:
    """q4cxG of Q4_0 / Q4_1: q4xG's scales, then per block 4 chunks of 8 inputs (`_chunks_of_32`)."""
    _q4x_scales(d, m, group, out)
    _chunks_of_32(packed, group, out, 8 * group)


def _q4_k(blocks: np.ndarray, group: int, out: np.ndarray) -> None:
    """q4kxG: the scales, then the 4-bit q in 32 chunks of 8 inputs (`_nibble_chunks`; Q4_K's qs follow its 16 bytes
    of scales)."""
    _k_scales(blocks, group, out)
    _nibble_chunks(blocks[..., 16:], group, out)


def _q4x_scales(d: np.ndarray, m: np.ndarray, group: int, out: np.ndarray) -> None:
    """q4xG's scales: per (group, block of 32) float d[G], float m[G], before the block's 32 words."""
    scales = out.view(np.float32)
    scales[..., :group], scales[..., group : 2 * group] = _by_group(d, group), _by_group(m, group)


# Where q5kx's lane holds the fifth bit of a sub-block's input e = 8c + i: bit 8 (i % 4) + 4 (i / 4) + c.
FIFTH_BIT_AT = np.array([8 * (e % 4) + 4 * (e % 8 // 4) + e // 8 for e in range(32)], dtype=np.uint32)


def _q5_k(blocks: np.ndarray, group: int, out: np.ndarray) -> None:
    """q5kxG: q4kxG's fields (Q5_K's qs after its 32 bytes of fifth bits), then per sub-block of 32 inputs a uint32
    per output of their fifth bits, input 8c + i's (c < 4, i < 8) at bit 8 (i % 4) + 4 (i / 4) + c (block_linear.c
    and block_int8.c read them so)."""
    _k_scales(blocks, group, out)
    _nibble_chunks(blocks[..., 48:], group, out)
    fifth = q5_k_fifth_bits(blocks).astype(np.uint32)  # [N, S, 8 sub-blocks, 32]
    lanes = (fifth << FIFTH_BIT_AT).sum(axis=-1, dtype=np.uint32)  # [N, S, 8]
    lanes = np.ascontiguousarray(_by_group(lanes, group))  # [N / G, S, 8, G]
    _part(out, 152 * group, 8, group, 4)[:] = lanes.view(np.uint8).reshape(*lanes.shape, 4)


def _nibble_chunks(qs: np.ndarray, group: int, out: np.ndarray) -> None:
    """q4kxG's and q5kxG's 4-bit q from a Q4_K / Q5_K qs [N, S, 128] (input 64h + l in the low nibble of qs[32h + l],
    64h + 32 + l in its high one): 32 chunks of 8 inputs after the scales, chunk c a 32-bit lane per output whose
    byte i holds input 8c + i low and 8c + 4 + i high."""
    n, s = qs.shape[:2]
    qs = qs.reshape(n, s, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(n, s, 32, 2, 4)  # [N, S, chunk, low / high, byte]
    lanes = _by_group(q[:, :, :, 0] | (q[:, :, :, 1] << 4), group)  # [N / G, S, chunk, byte, G]
    _part(out, 24 * group, 32, group, 4)[:] = np.swapaxes(lanes, -1, -2)


def _k_scales(blocks: np.ndarray, group: int, out: np.ndarray) -> None:
    """The start of q4kxG and q5kxG, from a Q4_K / Q5_K super-block: per (group, super-block of 256) float d[G],
    float dmin[G], int8 sc[8][G], int8 m[8][G] (the 6-bit scales, so the kernel forms each sub-block's D, M as
    gguf-py does)."""
    scales = out.view(np.float32)
    scales[..., :group] = _by_group(fp16(blocks, 0), group)
    scales[..., group : 2 * group] = _by_group(fp16(blocks, 2), group)
    sc, mins = k_scales(blocks[..., 4:16])  # [N, S, 8] each, 0..63
    _part(out, 8 * group, 8, group)[:] = _by_group(sc, group)
    _part(out, 16 * group, 8, group)[:] = _by_group(mins, group)


def _q6_k(blocks: np.ndarray, group: int, out: np.ndarray) -> None:
    """q6kxG: per (group, super-block of 256) float d[G], int8 sc[16][G], then int8 q - 32 [256 inputs, G]."""
    out.view(np.float32)[..., :group] = _by_group(fp16(blocks, 208), group)
    _part(out, 4 * group, 16, group)[:] = _by_group(blocks[..., 192:208], group)
    _part(out, 20 * group, 256, group)[:] = _by_group(q6_k_values(blocks).view(np.uint8), group)


def _q6_k_chunks(blocks: np.ndarray, group: int, out: np.ndarray) -> None:
    """q6cxG: q6kxG's d and sc, then q + 32 (0..63) [64 runs of 4 inputs, G outputs, 4 bytes]: a 32-bit lane per
    output whose byte i holds input 4r + i of run r."""
    out.view(np.float32)[..., :group] = _by_group(fp16(blocks, 208), group)
    _part(out, 4 * group, 16, group)[:] = _by_group(blocks[..., 192:208], group)
    q = (q6_k_values(blocks) + 32).astype(np.uint8).reshape(*blocks.shape[:2], 64, 4)
    _part(out, 20 * group, 64, group, 4)[:] = np.swapaxes(_by_group(q, group), -1, -2)


def _mxfp4(blocks: np.ndarray, group: int, out: np.ndarray) -> None:
    """mxfp4xG from MXFP4 blocks (e, qs[16]: input j in qs[j]'s low nibble, j + 16 in its high one): per (group,
    block of 32) 4 chunks of 8 inputs, a 32-bit lane per output whose byte i holds input 8c + i low and 8c + 4 + i
    high (q4kxG's chunks), then uint8 e[G]."""
    _chunks_of_32(blocks[..., 1:], group, out, 0)
    _part(out, 16 * group, group)[:] = _by_group(blocks[..., 0], group)


def _chunks_of_32(packed: np.ndarray, group: int, out: np.ndarray, start: int) -> None:
    """A block's 4-bit codes [N, B, 16] (input i < 16 in byte i's low nibble, 16 + i in its high: Q4_0's, Q4_1's and
    MXFP4's order) written from byte `start` of each (group, block) as 4 chunks of 8 inputs, chunk c a 32-bit lane per
    output whose byte i holds input 8c + i low and 8c + 4 + i high."""
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:2], 4, 2, 4)  # c, half, i
    lanes = _by_group(codes[..., 0, :] | (codes[..., 1, :] << 4), group)  # [N / G, B, chunk, byte, G]
    _part(out, start, 4, group, 4)[:] = np.swapaxes(lanes, -1, -2)


_PACKERS: dict[str, Callable[[np.ndarray, int, np.ndarray], None]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q4_K": _q4_k,
    "Q5_0": _q5_0,
    "Q8_0": _q8_0,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "MXFP4": _mxfp4,
}
_CHUNK_PACKERS = {"Q4_0": _q4_0_chunks, "Q4_1": _q4_1_chunks, "Q6_K": _q6_k_chunks}


def _nibble_words(packed: np.ndarray, group: int, high: bool) -> np.ndarray:
    """uint8 [N, ..., I] -> the bytes of the inputs' q4 words [N / G, ..., I, G / 2], from the low (or high) nibble
    of each byte: word byte j pairs output NIBBLE_ORDER[2j] (low nibble) with NIBBLE_ORDER[2j + 1] (high)."""
    ordered = _by_group(packed, group)[..., NIBBLE_ORDER[group]]  # [N / G, ..., I, G]
    even, odd = ordered[..., 0::2], ordered[..., 1::2]
    return (even >> 4) | (odd & 0xF0) if high else (even & 0x0F) | (odd << 4)


def _by_group(values: np.ndarray, group: int) -> np.ndarray:
    """[N, B, ...] per-output values as a view [N / group, B, ..., group]: the group's outputs side by side."""
    n, b = values.shape[:2]
    return np.moveaxis(values.reshape(n // group, group, b, *values.shape[2:]), 1, -1)


def _part(data: np.ndarray, start: int, *shape: int) -> np.ndarray:
    """The bytes data[..., start : start + prod(shape)] as a writable view [..., *shape]: one field of every (group,
    block). Splitting the unit-stride last axis is always a view, never a copy."""
    size = int(np.prod(shape))
    return data[..., start : start + size].reshape(*data.shape[:-1], *shape)
