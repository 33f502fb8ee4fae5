"""The native linear on GGUF blocks (block_linear.c, block_layout.py) against the fp32 linear on the same weights
dequantized by gguf-py, every kept kind (the K-quants written with varied sub-block scales by
sagellm.benchmarks.kquant_pack) on every instruction-set variant this CPU runs, the CPU backend's choice between the
two, and the loader keeping blocks that match its dequantized weights row for row (llama's permuted q/k included)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from sagellm.backends.cpu import NATIVE_BLOCK_ROWS, NativeDispatch
from sagellm.backends.cpu_linear import pack_block_weight, pack_linear_weight
from sagellm.backends.native import NativeKernels, interleave
from sagellm.backends.native.block_layout import GROUPS, LAYOUT_OF
from sagellm.backends.quantized import BLOCK_INPUTS, KEPT_KINDS, QuantizedWeight
from sagellm.benchmarks.kquant_pack import quantize
from sagellm.runtime.models.loader import load_model
from tests.kquant import sample_weights
from tests.tiny_models import make_tiny_llama, write_tiny_gguf

K_QUANTS = [kind for kind in KEPT_KINDS if BLOCK_INPUTS[kind] == 256]
INT8_KINDS = ["Q4_K", "Q5_K", "Q6_K", "MXFP4"]  # the kinds with block_int8.c's path
INT8_MAX_ROWS = 4  # kernels.h: up to this many rows those kinds take it
INT16_MIN_ROWS = 16  # kernels.h: from this many rows the 16-wide layouts take block_int16.c's path, where built

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler (gcc or cc)"
)


def quantized_weight(kind: str, n: int, k: int, seed: int = 0) -> tuple[QuantizedWeight, torch.Tensor]:
    """Random weights as GGUF blocks of `kind`, and gguf-py's dequantization of them: the dense reference. The
    K-quants' values vary in spread and centre from one 16-input run to the next, so their scales and mins do."""
    if kind in K_QUANTS:
        values = sample_weights(n, k, seed)
    else:
        values = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    qtype = GGMLQuantizationType[kind]
    blocks = quantize(values, qtype)  # uint8 [n, row bytes]
    dense = torch.from_numpy(dequantize(blocks, qtype).reshape(n, k).copy())
    return QuantizedWeight(kind, torch.from_numpy(blocks.reshape(n, -1)), k), dense


