"""The CUDA backend's triton kernels against the torch ops they replace.

Not collected by default (no test_ prefix): test_triton_kernels.py runs this file in a fresh interpreter with
TRITON_INTERPRET=1 (on the CPU), because triton reads that variable when it is first imported, and again natively on
a CUDA machine. Run by hand: `TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/backends/triton_kernel_checks.py`."""

from __future__ import annotations

import functools
import os
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sagellm.backends import torch_ops
from sagellm.backends.attention_metadata import AttentionMetadata, PrefillChunk
from sagellm.backends.base import Availability
from sagellm.backends.cuda import CudaBackend
from sagellm.backends.layer_caches import PagedKv, RecurrentStates
from sagellm.backends.layer_specs import AttentionSpec, DeltaNetSpec, MoeSpec
from sagellm.backends.quantized import QuantizedWeight
from sagellm.backends.torch_ops.linear_attention import gated_delta_net

pytest.importorskip("triton")
import sagellm.backends.triton_kernels as kernels  # noqa: E402  (after the skip: needs triton)

DEVICE = torch.device("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda")


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(DEVICE)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("tokens", "hidden"), [(1, 64), (5, 576), (3, 100)])
def test_rmsnorm_and_add_rmsnorm(tokens: int, hidden: int) -> None:
    x, residual, weight = randn(tokens, hidden), randn(tokens, hidden), randn(hidden).abs() + 0.5
    close(kernels.rmsnorm(x, weight, 1e-6), torch_ops.rmsnorm(x, weight, 1e-6))
    normed, summed = kernels.add_rmsnorm(x, residual, weight, 1e-5)
    expected_normed, expected_summed = torch_ops.add_rmsnorm(x, residual, weight, 1e-5)
    close(summed, expected_summed)
    close(normed, expected_normed)


@pytest.mark.parametrize(
    ("hq", "hk", "d", "rotary"),
    [(4, 4, 64, 64), (9, 3, 64, 64), (6, 2, 80, 80), (4, 2, 64, 16), (6, 2, 80, 48)],  # rotary < d: partial rotary
)
def test_rope_on_strided_qkv_views(hq: int, hk: int, d: int, rotary: int) -> None:
    tokens = 7
    qkv = randn(tokens, (hq + 2 * hk) * d)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    positions = torch.tensor([0, 1, 5, 16, 17, 200, 255], device=DEVICE)
    cos_sin = randn(256, rotary)
    for actual, expected in zip(kernels.rope(q, k, positions, cos_sin), torch_ops.rope(q, k, positions, cos_sin)):
        close(actual, expected)


@pytest.mark.parametrize(("tokens", "inter"), [(1, 1536), (4, 100), (3, 2500)])
def test_silu_mul(tokens: int, inter: int) -> None:
    x = randn(tokens, 2 * inter)
    close(kernels.silu_mul(x), torch_ops.silu_mul(x))


@pytest.mark.parametrize(("hq", "hk", "d"), [(4, 4, 64), (9, 3, 64), (8, 2, 32), (7, 1, 48)])
def test_paged_decode_attention(paged_sequences: type, hq: int, hk: int, d: int) -> None:
    seqs = paged_sequences(hq, hk, d, seed=hq + d, device=DEVICE)
    for decodes, prefills in [([], [("a", 1), ("b", 15), ("c", 16), ("d", 33), ("e", 58)]), (list("abcde"), [])]:
        q, k, v, meta, _ = seqs.step(decodes, prefills)
        torch_ops.write_kv(k, v, seqs.cache, meta.slot_mapping)
    args = (q, seqs.cache, meta.decode_block_tables, meta.decode_context_lens, AttentionSpec(d**-0.5))
    close(kernels.paged_decode_attention(*args), torch_ops.paged_decode_attention(*args))


