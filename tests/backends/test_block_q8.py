"""The linears on x rounded to int8 (block_q8.c, `--int8-activations`; Q4_0, Q4_1, Q4_K, Q5_K, Q6_K): the fp32
linear on gguf-py's weights and on x rounded as llama.cpp rounds it (tests/oracle.py's round_to_int8_blocks), to fp32's
rounding; a row's outputs the same floats alone or in a batch of any size, on one thread or two; a NaN or infinity in
one row leaving the others as they are; every layout (8- and 16-wide, an odd last group of 8), on every
instruction-set variant this CPU runs (AVX-512 VNNI's vpdpbusd, AVX2's vpmaddubsw, the portable C), VNNI's floats
bit for bit AVX2's but for Q6_K's, and AMX's tiles' bit for bit VNNI's."""

from __future__ import annotations

import shutil

import pytest
import torch

from sagellm.backends.native import NativeKernels, interleave
from sagellm.backends.native.block_layout import GROUPS, Q8_X_KINDS, Q8_X_LAYOUT_OF
from sagellm.backends.native.isa import runnable
from tests.backends.test_block_linear import assert_linear_close, quantized_weight
from tests.oracle import round_to_int8_blocks

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler (gcc or cc)"
)
K = 3 * 256  # three K-quant super-blocks, 24 blocks of 32


def rounded_blocks(kind: str, group: int, n: int, k: int = K):
    weight, dense = quantized_weight(kind, n, k)
    blocks = interleave(weight, group, int8_activations=True)
    assert blocks is not None and (blocks.layout, blocks.x_type) == (f"{Q8_X_LAYOUT_OF[kind]}{group}", "q8")
    return blocks, dense


@pytest.mark.parametrize("kind", Q8_X_KINDS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_linear_is_fp32s_on_x_rounded_and_each_rows_floats_do_not_depend_on_its_batch(
    native: NativeKernels, kind: str, group: int, threads: int
) -> None:
    n = 8 * 7 if group == 8 else 16 * 5  # seven groups of 8: the last unit of 16 half empty
    blocks, dense = rounded_blocks(kind, group, n)
    bias = torch.randn(n)
    x = torch.randn(200, K + 8)[:, :K]  # rows of a wider tensor, as the graph's views
    alone = torch.cat([native.block_linear(x[t : t + 1], blocks, bias, 1) for t in range(len(x))])
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 48, 200):  # each tile height (to 4, or 8 under VNNI); AMX's 16 and
        # 32 (48: one of each), a chunk
        out = native.block_linear(x[:rows], blocks, bias, threads)
        assert torch.equal(out, alone[:rows]), f"{rows} rows"
    assert_linear_close(alone, round_to_int8_blocks(x), dense, kind, bias, rounded=False)


@pytest.mark.parametrize("kind", ["Q4_1", "Q6_K"])
@pytest.mark.parametrize("group", GROUPS)
def test_a_row_of_nan_infinity_or_zeros_leaves_the_others_as_they_are(
    native: NativeKernels, kind: str, group: int
) -> None:
    blocks, dense = rounded_blocks(kind, group, 32)
    x = torch.randn(6, K)
    clean = native.block_linear(x, blocks, None)
    x[1, 5], x[3, 40], x[4] = float("nan"), float("inf"), 0.0
    out = native.block_linear(x, blocks, None)
    assert out[1].isnan().all() and out[3].isnan().all(), "a block's NaN or infinity spreads over its row alone"
    assert torch.equal(out[[0, 2, 5]], clean[[0, 2, 5]])
    assert torch.equal(out[4], torch.zeros(32)), "zeros round to zeros"


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_K"])
@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1e3, 1e30])
def test_rows_of_any_magnitude_round_relative_to_their_blocks(native: NativeKernels, kind: str, scale: float) -> None:
    blocks, dense = rounded_blocks(kind, 8, 48)
    x = torch.randn(9, K) * scale
    out = native.block_linear(x, blocks, None)
    expected = round_to_int8_blocks(x).double() @ dense.double().T
    assert torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("kind", [kind for kind in Q8_X_KINDS if kind != "Q6_K"])
def test_vnnis_dot_products_sum_the_same_integers_as_avx2s(native: NativeKernels, kind: str) -> None:
    """vpdpbusd's int32 sums and vpmaddubsw's widened int16 ones are the same integers, and the float steps after them
    the same instructions (both variants have FMA; the portable build's floats may round apart where it has none).
    Not Q6_K's: VNNI multiplies its sub-blocks' sums by their scales as floats, AVX2 as integers."""
    avx2 = [variant for variant in runnable() if variant.name == "avx2"]
    if native.isa == "portable" or not avx2:
        pytest.skip("compares a variant with FMA against AVX2's")
    reference = NativeKernels.load(avx2[0])
    for group in GROUPS:
        blocks, _ = rounded_blocks(kind, group, 48)
        x = torch.randn(7, K) * 3
        assert torch.equal(native.block_linear(x, blocks, None, 2), reference.block_linear(x, blocks, None, 2))


@pytest.mark.parametrize("kind", Q8_X_KINDS)
def test_amxs_tiles_sum_the_same_floats_as_vnnis(native: NativeKernels, kind: str) -> None:
    """Rows in 16s on AMX's tile multiplies (tdpbsud) and the rest on VNNI's: the same integers, scaled by the same
    float steps, so the same outputs bit for bit, over pairs of units and of 16 rows, a lone unit and a lone 16."""
    if not native.amx_tiles():
        pytest.skip("needs a CPU with AMX-INT8 (and a kernel that grants its tile state)")
    blocks, _ = rounded_blocks(kind, 16, 16 * 3)  # a pair of units and a lone one
    x = torch.randn(48 + 5, K) * 3  # a pair of 16 rows, a lone 16, and 5 left to VNNI's tiles
    try:
        on = native.block_linear(x, blocks, None, 2)
        assert not native.amx_tiles(False)
        off = native.block_linear(x, blocks, None, 2)
    finally:
        native.amx_tiles(True)
    assert torch.equal(on, off)


def test_other_kinds_keep_x_as_it_is() -> None:
    weight, _ = quantized_weight("Q8_0", 16, 64)
    assert interleave(weight, 8, int8_activations=True).x_type == "f32"
