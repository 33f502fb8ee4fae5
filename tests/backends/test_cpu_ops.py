"""Every op of the CPU backend's kernel table against a naive fp64 reference written out with explicit math."""

from __future__ import annotations

import math

import pytest
import torch

from sagellm.backends.cpu import CpuBackend
from sagellm.backends.cpu_linear import GEMV_COPY_OUT
from sagellm.backends.layer_specs import AttentionSpec
from sagellm.backends.torch_ops import write_kv


@pytest.fixture(scope="module")
def backend() -> CpuBackend:
    return CpuBackend()


@pytest.fixture(scope="module")
def ops(backend: CpuBackend) -> dict:
    return backend.kernels()


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=atol)


def test_embedding(ops: dict) -> None:
    weight = torch.randn(50, 24)
    ids = torch.tensor([3, 0, 49, 3])
    expected = torch.stack([weight[i] for i in ids.tolist()])
    assert torch.equal(ops["embedding"](ids, weight), expected)


def naive_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = []
    for row in x.double():
        rms = math.sqrt(sum(v * v for v in row.tolist()) / row.numel() + eps)
        rows.append(row / rms * weight.double())
    return torch.stack(rows)


@pytest.mark.parametrize("hidden", [64, 576])
def test_rmsnorm_and_add_rmsnorm(ops: dict, hidden: int) -> None:
    x, residual, weight = torch.randn(5, hidden), torch.randn(5, hidden), torch.rand(hidden) + 0.5
    close(ops["rmsnorm"](x, weight, 1e-6), naive_rmsnorm(x, weight, 1e-6))
    normed, summed = ops["add_rmsnorm"](x, residual, weight, 1e-5)
    close(summed, x.double() + residual.double())
    close(normed, naive_rmsnorm(x + residual, weight, 1e-5))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(
    ("tokens", "k", "n", "dtype"),
    [
        (1, 96, 200, torch.float32),  # one row: the native GEMV on the dense weight (oneDNN without a compiler)
        (17, 96, 200, torch.float32),  # oneDNN-packed weight
        (1, 8, GEMV_COPY_OUT.start, torch.float32),  # gate_up-sized: native, or MKL on the [in, out] copy
        (3, 8, GEMV_COPY_OUT.start, torch.float32),
        (1, 8, GEMV_COPY_OUT.stop, torch.float32),  # vocabulary-sized: oneDNN again
        (2, 24, 40, torch.float64),  # a dtype oneDNN does not take: dense weight, F.linear
    ],
)
def test_linear_on_packed_weight(
    backend: CpuBackend, ops: dict, tokens: int, k: int, n: int, dtype: torch.dtype, with_bias: bool
) -> None:
    x, weight = torch.randn(tokens, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    expected = torch.tensor(
        [[sum(a * b for a, b in zip(row, col)) for col in weight.double().tolist()] for row in x.double().tolist()],
        dtype=torch.float64,
    )
    if bias is not None:
        expected += bias.double()
    close(ops["linear"](x, backend.prepare_linear_weight(weight), bias), expected, atol=3e-5)


def cos_sin_table(max_pos: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [D/2]
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)  # [P, D/2]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()  # [P, D]


def naive_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    out = torch.empty(x.shape, dtype=torch.float64)
    for t, pos in enumerate(positions.tolist()):
        cos, sin = cos_sin[pos, :half].double(), cos_sin[pos, half:].double()
        for h in range(x.shape[1]):
            x1, x2 = x[t, h, :half].double(), x[t, h, half:].double()
            out[t, h] = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin])
    return out


def test_rope_on_strided_qkv_views(ops: dict) -> None:
    tokens, hq, hk, d = 6, 4, 2, 32
    qkv = torch.randn(tokens, (hq + 2 * hk) * d)
    q = qkv[:, : hq * d].view(tokens, hq, d)  # strided views, as the model graph produces them
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    positions = torch.tensor([0, 1, 2, 7, 100, 511])
    cos_sin = cos_sin_table(512, d)
    q_rot, k_rot = ops["rope"](q, k, positions, cos_sin)
    close(q_rot, naive_rope(q, positions, cos_sin))
    close(k_rot, naive_rope(k, positions, cos_sin))


def test_silu_mul_and_add(ops: dict) -> None:
    x = torch.randn(3, 2 * 40)
    gate, up = x[:, :40].double(), x[:, 40:].double()
    close(ops["silu_mul"](x), gate / (1 + torch.exp(-gate)) * up)
    y = torch.randn(3, 80)
    close(ops["add"](x, y), x.double() + y.double())


@pytest.mark.parametrize(("hq", "hk", "d"), [(4, 4, 32), (9, 3, 64), (8, 1, 16)])
def test_attention_mixed_decode_and_prefill_chunks(ops: dict, paged_sequences: type, hq: int, hk: int, d: int) -> None:
    seqs = paged_sequences(hq, hk, d)
    scale = d**-0.5
    schedule = [
        ([], [("a", 37), ("b", 20), ("c", 16)]),  # fresh prefills, one exactly a block long
        (["a", "c"], [("b", 30), ("d", 5)]),  # decodes + a chunk with earlier context + a fresh prefill
        (["a", "b", "c", "d"], []),  # decodes only, ragged contexts 39, 51, 18, 6
        (["b"], [("d", 40), ("a", 1)]),  # a chunk spanning blocks after 6 tokens; a one-token chunk
    ]
    results = []
    for decodes, prefills in schedule:
        q, k, v, meta, owners = seqs.step(decodes, prefills)
        out = ops["attention"](q, k, v, seqs.cache, meta, AttentionSpec(scale))
        results.append((out, q, owners))
    for out, q, owners in results:  # checked after all steps: no output aliases the reused gather buffers
        close(out, seqs.reference(q, owners, scale))


def test_attention_writes_kv_at_slots(ops: dict, paged_sequences: type) -> None:
    seqs = paged_sequences(2, 2, 8)
    q, k, v, meta, _ = seqs.step([], [("a", 21)])
    ops["attention"](q, k, v, seqs.cache, meta, AttentionSpec(1.0))
    assert torch.equal(seqs.cache.k.flatten(0, 1)[meta.slot_mapping], k)
    assert torch.equal(seqs.cache.v.flatten(0, 1)[meta.slot_mapping], v)


def test_paged_decode_attention_ragged(ops: dict, paged_sequences: type) -> None:
    seqs = paged_sequences(6, 2, 32, seed=3)
    for decodes, prefills in [([], [("a", 1), ("b", 15), ("c", 16), ("d", 17), ("e", 70)]), (list("abcde"), [])]:
        q, k, v, meta, owners = seqs.step(decodes, prefills)
        write_kv(k, v, seqs.cache, meta.slot_mapping)
    # decode contexts 2, 16, 17, 18, 71
    out = ops["paged_decode_attention"](
        q, seqs.cache, meta.decode_block_tables, meta.decode_context_lens, AttentionSpec(0.3)
    )
    close(out, seqs.reference(q, owners, 0.3))
