"""The prefill path over GGUF blocks (block_linear.c's dequantize_* kernels, ops.py's block_linear_large): the
k-major tiles hold exactly gguf-py's floats, and the tiled GEMM equals torch's linear on the dequantized weight up to
its summation order, for every kept kind, both group widths, tiles of unequal size, with and without a bias, on
every instruction-set variant this CPU runs; and which CPUs take it for prefill."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from sagellm.backends.cpu import GEMM_ROWS_MEASURED, PANEL_GEMM_ROWS, block_gemm_rows
from sagellm.backends.native import NativeKernels, interleave, ops
from sagellm.backends.native.block_layout import GROUPS, InterleavedBlocks
from sagellm.backends.quantized import BLOCK_INPUTS, KEPT_KINDS, QuantizedWeight
from sagellm.benchmarks.kquant_pack import quantize
from tests.kquant import sample_weights

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler (gcc or cc)"
)

N = 208  # outputs: 13 groups of 16, 26 of 8


def quantized_weight(kind: str, k: int) -> tuple[QuantizedWeight, torch.Tensor]:
    """Random [N, k] weights as GGUF blocks of `kind`, and gguf-py's dequantization of them (the reference); the
    K-quants' runs vary in spread and centre, so their sub-block scales and mins do."""
    if BLOCK_INPUTS[kind] == 256:
        values = sample_weights(N, k)
    else:
        values = np.random.default_rng(0).standard_normal((N, k)).astype(np.float32) * 0.05
    qtype = GGMLQuantizationType[kind]
    blocks = quantize(values, qtype)  # uint8 [N, row bytes]
    dense = torch.from_numpy(dequantize(blocks, qtype).reshape(N, k).copy())
    return QuantizedWeight(kind, torch.from_numpy(blocks.reshape(N, -1)), k), dense


def inputs(kind: str) -> int:
    """Whole blocks of `kind`, at least two (two super-blocks of 256, or 18 blocks of 32), so threads share them."""
    return 512 if BLOCK_INPUTS[kind] == 256 else 576


def dequantized_tile(native: NativeKernels, weight: InterleavedBlocks, first: int, count: int, threads: int):
    """The kernel's k-major tile [K, count * G] of groups first .. first + count - 1."""
    width = weight.out_features // weight.data.shape[0]
    tile = torch.full((weight.in_features, count * width), float("nan"))
    kernel = getattr(native.library, f"dequantize_{weight.layout}_f32")
    kernel(weight.data.data_ptr(), weight.in_features, first, count, tile.data_ptr(), threads)
    return tile


@pytest.mark.parametrize("kind", KEPT_KINDS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("threads", [1, 2])
def test_tiles_hold_exactly_gguf_pys_floats_k_major(native: NativeKernels, kind: str, group: int, threads: int):
    weight, dense = quantized_weight(kind, inputs(kind))
    blocks = interleave(weight, group)
    groups = N // group
    assert torch.equal(dequantized_tile(native, blocks, 0, groups, threads), dense.T)
    first, count = 3, groups - 5  # a range inside the weight: every value of the tile written, from its groups
    outputs = slice(first * group, (first + count) * group)
    assert torch.equal(dequantized_tile(native, blocks, first, count, threads), dense[outputs].T)


@pytest.mark.parametrize("kind", KEPT_KINDS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("tile_outputs", [80, N])  # tiles of unequal size (5, 5, 3 groups of 16), or one tile
@pytest.mark.parametrize("with_bias", [False, True])
def test_block_linear_large_is_torchs_linear_on_the_dequantized_weight(
    native: NativeKernels, kind: str, group: int, tile_outputs: int, with_bias: bool, monkeypatch
) -> None:
    k = inputs(kind)
    monkeypatch.setattr(ops, "DEQUANTIZED_TILE_BYTES", 4 * k * tile_outputs)
    weight, dense = quantized_weight(kind, k)
    x = torch.randn(37, k + 8)[:, :k]  # rows of a wider tensor, as the graph's views
    bias = torch.randn(N) if with_bias else None
    expected = torch.nn.functional.linear(x, dense, bias)
    actual = native.block_linear_large(x, interleave(weight, group), bias, num_threads=2)
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * scale)


def test_block_linear_large_checks_shapes(native: NativeKernels) -> None:
    weight, _ = quantized_weight("Q8_0", 64)
    with pytest.raises(ops.NativeShapeError):
        native.block_linear_large(torch.randn(4, 96), interleave(weight), None)
    with pytest.raises(ops.NativeShapeError):
        native.block_linear_large(torch.randn(4, 64), interleave(weight), torch.randn(N + 1))


def test_prefill_takes_the_tiled_gemm_from_each_cpus_measured_rows() -> None:
    """AMD's AVX-512 kernels beat the GEMM at every row count measured; Intel's AVX-512 ones do not from ~128-192 rows,
    AVX2's panels (block_panel.c) not from ~384 (backends/cpu.py says by how much)."""
    assert block_gemm_rows("AuthenticAMD", "avx512vnni") == block_gemm_rows("AuthenticAMD", "avx512") == (None, None)
    for isa in ("avx512vnni", "avx512"):
        assert block_gemm_rows("GenuineIntel", isa) == GEMM_ROWS_MEASURED
    for vendor, isa in [("AuthenticAMD", "avx2"), ("AuthenticAMD", "portable"), ("GenuineIntel", "avx2"),
                        ("", "portable")]:  # fmt: skip
        assert block_gemm_rows(vendor, isa) == PANEL_GEMM_ROWS
