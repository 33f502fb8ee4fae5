"""The 16-wide layouts' int16 path (block_int16.c), which block_linear.c takes from INT16_MIN_ROWS rows on in the
variant built with AVX-512 VNNI: every kind it reads against the fp64 linear on gguf-py's dequantized weights,
within what rounding x to 2^-16 of its block's largest |x| leaves; a row's outputs not depending on the rows beside
it; a non-finite input poisoning its own row only."""

from __future__ import annotations

import shutil

import pytest
import torch

from sagellm.backends.native import NativeKernels, interleave
from sagellm.backends.native.isa import runnable
from tests.backends.test_block_linear import INT16_MIN_ROWS, inputs, pieces_left, quantized_weight

INT16_KINDS = ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]  # the 16-wide layouts block_int16.c reads

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler (gcc or cc)"
)


@pytest.fixture(scope="module")
def vnni() -> NativeKernels:
    """The variant the int16 path is built into, where this CPU runs it."""
    variant = next((v for v in runnable() if v.name == "avx512vnni"), None)
    if variant is None:
        pytest.skip("the int16 path is built into the AVX-512 VNNI variant only, which this CPU does not run")
    kernels = NativeKernels.load(variant)
    assert kernels is not None
    return kernels


def assert_within_int16_rounding(actual: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, bias=None) -> None:
    """|error| <= what rounding x leaves (pieces_left's bound, 2^-16 of each block's largest |x| carried through |w|),
    plus 2^-20 of sum |x| |w| for the fp32 sums of the blocks' scaled integers."""
    expected = x.double() @ dense.double().T + (0 if bias is None else bias.double())
    magnitude = x.double().abs() @ dense.double().abs().T
    bound = pieces_left(x, dense) + 2.0**-20 * magnitude + (0 if bias is None else 2.0**-23 * bias.double().abs())
    excess = (actual.double() - expected).abs() - bound
    assert excess.max().item() <= 0, f"worst error {excess.max().item():.3g} beyond the rounding's bound"


@pytest.mark.parametrize("kind", INT16_KINDS)
@pytest.mark.parametrize("rows", [INT16_MIN_ROWS, 17, 29, 100])  # tiles of 12 rows and their rests
@pytest.mark.parametrize("threads", [1, 2])
def test_int16_path_is_the_linear_on_the_dequantized_weight(vnni, kind: str, rows: int, threads: int) -> None:
    k = inputs(kind)
    weight, dense = quantized_weight(kind, n=96, k=k, seed=rows)
    x, bias = torch.randn(rows, k + 8)[:, :k] * 4, torch.randn(96)  # rows of a wider tensor
    x[0, 3] = 500.0  # one block far larger than the rest: its own scale, the other blocks keep theirs
    actual = vnni.block_linear(x, interleave(weight, 16), bias, threads)
    assert_within_int16_rounding(actual, x, dense, bias)


def test_a_rows_outputs_do_not_depend_on_the_rows_beside_it(vnni) -> None:
    """x is rounded per row and block, and each row's sums run in one order wherever its tile puts it: a prompt's
    token gets the same floats in any chunk or batch of INT16_MIN_ROWS rows or more."""
    weight, _ = quantized_weight("Q4_1", n=64, k=576)
    blocks = interleave(weight, 16)
    x = torch.randn(40, 576)
    whole = vnni.block_linear(x, blocks, None, 2)
    assert torch.equal(vnni.block_linear(x[7 : 7 + INT16_MIN_ROWS], blocks, None), whole[7 : 7 + INT16_MIN_ROWS])
    assert torch.equal(vnni.block_linear(x.flip(0), blocks, None, 2), whole.flip(0))


def test_a_non_finite_input_poisons_its_own_row_only(vnni) -> None:
    weight, dense = quantized_weight("Q4_K", n=32, k=512)
    x = torch.randn(INT16_MIN_ROWS + 4, 512)
    x[2, 10], x[5, 300], x[9, 0] = float("nan"), float("inf"), float("-inf")
    x[7] = 0.0  # a row of zeros: scale 0, the outputs the bias (none: zeros)
    actual = vnni.block_linear(x, interleave(weight, 16), None)
    assert actual[[2, 5, 9]].isnan().all(), "a NaN or infinity in a block makes its row's outputs NaN, as fp32's"
    clean = [row for row in range(x.shape[0]) if row not in (2, 5, 9)]
    assert torch.equal(actual[7], torch.zeros(32))
    assert_within_int16_rounding(actual[clean], x[clean], dense)
