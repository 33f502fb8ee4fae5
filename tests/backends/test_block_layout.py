"""The interleaved layouts (block_layout.py) byte for byte against a slow reference that spells out block_linear.c's
header value by value, on random blocks (any bytes: NaN and infinite scales included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sagellm.backends.native import interleave
from sagellm.backends.quantized import BLOCK_BYTES, KEPT_KINDS, QuantizedWeight


def reference_layout(kind: str, blocks: np.ndarray, group: int) -> np.ndarray:
    """uint8 [N / G, B, bytes]: per group of G outputs and block of 32 inputs, float d[G] (and for Q4 float m[G],
    Q4_0's m = -8 d), then q4x8: 32 uint32 words, input i's holding output j's nibble at bits 4j; q4x16: 32 uint64
    words, output j's nibble at bits 4 (j / 2) + 32 (j % 2); q8xG: 32 x G int8, input i's outputs side by side. A Q4
    block holds input i < 16 in byte i's low nibble, 16 + i high."""
    n, b = blocks.shape[0], blocks.shape[1]
    groups = []
    for g in range(n // group):
        row = []
        for blk in range(b):
            outputs = [blocks[group * g + j, blk] for j in range(group)]
            d = [np.frombuffer(o[0:2].tobytes(), np.float16)[0].astype(np.float32) for o in outputs]
            if kind == "Q8_0":
                parts = [np.array(d, np.float32).tobytes()]
                parts += [bytes(o[2 + i] for o in outputs) for i in range(32)]
            else:
                if kind == "Q4_1":
                    m = [np.frombuffer(o[2:4].tobytes(), np.float16)[0].astype(np.float32) for o in outputs]
                else:
                    m = [np.float32(-8.0) * x for x in d]
                packed = [o[4:] if kind == "Q4_1" else o[2:] for o in outputs]
                nibble = [[p[i] & 0xF for i in range(16)] + [p[i] >> 4 for i in range(16)] for p in packed]
                at = [4 * j for j in range(8)] if group == 8 else [4 * (j // 2) + 32 * (j % 2) for j in range(16)]
                words = [sum(int(nibble[j][i]) << at[j] for j in range(group)) for i in range(32)]
                parts = [np.array(d, np.float32).tobytes(), np.array(m, np.float32).tobytes()]
                parts.append(np.array(words, "<u4" if group == 8 else "<u8").tobytes())
            row.append(np.frombuffer(b"".join(parts), np.uint8))
        groups.append(row)
    return np.array(groups, np.uint8)


@pytest.mark.parametrize("kind", KEPT_KINDS)
@pytest.mark.parametrize(("n", "k", "group"), [(8, 32, 8), (24, 96, 8), (40, 64, 8), (16, 32, 16), (48, 96, 16)])
def test_interleave_equals_the_reference_byte_for_byte(kind: str, n: int, k: int, group: int) -> None:
    raw = np.random.default_rng(n + k).integers(0, 256, (n, k // 32 * BLOCK_BYTES[kind]), dtype=np.uint8)
    with np.errstate(invalid="ignore"):  # Q4_0's m = -8 d of a NaN scale
        expected = reference_layout(kind, raw.reshape(n, k // 32, -1), group)
        packed = interleave(QuantizedWeight(kind, torch.from_numpy(raw), k), group)
    assert packed is not None and packed.layout == ("q8x" if kind == "Q8_0" else "q4x") + str(group)
    assert (packed.out_features, packed.in_features) == (n, k) and packed.data.is_contiguous()
    assert np.array_equal(packed.data.numpy(), expected)