def test_attention_with_triton_decode_matches_torch(paged_sequences: type) -> None:
    """The CUDA backend's attention: the shared torch op with the triton kernel as its decode half."""
    triton_attention = functools.partial(torch_ops.attention, decode=kernels.paged_decode_attention)
    seqs = paged_sequences(9, 3, 64, device=DEVICE)
    for decodes, prefills in [([], [("a", 20), ("b", 17)]), (["a", "b"], [("c", 9)]), (["c", "a"], [("b", 12)])]:
        q, k, v, meta, _ = seqs.step(decodes, prefills)
        cache = PagedKv(*(c.clone() for c in seqs.cache))
        expected = torch_ops.attention(q, k, v, seqs.cache, meta, AttentionSpec(0.125))
        close(triton_attention(q, k, v, cache, meta, AttentionSpec(0.125)), expected)
        assert all(torch.equal(mine, theirs) for mine, theirs in zip(cache, seqs.cache))


@pytest.mark.parametrize(
    ("hq", "hk", "d", "window", "softcap"),
    [
        (9, 3, 64, 20, 0.0),  # a window not a multiple of the block size, shorter and longer than the contexts
        (8, 2, 32, 16, 0.0),  # exactly one block
        (4, 4, 64, 0, 5.0),  # soft-capped scores, no window
        (7, 1, 48, 37, 2.0),  # both, multi-query
    ],
)
def test_paged_decode_attention_with_window_and_softcap(
    paged_sequences: type, hq: int, hk: int, d: int, window: int, softcap: float
) -> None:
    """Each context against the torch op's mask and cap: below, at and above the window."""
    seqs = paged_sequences(hq, hk, d, seed=window + d, device=DEVICE)
    for decodes, prefills in [([], [("a", 1), ("b", 15), ("c", 16), ("d", 33), ("e", 58)]), (list("abcde"), [])]:
        q, k, v, meta, _ = seqs.step(decodes, prefills)
        torch_ops.write_kv(k, v, seqs.cache, meta.slot_mapping)
    q = q * 4  # scores of several units, so the cap bends them
    args = (q, seqs.cache, meta.decode_block_tables, meta.decode_context_lens)
    spec = AttentionSpec(d**-0.5, window, softcap)
    expected = torch_ops.paged_decode_attention(*args, spec)
    close(kernels.paged_decode_attention(*args, spec), expected)
    if window or softcap:
        plain = torch_ops.paged_decode_attention(*args, AttentionSpec(d**-0.5))
        assert not torch.allclose(expected, plain, atol=1e-3), "an option that acts"


@pytest.mark.parametrize(("hq", "hk", "d", "window"), [(9, 3, 64, 0), (8, 2, 32, 20)])
def test_paged_decode_attention_with_sinks(paged_sequences: type, hq: int, hk: int, d: int, window: int) -> None:
    """gpt-oss's attention sinks (a logit per query head in each softmax's denominator) against the torch op's."""
    seqs = paged_sequences(hq, hk, d, seed=d, device=DEVICE)
    for decodes, prefills in [([], [("a", 1), ("b", 15), ("c", 58)]), (list("abc"), [])]:
        q, k, v, meta, _ = seqs.step(decodes, prefills)
        torch_ops.write_kv(k, v, seqs.cache, meta.slot_mapping)
    sinks = torch.linspace(-4.0, 6.0, hq).to(DEVICE)
    args = (q * 3, seqs.cache, meta.decode_block_tables, meta.decode_context_lens)
    spec = AttentionSpec(d**-0.5, window, sinks=sinks)
    expected = torch_ops.paged_decode_attention(*args, spec)
    close(kernels.paged_decode_attention(*args, spec), expected)
    unsunk = torch_ops.paged_decode_attention(*args, AttentionSpec(d**-0.5, window))
    assert not torch.allclose(expected, unsunk, atol=1e-3)


# Gated DeltaNet: (Hk, Dk, Hv, Dv) of Qwen3.5's shape in small, then a Dk and a Dv off powers of 2 (Dv in 3 blocks)
GDN_DIMS = [(2, 16, 4, 16), (1, 12, 3, 20)]
GDN_WIDTH = 4  # the convolution's taps


