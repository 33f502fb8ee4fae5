"""Numpy encoders of llama.cpp's K-quants (Q4_K, Q5_K, Q6_K), which gguf-py can only decode, and llama.cpp's
per-tensor type rule of a Q4_K_M file: the tests write tiny Q4_K_M models with them, and `sagellm bench make-gguf`
(synthetic_gguf.py) writes 1B- and 7B-shaped ones for the memory and speed checks no downloaded file is needed for.

Every sub-block gets its own scale (and for Q4_K / Q5_K its own min), as llama.cpp's quantizers give: a kernel that
ignored the 6-bit scales, mixed up their bit map or a sub-block's position would fail against gguf-py's
dequantization of these blocks. Q6_K's scales are signed, as llama.cpp's are (make_qx_quants divides by minus the
value of largest magnitude). Rounding is plain nearest, not llama.cpp's error-minimizing search: valid blocks with
varied fields are what is needed, not the best ones (the kernels' speed and memory do not depend on the rounding)."""

from __future__ import annotations

import re

import gguf
import numpy as np
from gguf import GGMLQuantizationType

QK_K = 256  # inputs per super-block


def quantize(values: np.ndarray, qtype: GGMLQuantizationType | str) -> np.ndarray:
    """`values` [rows, cols] as raw GGUF blocks uint8 [rows, row bytes]: this module's encoders for the K-quants,
    gguf-py's for the kinds it can write."""
    qtype = GGMLQuantizationType[qtype] if isinstance(qtype, str) else qtype
    values = np.ascontiguousarray(values, dtype=np.float32)
    encoders = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}
    if qtype.name in encoders:
        return encoders[qtype.name](values)
    return gguf.quants.quantize(values, qtype)


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """[rows, cols] (cols a multiple of 256) -> uint8 [rows, cols / 256 * 144]: fp16 d, fp16 dmin, 12 scale bytes,
    qs[128] (sub-block 2c in the low nibbles of qs[32c ..], 2c + 1 in the high)."""
    x = _super_blocks(values)
    d, dmin, sc, mins, q = _scaled_with_min(x, 15)
    q = q.reshape(-1, 4, 2, 32)  # [n, chunk of 64, half, 32]
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = [d.view(np.uint8), dmin.view(np.uint8), _pack_k_scales(sc, mins), qs]
    return np.concatenate(blocks, axis=1).reshape(values.shape[0], -1)


def quantize_q5_k(values: np.ndarray) -> np.ndarray:
    """-> uint8 [rows, cols / 256 * 176]: d, dmin, 12 scale bytes, qh[32] (bit j of qh[l]: the fifth bit of
    sub-block j's input l), qs[128] (the low 4 bits, as Q4_K's)."""
    x = _super_blocks(values)
    d, dmin, sc, mins, q = _scaled_with_min(x, 31)
    low = (q & 0x0F).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    fifth = (q >> 4).reshape(-1, 8, 32)  # [n, sub-block j, l]
    qh = np.packbits(np.moveaxis(fifth, 1, 2), axis=-1, bitorder="little").reshape(-1, 32)  # bit j of qh[l]
    blocks = [d.view(np.uint8), dmin.view(np.uint8), _pack_k_scales(sc, mins), qh, qs]
    return np.concatenate(blocks, axis=1).reshape(values.shape[0], -1)


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """-> uint8 [rows, cols / 256 * 210]: ql[128], qh[64], int8 scales[16] (one per 16 inputs, signed), fp16 d; input
    e is d * scales[e / 16] * (q - 32), q 6 bits."""
    x = _super_blocks(values)
    runs = x.reshape(len(x), 16, 16)
    at = np.abs(runs).argmax(axis=-1)[..., None]
    scale = -np.take_along_axis(runs, at, axis=-1)[..., 0] / 32  # [n, 16], signed like llama.cpp's
    d = (np.abs(scale).max(axis=-1, keepdims=True) / 127).astype(np.float16)
    sc = np.clip(np.rint(_divide(scale, d.astype(np.float32))), -127, 127).astype(np.int8)
    step = d.astype(np.float32) * sc  # [n, 16]
    q = np.clip(np.rint(_divide(runs, step[..., None])), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)  # [n, half, quarter, l]
    low = q & 0x0F  # quarters 0 and 2 share ql[64 h + l] (low, high nibble), 1 and 3 share ql[64 h + 32 + l]
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    high = q >> 4  # [n, half, quarter, l]: 2 bits each, quarter c at bits 2c of qh[32 h + l]
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    blocks = [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d.view(np.uint8)]
    return np.concatenate(blocks, axis=1).reshape(values.shape[0], -1)


