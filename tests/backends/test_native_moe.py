"""The CPU backend's native mixture of experts (moe.c, one call for decode's few rows) against the torch op over the
same block linears: gpt-oss's MXFP4 experts with biases and clamped SwiGLU, Qwen-MoE's K-quant experts with SiLU and
unnormalized weights, an expert parallel rank's share, a NaN row kept to itself; and the cases it leaves to torch."""

from __future__ import annotations

import functools

import pytest
import torch

from sagellm.backends import torch_ops
from sagellm.backends.cpu import NATIVE_BLOCK_ROWS, CpuBackend
from sagellm.backends.layer_specs import MoeSpec
from tests.backends.test_block_linear import quantized_weight

E, TOP_K = 8, 3


@functools.cache
def table() -> dict:
    kernels = CpuBackend().kernels()
    if "decoder_layers" not in kernels:
        pytest.skip("no native kernels here (no C compiler)")
    return kernels


def experts(kind: str, hidden: int, inter: int, count: int, seed: int = 0) -> tuple[list, list]:
    backend = CpuBackend()
    gate_up = [
        backend.prepare_block_weight([quantized_weight(kind, 2 * inter, hidden, seed + e)[0]]) for e in range(count)
    ]
    down = [
        backend.prepare_block_weight([quantized_weight(kind, hidden, inter, seed + 100 + e)[0]]) for e in range(count)
    ]
    return gate_up, down


def both(
    x, router, gate_up, down, first, normalize, biases, routing=None, **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """The native op's output and the torch op's over the same `linear`."""
    kernels = table()
    assert kernels["moe"].__self__._native_experts(gate_up, down) is not None or isinstance(gate_up, torch.Tensor)
    spec = MoeSpec(router, gate_up, down, TOP_K, first, normalize, *biases, **options)
    native = kernels["moe"](x, spec, linear=kernels["linear"], routing=routing)
    reference = torch_ops.moe(x, spec, linear=kernels["linear"], routing=routing)
    return native, reference


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_gpt_oss_experts_match_the_torch_op(rows: int) -> None:
    hidden, inter = 64, 96
    gate_up, down = experts("MXFP4", hidden, inter, E)
    g = torch.Generator().manual_seed(rows)
    router = torch.randn(E, hidden, generator=g)
    biases = (torch.randn(E, generator=g), torch.randn(E, 2 * inter, generator=g), torch.randn(E, hidden, generator=g))
    x = torch.randn(rows, hidden, generator=g)
    native, reference = both(x, router, gate_up, down, 0, True, biases, activation="swiglu_oai", alpha=1.702, limit=7.0)
    torch.testing.assert_close(native, reference, rtol=1e-4, atol=1e-5)


def test_qwen_moe_experts_unnormalized_and_a_ranks_share_match_the_torch_op() -> None:
    hidden, inter = 256, 256  # a K-quant's super-block of inputs
    gate_up, down = experts("Q4_K", hidden, inter, 4)  # experts 2..5 of 8: an expert parallel rank's
    g = torch.Generator().manual_seed(0)
    router, x = torch.randn(E, hidden, generator=g), torch.randn(4, hidden, generator=g)
    native, reference = both(x, router, gate_up, down, 2, False, (None, None, None))
    assert native.abs().sum() > 0  # some rows chose a held expert
    torch.testing.assert_close(native, reference, rtol=1e-4, atol=1e-5)


def test_a_nan_row_stays_its_own() -> None:
    hidden, inter = 64, 32
    gate_up, down = experts("MXFP4", hidden, inter, E)
    router, x = torch.randn(E, hidden), torch.randn(3, hidden)
    x[1, 5] = float("nan")
    native, reference = both(x, router, gate_up, down, 0, True, (None, None, None), activation="swiglu_oai")
    assert native[1].isnan().all()
    torch.testing.assert_close(native[[0, 2]], reference[[0, 2]], rtol=1e-4, atol=1e-5)


def test_what_it_does_not_take_runs_the_torch_op() -> None:
    """Gemma 4's experts (routed from their own input, scaled), float experts and prefill's many rows."""
    hidden, inter = 64, 32
    gate_up, down = experts("MXFP4", hidden, inter, E)
    g = torch.Generator().manual_seed(3)
    router, x, routing = (
        torch.randn(E, hidden, generator=g),
        torch.randn(2, hidden, generator=g),
        torch.randn(2, hidden),
    )
    scaled = dict(routing=routing, expert_scale=torch.rand(E) + 0.5, activation="gelu_tanh")
    native, reference = both(x, router, gate_up, down, 0, True, (None, None, None), **scaled)
    assert torch.equal(native, reference)
    stacked = torch.randn(E, 2 * inter, hidden), torch.randn(E, hidden, inter)
    native, reference = both(x, router, *stacked, 0, True, (None, None, None))
    assert torch.equal(native, reference)
    many = torch.randn(NATIVE_BLOCK_ROWS + 1, hidden)
    native, reference = both(many, router, gate_up, down, 0, True, (None, None, None))
    assert torch.equal(native, reference)
