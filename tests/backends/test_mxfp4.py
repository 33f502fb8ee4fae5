"""MXFP4 (gpt-oss's expert weights) as a kept kind: dequantized as gguf-py does, repacked from Hugging Face's
blocks and scales to exactly transformers' values, read by the CPU backend's native linear at decode's and prefill's
row counts on every instruction-set variant this CPU runs, and kept as blocks, expert by expert, by the GGUF
loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from sagellm.backends.cpu import NativeDispatch
from sagellm.backends.cpu_linear import pack_block_weight
from sagellm.backends.mxfp4 import Mxfp4LayoutError, experts_from_hf, ggml_blocks_from_hf, weight_from_hf
from sagellm.backends.native import NativeKernels
from sagellm.backends.quantized import QuantizedWeight
from sagellm.runtime.models.dequantize import dequantize
from sagellm.runtime.models.loader import load_model
from tests.backends.test_block_linear import assert_linear_close
from tests.tiny_models import make_tiny_mixtral, write_tiny_gguf

MXFP4 = GGMLQuantizationType.MXFP4


def dense(weight: QuantizedWeight) -> torch.Tensor:
    """gguf-py's floats of `weight`, [out, in]."""
    values = gguf_dequantize(weight.blocks.numpy(), MXFP4)
    return torch.from_numpy(values.reshape(weight.out_features, weight.in_features).copy())


def hf_tensors(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Hugging Face blocks [..., in / 32, 16] (any codes) and scales [..., in / 32], exponents from the
    subnormal 2^-127 to 2^127 (255 excepted: transformers' 2^128 overflows where ggml's is finite)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=generator)
    scales = torch.randint(0, 255, shape, dtype=torch.uint8, generator=generator)
    return blocks, scales


def random_weight(n: int, k: int, seed: int = 0) -> QuantizedWeight:
    values = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    return QuantizedWeight("MXFP4", torch.from_numpy(quantize(values, MXFP4)), k)


def test_dequantize_is_gguf_pys_bit_for_bit_at_every_exponent() -> None:
    raw = np.random.default_rng(0).integers(0, 256, (512, 17 * 4), dtype=np.uint8)
    raw[:256, ::17] = np.arange(256, dtype=np.uint8).reshape(-1, 1)  # every exponent, subnormal and 255 included
    with np.errstate(over="ignore"):  # 255 times 12 is inf in both
        ours, theirs = dequantize(raw, MXFP4, (512, 128)), gguf_dequantize(raw, MXFP4).reshape(512, 128)
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs)


def test_hugging_faces_experts_repack_to_exactly_transformers_values() -> None:
    """No rounding: every expert's blocks dequantize to transformers' floats ([E, in, out], transposed) exactly."""
    blocks, scales = hf_tensors((3, 24, 4))  # 3 experts, 24 outputs, 128 inputs
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    experts = experts_from_hf(blocks, scales)
    assert [(w.kind, w.out_features, w.in_features) for w in experts] == [("MXFP4", 24, 128)] * 3
    for e, weight in enumerate(experts):
        assert torch.equal(dense(weight), expected[e].T)
        assert torch.equal(weight_from_hf(blocks[e], scales[e]).blocks, weight.blocks)


def test_the_repacking_moves_codes_and_keeps_exponents() -> None:
    """Hugging Face's byte j holds inputs 2j, 2j + 1; ggml's byte j inputs j and j + 16, after the exponent."""
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0], blocks[0, 0, 8] = 0x21, 0x43  # inputs 0, 1 -> codes 1, 2; inputs 16, 17 -> codes 3, 4
    ggml = ggml_blocks_from_hf(blocks, torch.tensor([[130]], dtype=torch.uint8))
    assert ggml.shape == (1, 17) and ggml[0, 0] == 130
    assert ggml[0, 1:].tolist() == [0x31, 0x42] + [0] * 14


def test_blocks_and_scales_that_disagree_are_refused() -> None:
    blocks, scales = hf_tensors((2, 8, 4))
    with pytest.raises(Mxfp4LayoutError, match="do not fit"):
        ggml_blocks_from_hf(blocks, scales[:, :, :3])
    with pytest.raises(Mxfp4LayoutError, match="uint8"):
        ggml_blocks_from_hf(blocks.to(torch.int32), scales)
    with pytest.raises(Mxfp4LayoutError, match=r"\[E, out"):
        experts_from_hf(blocks[0], scales[0])
    with pytest.raises(Mxfp4LayoutError, match=r"\[out, in"):
        weight_from_hf(blocks, scales)


def test_rows_concat_and_narrow_work_as_for_the_other_kinds() -> None:
    weight = random_weight(16, 96)
    values = dense(weight)
    assert torch.equal(weight.rows(torch.tensor([3, 0, 3])), values[[3, 0, 3]])
    both = QuantizedWeight.concat([weight, random_weight(8, 96, seed=1)])
    assert both is not None and both.out_features == 24 and torch.equal(dense(both)[:16], values)
    middle = weight.narrow(1, 32, 96)
    assert middle is not None and torch.equal(dense(middle), values[:, 32:96])
    assert weight.narrow(1, 16, 96) is None, "a slice inside a block of 32 has no blocks"
    assert torch.equal(dense(weight.narrow(0, 4, 12)), values[4:12])


@pytest.mark.parametrize("n", [24, 40, 64])  # groups of 8 only (24, 40), or the library's 16
@pytest.mark.parametrize("rows", [1, 3, 64, 200])  # int8 decode, fp32 tiles, prefill's dequantized GEMM
def test_the_cpu_linear_reads_hugging_faces_experts_as_blocks(native: NativeKernels, n: int, rows: int) -> None:
    blocks, scales = hf_tensors((2, n, 10), seed=n)
    scales = scales % 8 + 118  # weights' magnitudes (2^-10 .. 2^-2 times 0.5 .. 6) as gpt-oss's
    expected_weights = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, 320, n]
    dispatch = NativeDispatch(native)
    for e, weight in enumerate(experts_from_hf(blocks, scales)):
        packed = pack_block_weight([weight], native)
        assert packed is not None and packed.blocks is not None and packed.dense is None
        assert packed.blocks.layout == f"mxfp4x{native.block_group if n % native.block_group == 0 else 8}"
        x, bias = torch.randn(rows, 320), torch.randn(n)
        assert_linear_close(dispatch.linear(x, packed, bias), x, expected_weights[e].T, "MXFP4", bias)


def test_outputs_not_whole_groups_of_eight_are_left_to_the_floats(native: NativeKernels) -> None:
    assert pack_block_weight([random_weight(12, 64)], native) is None


def test_the_gguf_loader_keeps_each_experts_mxfp4_blocks(tmp_path) -> None:
    hf_dir = make_tiny_mixtral(tmp_path / "mixtral", hidden_size=64, intermediate_size=96)
    loaded = load_model(write_tiny_gguf(tmp_path / "mixtral.gguf", hf_dir, "MXFP4"))
    experts = {name for name in loaded.quantized if ".experts." in name}
    assert len(experts) == loaded.config.num_layers * 4 * 3  # every layer's 4 experts, 3 projections each
    for name, weight in loaded.quantized.items():
        assert weight.kind == "MXFP4" and torch.equal(dense(weight), loaded.weights[name]), name