def _super_blocks(values: np.ndarray) -> np.ndarray:
    if values.ndim != 2 or values.shape[1] % QK_K:
        raise ValueError(f"K-quants take rows of a multiple of {QK_K} values, got shape {values.shape}")
    return np.ascontiguousarray(values, dtype=np.float32).reshape(-1, QK_K)  # [n super-blocks, 256]


def _scaled_with_min(x: np.ndarray, qmax: int):
    """x [n, 256] -> fp16 d, dmin [n, 1], 6-bit sc, m uint8 [n, 8] and q uint8 [n, 256] in 0..qmax, with sub-block
    j's inputs ~ d * sc_j * q - dmin * m_j. The min is clipped to <= 0 (m >= 0), as llama.cpp's is."""
    sub = x.reshape(len(x), 8, 32)
    low = np.minimum(sub.min(axis=-1), 0)
    scale, offset = (sub.max(axis=-1) - low) / qmax, -low  # [n, 8] each
    d = (scale.max(axis=-1, keepdims=True) / 63).astype(np.float16)
    dmin = (offset.max(axis=-1, keepdims=True) / 63).astype(np.float16)
    sc = np.clip(np.rint(_divide(scale, d.astype(np.float32))), 0, 63).astype(np.uint8)
    mins = np.clip(np.rint(_divide(offset, dmin.astype(np.float32))), 0, 63).astype(np.uint8)
    step = (d.astype(np.float32) * sc)[..., None]
    shift = (dmin.astype(np.float32) * mins)[..., None]
    q = np.clip(np.rint(_divide(sub + shift, step)), 0, qmax).astype(np.uint8)
    return d, dmin, sc, mins, q.reshape(len(x), QK_K)


def _pack_k_scales(sc: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """6-bit sc, m [n, 8] -> the 12 scale bytes of Q4_K / Q5_K (the inverse of ggml's get_scale_min_k4): bytes 0-3
    and 4-7 hold sub-blocks 0-3's sc and m in their low 6 bits and the top 2 bits of sub-blocks 4-7's; bytes 8-11
    hold sub-blocks 4-7's low 4 bits of sc (low nibble) and m (high nibble)."""
    packed = np.empty((len(sc), 12), np.uint8)
    packed[:, 0:4] = sc[:, 0:4] | (sc[:, 4:8] >> 4) << 6
    packed[:, 4:8] = mins[:, 0:4] | (mins[:, 4:8] >> 4) << 6
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | (mins[:, 4:8] & 0x0F) << 4
    return packed


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b is 0 (an all-zero run)."""
    a, b = np.broadcast_arrays(a, b)
    return np.divide(a, b, out=np.zeros(a.shape, np.float32), where=b != 0)


# A layer's index in a Hugging Face name (model.layers.{i}.) or a GGUF one (blk.{i}.).
_LAYER = re.compile(r"(?:^model\.layers|^blk)\.(\d+)\.")
_OUTPUT = ("lm_head.weight", "output.weight")
_EMBEDDING = ("model.embed_tokens.weight", "token_embd.weight")
_MORE_BITS = ("self_attn.v_proj.weight", "mlp.down_proj.weight", "attn_v.weight", "ffn_down.weight")


def use_more_bits(index: int, count: int) -> bool:
    """llama-quantize's pick of the tensors of one kind (the `index`-th of `count`) that Q4_K_M gives more bits: the
    first and last eighth, and every third between."""
    return index < count // 8 or index >= 7 * count // 8 or (index - count // 8) % 3 == 2


def q4_k_m_type(name: str, layers: int, cols: int, tied: bool) -> GGMLQuantizationType:
    """llama.cpp's type for a tensor of a Q4_K_M file (src/llama-quant.cpp, a dense llama-arch model), by its
    Hugging Face or GGUF name: Q6_K for the output (and a tied embedding), for attn_v and ffn_down of the layers
    `use_more_bits` picks (the first and last eighth, and every third between), Q4_K for the others; rows not whole
    256-value super-blocks fall back (Q4_K to Q5_0, Q6_K to Q8_0)."""
    q4, q6 = GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K
    wanted = q4
    layer = _LAYER.match(name)
    if name in _OUTPUT or (tied and name in _EMBEDDING):
        wanted = q6
    elif layer and name.endswith(_MORE_BITS):
        wanted = q6 if use_more_bits(int(layer.group(1)), layers) else q4
    if cols % QK_K:
        return GGMLQuantizationType.Q5_0 if wanted == q4 else GGMLQuantizationType.Q8_0
    return wanted