def check_gated_delta_net(
    dims: tuple[int, int, int, int], decode_slots: list[int], chunks: list[tuple], tiled: bool = False
) -> None:
    """One batch (decodes, then prefill chunks given as (query_len, source_slot, state_slot, checkpoint)) through the
    triton op and the torch op from the same random states: outputs and every slot of both states must agree. Random
    states, so a chunk from position 0 that read a slot, or a write to a wrong slot, shows."""
    hk, dk, hv, dv = dims
    channels = 2 * hk * dk + hv * dv
    g = torch.Generator().manual_seed(sum(dims) + len(chunks))
    tokens = len(decode_slots) + sum(n for n, *_ in chunks)
    qkv, b, a = (torch.randn(tokens, n, generator=g).to(DEVICE) for n in (channels, hv, hv))
    weights = {
        "conv_weight": (torch.randn(channels, GDN_WIDTH, generator=g) * 0.5).to(DEVICE),
        "a_log": torch.rand(hv, generator=g).add(0.1).log().to(DEVICE),
        "dt_bias": torch.randn(hv, generator=g).to(DEVICE),
    }
    states = RecurrentStates(
        torch.randn(8, channels, GDN_WIDTH - 1, generator=g), torch.randn(8, hv, dk, dv, generator=g)
    )
    meta = AttentionMetadata(slot_mapping=torch.zeros(tokens, dtype=torch.int64), block_size=16)
    meta.num_decode_tokens = len(decode_slots)
    meta.decode_state_slots = torch.tensor(decode_slots, device=DEVICE)
    start, no_blocks = len(decode_slots), torch.zeros(1, dtype=torch.int32)
    for n, source, slot, checkpoint in chunks:
        chunk = PrefillChunk(start, n, n, no_blocks, state_slot=slot, source_slot=source, checkpoint=checkpoint)
        meta.prefills.append(chunk)
        start += n
    expected_states, actual_states = (RecurrentStates(*(s.to(DEVICE, copy=True) for s in states)) for _ in range(2))
    spec = DeltaNetSpec(states, **weights, num_k_heads=hk, head_k_dim=dk, head_v_dim=dv, tiled_value_heads=tiled)
    expected = gated_delta_net(qkv, b, a, meta, replace(spec, states=expected_states))
    actual = kernels.gated_delta_net(qkv, b, a, meta, replace(spec, states=actual_states))
    for got, want in zip([actual, *actual_states], [expected, *expected_states]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dims", GDN_DIMS)
def test_gated_delta_net_decodes_read_and_write_their_slots(dims: tuple[int, int, int, int]) -> None:
    check_gated_delta_net(dims, decode_slots=[4, 0, 2], chunks=[])


@pytest.mark.parametrize("dims", GDN_DIMS)
def test_gated_delta_net_prefill_from_zero(dims: tuple[int, int, int, int]) -> None:
    check_gated_delta_net(dims, decode_slots=[], chunks=[(20, -1, 3, None)])


@pytest.mark.parametrize("dims", GDN_DIMS)
def test_gated_delta_net_prefill_continuing_from_a_slot(dims: tuple[int, int, int, int]) -> None:
    """From its own slot (chunked prefill), and from another that it leaves as it was (a prefix checkpoint)."""
    check_gated_delta_net(dims, decode_slots=[], chunks=[(12, 1, 1, None), (9, 3, 0, None)])


def test_gated_delta_net_with_value_heads_tiled_by_key_head() -> None:
    """A GGUF's order (value head h reads key head h % Hk): decodes and a prefill chunk, as the torch op reads it."""
    check_gated_delta_net((2, 16, 6, 16), decode_slots=[4, 0], chunks=[(9, -1, 3, None)], tiled=True)


@pytest.mark.parametrize("at", [0, 7, 16])
def test_gated_delta_net_checkpoint(at: int) -> None:
    """The states after the chunk's first `at` tokens are copied to the checkpoint's slot: at 0, inside, at the end."""
    check_gated_delta_net(GDN_DIMS[0], decode_slots=[], chunks=[(16, 2, 2, (at, 5))])


def test_gated_delta_net_mixed_batch() -> None:
    """Decodes and chunks of every kind in one batch, no slot written by one and read by another: each reads its own
    rows and slots."""
    chunks = [(9, -1, 0, (4, 3)), (10, 6, 4, None), (5, 5, 5, None)]
    check_gated_delta_net(GDN_DIMS[1], decode_slots=[2, 1], chunks=chunks)


def mxfp4_rows(rows: int, in_features: int, seed: int, exponents: tuple[int, int] = (115, 136)) -> torch.Tensor:
    """Random GGML MXFP4 rows, uint8 [rows, in / 32 * 17]: exponent bytes in [exponents), random codes."""
    g = np.random.default_rng(seed)
    blocks = g.integers(0, 256, (rows, in_features // 32, 17), dtype=np.uint8)
    blocks[..., 0] = g.integers(*exponents, blocks.shape[:2])
    return torch.from_numpy(blocks.reshape(rows, -1))


def gguf_floats(blocks: torch.Tensor, in_features: int) -> torch.Tensor:
    """gguf-py's floats of MXFP4 rows, fp32 [rows, in_features]."""
    values = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.MXFP4)
    return torch.from_numpy(values.reshape(-1, in_features))


def close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Within rtol of each value and of the largest: MXFP4 weights span 2^-13..1536 here, so sums of thousands
    cancel to values whose fp32 rounding is the large terms'."""
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=1e-5 * expected.abs().max().item())


def mxfp4_weight(
    rows: int, in_features: int, seed: int, exponents: tuple[int, int] = (115, 136)
) -> tuple[kernels.Mxfp4Weight, torch.Tensor]:
    """(random MXFP4 rows as the CUDA backend packs them, their gguf-py floats on DEVICE)."""
    blocks = mxfp4_rows(rows, in_features, seed, exponents)
    return kernels.Mxfp4Weight(blocks.to(DEVICE), in_features), gguf_floats(blocks, in_features).to(DEVICE)


@pytest.mark.parametrize(
    ("tokens", "out_features", "in_features", "dtype", "has_bias"),
    [
        (1, 72, 96, torch.float32, False),  # decode's row; N off the tile, K 3 blocks (one partial step)
        (3, 100, 160, torch.float32, True),
        (17, 64, 288, torch.float32, True),  # K 9 blocks: two full steps and one block
        (70, 40, 32, torch.float32, True),  # two tiles of rows, K one block
        (3, 72, 160, torch.bfloat16, False),
        (17, 130, 96, torch.bfloat16, True),
    ],
)
def test_mxfp4_linear_matches_gguf_dequantize(
    tokens: int, out_features: int, in_features: int, dtype: torch.dtype, has_bias: bool
) -> None:
    weight, floats = mxfp4_weight(out_features, in_features, seed=tokens + out_features + in_features)
    x = randn(tokens, in_features + 8).to(dtype)[:, 8:]  # rows strided as a view of a wider tensor's
    bias = randn(out_features) if has_bias else None
    y = kernels.mxfp4_linear(x, weight, bias)
    expected = F.linear(x.float(), floats, bias)  # [T, N], fp32
    assert y.dtype == dtype and y.shape == (tokens, out_features)
    bf16 = dtype == torch.bfloat16  # y rounded to 8 bits (truncated when interpreted)
    close_to_scale(y, expected, rtol=1e-2 if bf16 else 1e-5)


def test_mxfp4_linear_weights_are_gguf_floats_exactly() -> None:
    """x the identity: y is the weight transposed, bit for bit, over every exponent whose values stay finite (the
    smallest two are gguf-py's denormal scales)."""
    blocks = mxfp4_rows(40, 96, seed=1, exponents=(0, 253))
    y = kernels.mxfp4_linear(torch.eye(96, device=DEVICE), kernels.Mxfp4Weight(blocks.to(DEVICE), 96))
    assert torch.equal(y, gguf_floats(blocks, 96).to(DEVICE).t())


class CudaBackendOnDevice(CudaBackend):
    """The CUDA backend's packing and kernel table on DEVICE, without its GPU check (the interpreter's is the CPU)."""

    device_type = DEVICE.type

    @classmethod
    def availability(cls) -> Availability:
        return Availability(True, "the checks' device")


def test_cuda_backend_keeps_mxfp4_blocks_only() -> None:
    """MXFP4 parts (gate, up) stay blocks, their rows stacked; a Q4_K part, alone or beside MXFP4, is left to the
    floats; the table's linear reads both forms."""
    backend = CudaBackendOnDevice()
    gate, up = (QuantizedWeight("MXFP4", mxfp4_rows(n, 256, seed=n), 256) for n in (24, 40))
    packed = backend.prepare_block_weight([gate, up])
    assert isinstance(packed, kernels.Mxfp4Weight) and (packed.out_features, packed.in_features) == (64, 256)
    assert packed.blocks.device.type == DEVICE.type
    assert torch.equal(packed.blocks.cpu(), torch.cat([gate.blocks, up.blocks]))
    q4_k = QuantizedWeight("Q4_K", torch.zeros(8, 144, dtype=torch.uint8), 256)
    assert backend.prepare_block_weight([q4_k]) is None
    assert backend.prepare_block_weight([gate, q4_k]) is None

    linear = backend.kernels()["linear"]
    x, bias, dense = randn(3, 256), randn(64), randn(64, 256)
    floats = torch.cat([gguf_floats(p.blocks, 256) for p in (gate, up)]).to(DEVICE)
    close_to_scale(linear(x, packed, bias), F.linear(x, floats, bias))
    close(linear(x, dense, bias), F.linear(x, dense, bias))


def test_cuda_linear_on_bf16_weights_takes_and_gives_fp32() -> None:
    """dtype=bfloat16 packs dense weights in bf16 while activations stay fp32: the table's linear casts x (and the
    bias) to the weight's dtype and its output back."""
    linear = CudaBackendOnDevice().kernels()["linear"]
    x, weight, bias = randn(5, 96), randn(40, 96), randn(40)
    y = linear(x, weight.to(torch.bfloat16), bias)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, weight, bias), rtol=2e-2, atol=0.1)


