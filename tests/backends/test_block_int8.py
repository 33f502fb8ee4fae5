"""The K-quant and MXFP4 linears' int8 path (block_int8.c), which block_linear.c takes for decode's few rows:
against a float64 linear on gguf-py's weights within what the int8 pieces leave of the activations, every row on its
own (a NaN, an infinity or a zero in one row leaves the others' outputs bit for bit as they are alone), activations
from 1e-30 to 1e30, on every instruction-set variant this CPU runs (VNNI's dot product, AVX-512BW's and AVX2's
pairs, the portable C)."""

from __future__ import annotations

import pytest
import torch

from sagellm.backends.native import NativeKernels, interleave
from sagellm.backends.native.block_layout import GROUPS
from tests.backends.test_block_linear import pieces_left, quantized_weight

KINDS = ["Q4_K", "Q5_K", "Q6_K", "MXFP4"]  # the kinds with an int8 path
DECODE_ROWS = [1, 2, 3, 4]  # up to kernels.h INT8_MAX_ROWS, one tile of rows
K = 512


def reference(x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 linear, and the float64 sums of |x| |w| that bound its rounding."""
    exact = x.double() @ dense.double().T + (0 if bias is None else bias.double())
    return exact, x.double().abs() @ dense.double().abs().T


def assert_within_pieces_rounding(actual: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, bias=None) -> None:
    """|error| <= what the pieces leave of x (pieces_left), plus 2^-20 of sum |x| |w| for the per-sub-block fp32
    sums' roundings."""
    exact, magnitude = reference(x, dense, bias)
    bound = pieces_left(x, dense) + 2.0**-20 * magnitude + (0 if bias is None else 2.0**-23 * bias.double().abs())
    excess = (actual.double() - exact).abs() - bound
    assert excess.max().item() <= 0, f"worst error {excess.max().item():.3g} beyond the bound"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("rows", DECODE_ROWS)
@pytest.mark.parametrize("threads", [1, 2])
def test_the_int8_path_is_the_fp32_linear_to_within_the_pieces_rounding_of_x(
    native: NativeKernels, kind: str, group: int, rows: int, threads: int
) -> None:
    weight, dense = quantized_weight(kind, n=96, k=K)
    x, bias = torch.randn(rows, K + 8)[:, :K], torch.randn(96)  # rows of a wider tensor, as the graph's views
    actual = native.block_linear(x, interleave(weight, group), bias, threads)
    assert_within_pieces_rounding(actual, x, dense, bias)


@pytest.mark.parametrize("kind", KINDS)
def test_each_row_is_its_own_whatever_the_others_hold(native: NativeKernels, kind: str) -> None:
    """A row's output does not depend on the batch (integer sums, each row's own scales), so a NaN, an infinity or
    zeros in one row give NaN, NaN and the bias in that row only, and the rest equal their outputs alone."""
    weight, _ = quantized_weight(kind, n=64, k=K)
    blocks, bias = interleave(weight, native.block_group), torch.randn(64)
    x = torch.randn(4, K)
    x[1, 300], x[2, 5], x[3] = float("nan"), float("inf"), 0.0
    batch = native.block_linear(x, blocks, bias)
    assert batch[1].isnan().all() and batch[2].isnan().all()
    assert torch.equal(batch[3], bias)
    assert torch.equal(batch[0], native.block_linear(x[:1], blocks, bias)[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("magnitude", [1e-30, 1e-3, 1e30])
def test_activations_of_any_magnitude_keep_their_precision(native: NativeKernels, kind: str, magnitude: float):
    weight, dense = quantized_weight(kind, n=64, k=K, seed=2)
    x = torch.randn(3, K) * magnitude
    x[2, 100:200] *= 1e-6  # blocks far smaller than the row's others keep their own scale
    assert_within_pieces_rounding(native.block_linear(x, interleave(weight, native.block_group), None), x, dense)


def test_blocks_below_the_smallest_scale_count_as_zero(native: NativeKernels) -> None:
    """Values under 127 x the smallest subnormal (~2e-43) have no fp32 scale: their blocks add nothing, the rest of
    the row is exact as ever."""
    weight, dense = quantized_weight("Q4_K", n=64, k=K, seed=3)
    x = torch.randn(1, K)
    x[0, :32] = 1e-44
    actual = native.block_linear(x, interleave(weight, native.block_group), None)
    kept = x.clone()
    kept[0, :32] = 0.0
    assert_within_pieces_rounding(actual, kept, dense)
