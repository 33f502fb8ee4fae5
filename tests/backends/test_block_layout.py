"""The interleaved layouts (block_layout.py) byte for byte against a slow reference that spells out block_linear.c's
header value by value, on random blocks (any bytes: NaN and infinite scales included), every kept kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sagellm.backends.native import block_layout, interleave
from sagellm.backends.quantized import BLOCK_BYTES, BLOCK_INPUTS, KEPT_KINDS, QuantizedWeight

LAYOUT = {"Q4_0": "q4x", "Q4_1": "q4x", "Q4_K": "q4kx", "Q5_0": "q8x", "Q8_0": "q8x", "Q5_K": "q5kx", "Q6_K": "q6kx"}
LAYOUT["MXFP4"] = "mxfp4x"


def f16(block: np.ndarray, at: int) -> np.float32:
    return np.frombuffer(block[at : at + 2].tobytes(), np.float16)[0].astype(np.float32)


def k_scale_min(s: list[int], j: int) -> tuple[int, int]:
    """ggml's get_scale_min_k4, as in ggml-quants.c."""
    if j < 4:
        return s[j] & 63, s[j + 4] & 63
    return (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4)


def decode(kind: str, block: np.ndarray) -> dict:
    """One block's fields, read as ggml-quants.c's dequantize_row_* loops read them: per 32-input (sub-)block `d`,
    `m` (the q4x / q8x kinds), or the super-block's d, dmin and integer scales, and `q` per input."""
    u = [int(v) for v in block]  # Python ints: no uint8 wrap-around in the shifts below
    signed = [v - 256 if v > 127 else v for v in u]
    if kind == "Q8_0":
        return {"d": [f16(block, 0)], "q": signed[2:]}
    if kind == "MXFP4":  # block_mxfp4: e, then input j in qs[j]'s low nibble, j + 16 in its high one
        return {"e": u[0], "q": [p & 0xF for p in u[1:]] + [p >> 4 for p in u[1:]]}
    if kind in ("Q4_0", "Q4_1"):
        packed = u[4:] if kind == "Q4_1" else u[2:]
        m = f16(block, 2) if kind == "Q4_1" else np.float32(-8.0) * f16(block, 0)
        return {"d": [f16(block, 0)], "m": [m], "q": [p & 0xF for p in packed] + [p >> 4 for p in packed]}
    if kind == "Q5_0":
        qh = u[2] | u[3] << 8 | u[4] << 16 | u[5] << 24
        low = [p & 0xF for p in u[6:]] + [p >> 4 for p in u[6:]]
        return {"d": [f16(block, 0)], "q": [low[e] | ((qh >> e) & 1) << 4 for e in range(32)]}
    if kind == "Q6_K":
        ql, qh, q = u[:128], u[128:192], [0] * 256
        for half in range(2):
            for lane in range(32):
                a, b, h = ql[64 * half + lane], ql[64 * half + lane + 32], qh[32 * half + lane]
                at = 128 * half + lane
                q[at] = (a & 0xF) | ((h >> 0) & 3) << 4
                q[at + 32] = (b & 0xF) | ((h >> 2) & 3) << 4
                q[at + 64] = (a >> 4) | ((h >> 4) & 3) << 4
                q[at + 96] = (b >> 4) | ((h >> 6) & 3) << 4
        return {"d": f16(block, 208), "sc": signed[192:208], "q": [v - 32 for v in q]}
    d, dmin = f16(block, 0), f16(block, 2)
    pairs = [k_scale_min(u[4:16], j) for j in range(8)]
    qs = u[16:144] if kind == "Q4_K" else u[48:176]
    q = [(qs[32 * (j // 2) + lane] >> (4 * (j % 2))) & 0xF for j in range(8) for lane in range(32)]
    if kind == "Q5_K":
        qh = u[16:48]
        q = [q[32 * j + lane] | ((qh[lane] >> j) & 1) << 4 for j in range(8) for lane in range(32)]
    return {"d": d, "dmin": dmin, "sc": [p[0] for p in pairs], "m": [p[1] for p in pairs], "q": q}


def words(values: list[list[int]], group: int) -> bytes:
    """q4xG words of one input per entry of `values[j]` (output j's 4-bit q at each input): q4x8 holds output j at
    bits 4j of a uint32, q4x16 at bits 4 (j / 2) + 32 (j % 2) of a uint64."""
    at = [4 * j for j in range(8)] if group == 8 else [4 * (j // 2) + 32 * (j % 2) for j in range(16)]
    packed = [sum(int(values[j][i]) << at[j] for j in range(group)) for i in range(len(values[0]))]
    return np.array(packed, "<u4" if group == 8 else "<u8").tobytes()


def side_by_side(values: list[list], dtype: str) -> bytes:
    """values[j][i] for output j, entry i, stored entry-major: entry i's G outputs side by side."""
    return np.array(values, dtype).T.tobytes()


def lanes(values: list[list[int]]) -> bytes:
    """values[j][e] (bytes) in chunks of 4 entries: per chunk a 32-bit lane per output j holding its 4 entries in
    order, as q4kx arranges its nibble pairs for the int8 dot products."""
    return bytes(values[j][4 * c + i] for c in range(len(values[0]) // 4) for j in range(len(values)) for i in range(4))


def reference_block(kind: str, outputs: list[dict], group: int) -> list[bytes]:
    """The layout's bytes per (group, block of the layout's inputs): per sub-block of 32 for q4x / q8x."""
    if kind == "MXFP4":  # q4kx's chunks of 8 inputs (byte i: input 8c + i low, 8c + 4 + i high), then e[G]
        codes = lanes(
            [[o["q"][c + i] | o["q"][c + i + 4] << 4 for c in range(0, 32, 8) for i in range(4)] for o in outputs]
        )
        return [codes + bytes(o["e"] for o in outputs)]
    if LAYOUT[kind] == "q8x":
        q = [o["q"] if kind == "Q8_0" else [v - 16 for v in o["q"]] for o in outputs]
        return [side_by_side([o["d"] for o in outputs], "f4") + side_by_side(q, "i1")]
    if LAYOUT[kind] == "q4x":
        parts = []
        for sub in range(len(outputs[0]["d"])):
            scales = side_by_side([[o["d"][sub]] for o in outputs], "f4")
            scales += side_by_side([[o["m"][sub]] for o in outputs], "f4")
            parts.append(scales + words([o["q"][32 * sub : 32 * sub + 32] for o in outputs], group))
        return [b"".join(parts)]
    if kind == "Q6_K":
        head = side_by_side([[o["d"]] for o in outputs], "f4") + side_by_side([o["sc"] for o in outputs], "i1")
        return [head + side_by_side([o["q"] for o in outputs], "i1")]
    head = side_by_side([[o["d"]] for o in outputs], "f4") + side_by_side([[o["dmin"]] for o in outputs], "f4")
    head += side_by_side([o["sc"] for o in outputs], "i1") + side_by_side([o["m"] for o in outputs], "i1")
    nibbles = [[v & 0xF for v in o["q"]] for o in outputs]
    # chunks of 8 inputs: byte i of a lane holds input i low, 4 + i high
    low = lanes([[q[i] | q[i + 4] << 4 for c in range(0, 256, 8) for i in range(c, c + 4)] for q in nibbles])
    if kind == "Q4_K":
        return [head + low]
    # per sub-block of 32 a uint32 per output: input 8c + i's fifth bit at bit 8 (i % 4) + 4 (i // 4) + c
    fifth = [
        sum((o["q"][32 * j + 8 * c + i] >> 4) << (8 * (i % 4) + 4 * (i // 4) + c) for c in range(4) for i in range(8))
        for j in range(8)
        for o in outputs
    ]
    return [head + low + np.array(fifth, "<u4").tobytes()]


def reference_layout(kind: str, blocks: np.ndarray, group: int) -> np.ndarray:
    """uint8 [N / G, blocks, bytes]: every (group, block) laid out as block_linear.c's header draws it."""
    n, b = blocks.shape[0], blocks.shape[1]
    groups = []
    for g in range(n // group):
        row = []
        for blk in range(b):
            outputs = [decode(kind, blocks[group * g + j, blk]) for j in range(group)]
            layout = b"".join(reference_block(kind, outputs, group))
            row += [np.frombuffer(layout, np.uint8).reshape(1, -1)]
        groups.append(np.concatenate(row))
    return np.array(groups, np.uint8)


# (outputs, blocks of the kind, group): one block, several, groups of 8 and of 16.
SHAPES = [(8, 1, 8), (24, 3, 8), (40, 2, 8), (16, 1, 16), (48, 3, 16)]
K_SHAPES = [(8, 1, 8), (24, 2, 8), (16, 1, 16), (32, 2, 16)]


@pytest.mark.parametrize(
    ("kind", "n", "blocks", "group"),
    [(kind, *shape) for kind in KEPT_KINDS for shape in (K_SHAPES if BLOCK_INPUTS[kind] == 256 else SHAPES)],
)
def test_interleave_equals_the_reference_byte_for_byte(kind: str, n: int, blocks: int, group: int) -> None:
    k = blocks * BLOCK_INPUTS[kind]
    raw = np.random.default_rng(n + k).integers(0, 256, (n, blocks * BLOCK_BYTES[kind]), dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # Q4_0's m = -8 d of a NaN scale, K-quants' d * sc
        expected = reference_layout(kind, raw.reshape(n, blocks, -1), group)
        packed = interleave(QuantizedWeight(kind, torch.from_numpy(raw), k), group)
    assert packed is not None and packed.layout == LAYOUT[kind] + str(group)
    assert (packed.out_features, packed.in_features) == (n, k) and packed.data.is_contiguous()
    assert np.array_equal(packed.data.numpy(), expected)


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_take_only_whole_super_blocks(kind: str) -> None:
    size = BLOCK_BYTES[kind]
    raw = torch.randint(0, 256, (16, 2 * size), dtype=torch.uint8)
    weight = QuantizedWeight(kind, raw, 512)
    assert interleave(QuantizedWeight(kind, raw, 384)) is None, "inputs not whole super-blocks"
    half = weight.narrow(1, 256, 512)
    assert half is not None and half.in_features == 256 and torch.equal(half.blocks, raw[:, size:])
    assert weight.narrow(1, 0, 128) is None, "a tensor parallel slice inside a super-block has no blocks"
    assert weight.narrow(1, 32, 256) is None
    with pytest.raises(ValueError, match="dims 0"):
        weight.narrow(2, 0, 256)


@pytest.mark.parametrize("kind", KEPT_KINDS)
def test_interleaving_a_chunk_of_outputs_at_a_time_gives_the_same_bytes(kind: str, monkeypatch) -> None:
    k = 2 * BLOCK_INPUTS[kind]
    raw = torch.randint(0, 256, (48, 2 * BLOCK_BYTES[kind]), dtype=torch.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        whole = interleave(QuantizedWeight(kind, raw, k), 8)
        monkeypatch.setattr(block_layout, "CHUNK_WEIGHTS", 1)  # one group of outputs per chunk
        chunked = interleave(QuantizedWeight(kind, raw, k), 8)
    assert whole is not None and chunked is not None
    assert torch.equal(whole.data, chunked.data)