def test_moe_on_mxfp4_experts_through_the_cuda_linear() -> None:
    """gpt-oss's MoE as lowering binds it on CUDA (each expert an Mxfp4Weight, `linear` the table's): as on the
    experts' floats stacked, biases and the clamped SwiGLU included. Weights below 1.5, so few activations clamp."""
    experts, hidden, inter, tokens = 4, 64, 32, 6
    small = (118, 126)
    gate_up, gate_up_floats = zip(*(mxfp4_weight(2 * inter, hidden, e, small) for e in range(experts)))
    down, down_floats = zip(*(mxfp4_weight(hidden, inter, 10 + e, small) for e in range(experts)))
    x, router = randn(tokens, hidden), randn(experts, hidden)
    biases = {
        "router_bias": randn(experts),
        "gate_up_bias": randn(experts, 2 * inter),
        "down_bias": randn(experts, hidden),
    }
    spec = functools.partial(MoeSpec, router, top_k=2, first_expert=0, activation="swiglu_oai", **biases)
    linear = CudaBackendOnDevice().kernels()["linear"]
    actual = torch_ops.moe(x, spec(list(gate_up), list(down)), linear=linear)
    expected = torch_ops.moe(x, spec(torch.stack(gate_up_floats), torch.stack(down_floats)))
    close_to_scale(actual, expected)