def pieces_left(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """What block_int8.c's two int8 pieces leave of x, carried through |w|: each input within its 32's largest |x| /
    (2 * 127 * 254) (float64 [T, N])."""
    block_max = x.double().abs().reshape(x.shape[0], -1, 32).amax(-1).repeat_interleave(32, -1)
    return (block_max / (2 * 127 * 254)) @ dense.double().abs().T


def rounds_x(native: NativeKernels, group: int, kind: str, rows: int) -> bool:
    """Whether the kernel rounds x to integers for this call: block_int8.c's pieces for decode's few rows of its
    kinds, block_int16.c's int16 from INT16_MIN_ROWS rows on for the 16-wide layouts but MXFP4's, in the variant
    built with AVX-512 VNNI."""
    if kind in INT8_KINDS and rows <= INT8_MAX_ROWS:
        return True
    return native.isa == "avx512vnni" and group == 16 and kind != "MXFP4" and rows >= INT16_MIN_ROWS


def assert_linear_close(
    actual: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, kind: str, bias=None, atol=2e-5, rounded=None
):
    """The fp32 linear's tolerance (rtol 1e-5, atol scaled by the outputs' size), widened where the kernel rounds x
    (`rounded`, by default decode's few rows of the int8 kinds; rounds_x says when) by what its pieces leave of x,
    a bound int16's rounding (2^-16 of the block's largest) meets too."""
    expected = x.double() @ dense.double().T + (0 if bias is None else bias.double())
    scale = max(1.0, expected.abs().max().item())  # the K-quants' sample weights give outputs up to ~10
    allowed = 1e-5 * expected.abs() + atol * scale
    if rounded if rounded is not None else kind in INT8_KINDS and x.shape[0] <= INT8_MAX_ROWS:
        allowed = allowed + pieces_left(x, dense)
    excess = (actual.double() - expected).abs() - allowed
    assert excess.max().item() <= 0, f"worst error {excess.max().item():.3g} beyond the tolerance"


@pytest.mark.parametrize("kind", KEPT_KINDS)
@pytest.mark.parametrize("group", GROUPS)
def test_the_kernels_dequantize_to_exactly_gguf_pys_floats(native: NativeKernels, kind: str, group: int) -> None:
    """One-hot rows pick single weights out, with no sum to round: y = I @ W^T must equal W^T bit for bit, so every
    value of the layout sits where the kernel reads it and dequantizes exactly (an fp16 scale times a small int).
    In calls of 5 to INT16_MIN_ROWS - 1 rows, the fp32 kernels' (the int8 and int16 paths round x: the other tests
    bound them)."""
    k = 2 * BLOCK_INPUTS[kind]
    weight, dense = quantized_weight(kind, n=48, k=k)
    blocks = interleave(weight, group)
    rows = [native.block_linear(eye, blocks, None) for eye in torch.eye(k).tensor_split(-(-k // (INT16_MIN_ROWS - 1)))]
    assert torch.equal(torch.cat(rows), dense.T)


def inputs(kind: str) -> int:
    """A width of whole blocks of `kind`: 18 blocks of 32 inputs, or 2 super-blocks of 256."""
    return 512 if kind in K_QUANTS else 576


@pytest.mark.parametrize("kind", KEPT_KINDS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 17, 40, 48, 64])  # every tile size class, tiles of 16 plus a rest
@pytest.mark.parametrize("threads", [1, 2])
def test_block_linear_equals_the_fp32_linear_on_the_dequantized_weight(
    native: NativeKernels, kind: str, group: int, rows: int, threads: int
) -> None:
    k = inputs(kind)
    weight, dense = quantized_weight(kind, n=208, k=k)
    x, bias = torch.randn(rows, k + 8)[:, :k], torch.randn(208)  # rows of a wider tensor, as the graph's views
    actual = native.block_linear(x, interleave(weight, group), bias, threads)
    assert_linear_close(actual, x, dense, kind, bias, rounded=rounds_x(native, group, kind, rows))


@pytest.mark.parametrize("kind", KEPT_KINDS)
def test_both_group_widths_sum_in_the_same_order(native: NativeKernels, kind: str) -> None:
    """A group of 16 is two groups of 8 side by side, each output's FMAs chained in the same order: a machine
    gives the same floats whichever layout its kernels read, in calls of up to 8 rows (from 9 rows the 8-wide layouts
    take block_panel.c's panels, which chain every row's FMAs as the full tiles do, test_block_panel.py; from
    INT16_MIN_ROWS the 16-wide ones the int16 path, where it is built)."""
    k = inputs(kind)
    weight, _ = quantized_weight(kind, n=64, k=k)
    for rows in (1, 5, 8):
        x = torch.randn(rows, k)
        narrow = native.block_linear(x, interleave(weight, 8), None)
        assert torch.equal(native.block_linear(x, interleave(weight, 16), None), narrow)


def test_shapes_the_kernels_do_not_take_are_left_to_the_dense_fp32_weight(native: NativeKernels) -> None:
    weight, dense = quantized_weight("Q8_0", n=12, k=64)  # 12 outputs: not whole groups of eight
    assert interleave(weight) is None and pack_block_weight([weight], native) is None
    assert pack_linear_weight(dense, native).dense is dense


def test_outputs_not_a_multiple_of_sixteen_take_groups_of_eight(native: NativeKernels) -> None:
    weight, _ = quantized_weight("Q4_1", n=24, k=64)
    assert interleave(weight, 16) is None
    packed = pack_block_weight([weight], native)
    assert packed is not None and packed.blocks is not None and packed.blocks.layout == "q4x8"


def test_blocks_are_the_weights_one_form_read_at_every_row_count(native: NativeKernels) -> None:
    weight, dense = quantized_weight("Q4_1", n=96, k=128)
    packed = pack_block_weight([weight], native)
    assert packed is not None and packed.blocks is not None and packed.blocks.layout == f"q4x{native.block_group}"
    assert (packed.packed, packed.dense, packed.rows) == (None, None, None), "no float copy beside the blocks"
    dispatch = NativeDispatch(native)
    for rows in (1, NATIVE_BLOCK_ROWS, NATIVE_BLOCK_ROWS + 1, 300):
        x = torch.randn(rows, 128)
        rounded = rounds_x(native, native.block_group, "Q4_1", rows)
        assert_linear_close(dispatch.linear(x, packed), x, dense, "Q4_1", rounded=rounded)


@pytest.mark.parametrize("kind", ["Q5_0", *K_QUANTS, "MXFP4"])
def test_pack_block_weight_keeps_the_new_kinds_as_blocks_read_at_every_row_count(native: NativeKernels, kind: str):
    """QuantizedWeight(kind, blocks [out, row bytes], in) through the CPU backend's packing and dispatch: the blocks
    in the library's group width, at decode's row counts and prefill's."""
    k = inputs(kind)
    weight, dense = quantized_weight(kind, n=64, k=k, seed=1)
    packed = pack_block_weight([weight], native)
    assert packed is not None and packed.blocks is not None and packed.dense is None
    assert packed.blocks.layout == f"{LAYOUT_OF[kind]}{native.block_group}"
    dispatch = NativeDispatch(native)
    for rows in (1, 3, 16, NATIVE_BLOCK_ROWS, 64):
        x = torch.randn(rows, k)
        rounded = rounds_x(native, native.block_group, kind, rows)
        assert_linear_close(dispatch.linear(x, packed), x, dense, kind, rounded=rounded)


def test_the_loader_keeps_blocks_that_dequantize_to_its_weights(tmp_path) -> None:
    hf_dir = make_tiny_llama(tmp_path / "llama", hidden_size=64, intermediate_size=128)
    loaded = load_model(write_tiny_gguf(tmp_path / "llama.gguf", hf_dir, "Q4_1"))
    assert {name for name, w in loaded.weights.items() if w.dim() == 2} == set(loaded.quantized)
    for name, weight in loaded.quantized.items():  # q/k rows unpermuted the same way for blocks and values
        qtype = GGMLQuantizationType[weight.kind]
        values = dequantize(weight.blocks.numpy(), qtype).reshape(weight.out_features, weight.in_features)
        assert torch.equal(torch.from_numpy(values), loaded.weights[name]), name
    fused = QuantizedWeight.concat([loaded.quantized[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert fused is not None and fused.out_features == sum(
        loaded.weights[f"model.layers.0.self_attn.{p}_proj.weight"].shape[0] for p in "qkv"
    )
    f32 = load_model(write_tiny_gguf(tmp_path / "llama.f32.gguf", hf_dir, "F32"))
    assert f32.quantized == {}, "only kinds a backend reads are kept"


def test_a_fused_linear_whose_parts_differ_in_kind_reads_each_parts_blocks(native: NativeKernels) -> None:
    """A Q4_K_M file's q and k are Q4_K, its v Q6_K: the fused qkv keeps each part's blocks, outputs side by side;
    neighbouring parts of one kind are one weight."""
    q, q_dense = quantized_weight("Q4_K", n=64, k=256, seed=2)
    v, v_dense = quantized_weight("Q6_K", n=32, k=256, seed=3)
    packed = pack_block_weight([q, v], native)
    assert packed is not None and packed.blocks is None and [b.out_features for b in packed.parts] == [64, 32]
    dispatch = NativeDispatch(native)
    bias = torch.randn(96)
    for rows in (1, 7, 64):
        x = torch.randn(rows, 256)
        dense = torch.cat([q_dense, v_dense])
        rounded = rounds_x(native, native.block_group, "Q4_K", rows)
        assert_linear_close(dispatch.linear(x, packed, bias), x, dense, "Q4_K", bias, 1e-4, rounded)
    z, z_dense = quantized_weight("Q4_K", n=32, k=256, seed=4)
    b, b_dense = quantized_weight("Q4_K", n=16, k=256, seed=5)
    packed = pack_block_weight([v, q, z, b], native)  # one kind, then three of another (Qwen3.5's qkv; z, b, a)
    assert packed is not None and [p.out_features for p in packed.parts] == [32, 112], "neighbours of a kind, one call"
    x = torch.randn(1, 256)
    dense = torch.cat([v_dense, q_dense, z_dense, b_dense])
    assert_linear_close(dispatch.linear(x, packed), x, dense, "Q4_K", atol=1e-4)
