"""The K-quant encoders (sagellm.benchmarks.kquant_pack) write blocks gguf-py reads back close to the values, with
the fields a kernel could get wrong varied: sub-block scales and mins of many values, Q6_K's scales of both signs,
Q5_K's fifth bits set and clear. And backends/native/gguf_blocks.py reads those fields as gguf-py does."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from sagellm.backends.native.gguf_blocks import k_scales, k_steps, q5_k_fifth_bits, q6_k_values
from sagellm.benchmarks.kquant_pack import quantize
from tests.kquant import sample_weights

# Largest error of a value after the round trip, over its super-block's largest magnitude (plain rounding, 6-bit
# scales relative to the super-block's largest: Q4_K's worst sub-block has 15 steps of a coarse scale).
ROUND_TRIP_ERROR = {"Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.035}


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_the_encoders_round_trip_through_gguf_py(kind: str) -> None:
    values = sample_weights(48, 512, seed=3)
    qtype = GGMLQuantizationType[kind]
    blocks = quantize(values, qtype)
    inputs, size = GGML_QUANT_SIZES[qtype]
    assert blocks.dtype == np.uint8 and blocks.shape == (48, 512 // inputs * size)
    back = dequantize(blocks, qtype).reshape(values.shape)
    per_block = np.abs(back - values).reshape(48, -1, 256).max(-1) / np.abs(values).reshape(48, -1, 256).max(-1)
    assert per_block.max() < ROUND_TRIP_ERROR[kind]


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K"])
def test_q4_k_and_q5_k_blocks_vary_their_scales_mins_and_fifth_bits(kind: str) -> None:
    blocks = quantize(sample_weights(32, 512, seed=4), kind).reshape(32, 2, -1)
    sc, mins = k_scales(blocks[..., 4:16])
    assert len(np.unique(sc)) > 30 and len(np.unique(mins)) > 30, "6-bit scales and mins of many values"
    assert (sc >= 32).any() and (mins >= 32).any(), "values using the top 2 bits, stored apart from the rest"
    assert (mins == 0).any(), "sub-blocks all positive: min 0"
    if kind == "Q5_K":
        fifth = q5_k_fifth_bits(blocks)
        assert 0.1 < fifth.mean() < 0.9


def test_q6_k_blocks_have_scales_of_both_signs() -> None:
    blocks = quantize(sample_weights(32, 512, seed=5), "Q6_K").reshape(32, 2, 210)
    scales = blocks[..., 192:208].view(np.int8)
    assert (scales < 0).any() and (scales > 0).any() and len(np.unique(scales)) > 30
    values = q6_k_values(blocks)
    assert values.min() == -32 and values.max() == 31


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_the_decoders_read_blocks_as_gguf_py_does(kind: str) -> None:
    """D * q + M from gguf_blocks' fields, per sub-block, equals gguf-py's dequantization bit for bit."""
    qtype = GGMLQuantizationType[kind]
    blocks = quantize(sample_weights(16, 512, seed=6), qtype)
    expected = dequantize(blocks, qtype).reshape(16, 2, 256)
    blocks = blocks.reshape(16, 2, -1)
    if kind == "Q6_K":
        d = blocks[..., 208:210].view(np.float16).astype(np.float32)  # [16, 2, 1]
        steps = d * blocks[..., 192:208].view(np.int8).astype(np.float32)  # [16, 2, 16]
        ours = steps[..., None] * q6_k_values(blocks).reshape(16, 2, 16, 16).astype(np.float32)
    else:
        steps, offsets = k_steps(blocks)  # [16, 2, 8]
        qs = blocks[..., 16:144] if kind == "Q4_K" else blocks[..., 48:176]
        low = np.stack([qs.reshape(16, 2, 4, 32) & 0x0F, qs.reshape(16, 2, 4, 32) >> 4], axis=3).reshape(16, 2, 8, 32)
        q = low | (q5_k_fifth_bits(blocks) << 4) if kind == "Q5_K" else low
        ours = steps[..., None] * q.astype(np.float32) + offsets[..., None]
    assert np.array_equal(ours.reshape(16, 2, 256), expected)
