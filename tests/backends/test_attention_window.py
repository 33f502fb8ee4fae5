"""Sliding-window attention and score soft-capping in the native CPU kernels (decode_attention.c, prefill_attention.c,
decoder_layers.c) against the torch ops that define them (backends/torch_ops/attention.py) and a float64 reference.

A window must bound the keys the kernels read, not only mask them: the cache below the lowest visible key is
overwritten with NaN after the reference is taken, so any key or value read there (even one weighted by 0) shows up
as NaN in the output."""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import replace

import pytest
import torch
from gguf import GGMLQuantizationType

from sagellm.backends import torch_ops
from sagellm.backends.cpu import NativeDispatch
from sagellm.backends.cpu_linear import pack_block_weight
from sagellm.backends.decoder_layer import AttentionShape, DecoderLayer, DecoderShape
from sagellm.backends.layer_caches import PagedKv
from sagellm.backends.layer_specs import AttentionSpec
from sagellm.backends.native import NativeKernels, prefill_scratch_size
from sagellm.backends.quantized import QuantizedWeight
from tests.tiny_models import quantize

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler (gcc or cc)"
)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-5, atol=2e-5)


def reference(
    seqs, q: torch.Tensor, owners: list[tuple[str, int]], scale: float, window: int, softcap: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Token by token and head by head in float64: the query at position p over keys p - window < j <= p, each
    scaled score s capped to softcap * tanh(s / softcap), each head's sink (if any) a column of the softmax that is
    dropped after."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = seqs.hq // seqs.hk
    for t, (seq, pos) in enumerate(owners):
        low = max(0, pos - window + 1) if window else 0
        keys, values = seqs.keys[seq][low : pos + 1].double(), seqs.values[seq][low : pos + 1].double()
        for h in range(seqs.hq):
            scores = keys[:, h // group] @ q[t, h].double() * scale
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            if sinks is not None:  # the sink's column joins the softmax, then goes
                scores = torch.cat([scores, sinks[h : h + 1].double()])
            probs = torch.softmax(scores, 0)[: len(keys)]
            out[t, h] = probs @ values[:, h // group]
    return out


def poison_below(seqs, seq: str, low: int) -> None:
    """NaN in the cache at `seq`'s positions below `low`: what a window says is never read."""
    for pos in range(low):
        row = seqs.blocks[seq][pos // seqs.block_size] * seqs.block_size + pos % seqs.block_size
        seqs.cache.k.flatten(0, 1)[row] = math.nan
        seqs.cache.v.flatten(0, 1)[row] = math.nan


def decode_batch(paged_sequences: type, hq: int, hk: int, d: int, prompt_lens: list[int], block_size: int = 16):
    """Sequences prefilled to `prompt_lens` tokens, then one decode step's q, k, v, metadata and owners."""
    seqs = paged_sequences(hq, hk, d, block_size=block_size, seed=len(prompt_lens) + d)
    names = [f"s{i}" for i in range(len(prompt_lens))]
    q, k, v, meta, _ = seqs.step([], list(zip(names, prompt_lens)))
    torch_ops.write_kv(k, v, seqs.cache, meta.slot_mapping)
    q, k, v, meta, owners = seqs.step(names, [])
    torch_ops.write_kv(k, v, seqs.cache, meta.slot_mapping)
    return seqs, q * 3, names, meta, owners  # scores of several units: a cap of a few bends them


@pytest.mark.parametrize(
    ("hq", "hk", "d", "prompt_lens", "block_size", "window", "softcap"),
    [
        (9, 3, 64, [0, 15, 49, 50, 100, 300], 16, 50, 0.0),  # contexts below, at and above a window of 3 blocks + 2
        (9, 3, 64, [255], 16, 0, 4.0),  # soft cap alone, 8 chunks of keys
        (9, 3, 64, [20, 70, 200], 16, 37, 4.0),  # both
        (8, 1, 128, [200, 3], 16, 64, 0.0),  # multi-query, the other specialised head size, a window of whole chunks
        (4, 2, 24, [70, 33], 4, 33, 2.0),  # a head size without a specialised loop, blocks of 4
        (9, 3, 64, [400], 16, 10, 0.0),  # one stream, a window inside one chunk: with two threads, an empty share
        (4, 4, 32, [5, 90], 16, 1, 0.0),  # a window of one: each query sees only itself
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_paged_decode_attention(
    native: NativeKernels,
    paged_sequences: type,
    hq: int,
    hk: int,
    d: int,
    prompt_lens: list[int],
    block_size: int,
    window: int,
    softcap: float,
    threads: int,
) -> None:
    seqs, q, names, meta, owners = decode_batch(paged_sequences, hq, hk, d, prompt_lens, block_size)
    tables, lens, scale = meta.decode_block_tables, meta.decode_context_lens, d**-0.5
    args, spec = (q, seqs.cache, tables, lens), AttentionSpec(scale, window, softcap)
    expected = torch_ops.paged_decode_attention(*args, spec)
    close(expected, reference(seqs, q, owners, scale, window, softcap))  # the torch op is the definition
    if window or softcap:
        plain = torch_ops.paged_decode_attention(*args, AttentionSpec(scale))
        assert not torch.allclose(expected, plain, atol=1e-3), "the options act"
    if window:
        for name, ctx in zip(names, lens.tolist()):
            poison_below(seqs, name, ctx - window)
    close(native.paged_decode_attention(*args, spec, threads), expected)


@pytest.mark.parametrize(
    ("hq", "hk", "d", "chunks", "window", "softcap"),
    [
        (9, 3, 64, [37, 9, 100, 1], 40, 0.0),  # a first chunk inside the window, then chunks past it, one longer
        (9, 3, 64, [256], 100, 0.0),  # a whole prompt longer than the window: 3 tiles of 16 rows, the late ones skip
        (9, 3, 64, [37, 9, 100], 0, 4.0),  # soft cap alone
        (9, 3, 64, [50, 80], 33, 4.0),  # both
        (8, 1, 128, [5, 70], 17, 0.0),  # multi-query, groups of 8 query heads: 6-row tiles
        (32, 1, 16, [3, 40, 7], 8, 2.0),  # 32 query heads on one kv head: one row per tile; a small window
        (4, 2, 16, [90], 1, 0.0),  # a window of one
    ],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_paged_prefill_attention(
    native: NativeKernels,
    paged_sequences: type,
    hq: int,
    hk: int,
    d: int,
    chunks: list[int],
    window: int,
    softcap: float,
    threads: int,
) -> None:
    seqs, scale = paged_sequences(hq, hk, d), d**-0.5
    spec = AttentionSpec(scale, window, softcap)
    for n in chunks:
        q, k, v, meta, owners = seqs.step([], [("a", n)])
        native.write_kv(k, v, seqs.cache, meta.slot_mapping)
        chunk, q = meta.prefills[0], q * 3
        expected = torch_ops.prefill_attention(q, k, v, seqs.cache, chunk, spec)
        close(expected, reference(seqs, q, owners, scale, window, softcap))
        caches = seqs.cache.k.clone(), seqs.cache.v.clone()
        ctx = chunk.context_len
        if window:
            poison_below(seqs, "a", ctx - n - window + 1)  # below the first query's window
        size = prefill_scratch_size(ctx, hk, d, n, window)
        scratch = torch.empty(size)  # exactly the size the C code is told it has
        out = native.paged_prefill_attention(q, seqs.cache, chunk.block_table, ctx, spec, threads, scratch)
        close(out, expected)
        seqs.cache.k.copy_(caches[0]), seqs.cache.v.copy_(caches[1])


def test_a_windowed_prefill_transposes_only_the_keys_its_queries_see() -> None:
    assert prefill_scratch_size(4096, 2, 64, 32, 256) == 2 * (128 - (4096 - 32 - 256 + 1) // 32) * 32 * 64
    assert prefill_scratch_size(4096, 2, 64) == prefill_scratch_size(4096, 2, 64, 32, 0) == 2 * 4096 * 64
    assert prefill_scratch_size(100, 2, 64, 100, 256) == prefill_scratch_size(100, 2, 64), "the window covers it"


class Counting:
    """The native kernels, counting the attention calls that reach them (the rest passed through)."""

    def __init__(self, native: NativeKernels) -> None:
        self.native, self.calls = native, {"paged_decode_attention": 0, "paged_prefill_attention": 0}

    def __getattr__(self, name: str):
        attribute = getattr(self.native, name)
        if name not in self.calls:
            return attribute

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return attribute(*args, **kwargs)

        return counted


@pytest.mark.parametrize(("window", "softcap"), [(20, 0.0), (0, 3.0), (13, 3.0)])
def test_dispatched_attention_runs_windows_and_caps_natively(
    native: NativeKernels, paged_sequences: type, window: int, softcap: float
) -> None:
    """The CPU backend's attention over mixed and decode-only steps, every part native, equal to the torch op's."""
    counting = Counting(native)
    dispatch = NativeDispatch(counting)
    seqs, spec = paged_sequences(9, 3, 64, block_size=4), AttentionSpec(0.125, window, softcap)
    schedule = [
        ([], [("a", 37), ("b", 9)]),
        (["a", "b"], []),
        (["a", "b"], [("c", 30)]),
        (["a", "b", "c"], []),
        (["b"], [("a", 3)]),
    ]
    for decodes, prefills in schedule:
        q, k, v, meta, owners = seqs.step(decodes, prefills)
        expected = torch_ops.attention(q, k, v, PagedKv(*(c.clone() for c in seqs.cache)), meta, spec)
        out = dispatch.attention(q, k, v, seqs.cache, meta, spec)
        close(out, expected)
        close(out, reference(seqs, q, owners, 0.125, window, softcap))
    assert counting.calls == {"paged_decode_attention": 4, "paged_prefill_attention": 4}, "no torch fallback"


HIDDEN, HQ, HK, D, INTER = 64, 4, 2, 16, 96


def shape_of(cos_sin: torch.Tensor, **options) -> DecoderShape:
    return DecoderShape(HIDDEN, INTER, 1e-6, AttentionShape(HQ, HK, D, D**-0.5, cos_sin, **options))


def test_the_cap_splits_runs_of_fused_layers_and_the_window_is_each_layers() -> None:
    cos_sin = torch.zeros(1)
    base = shape_of(cos_sin)
    assert base.joined(shape_of(cos_sin)) == base
    assert base.joined(shape_of(cos_sin, softcap=50.0)) is None
    assert "window" in {f.name for f in dataclasses.fields(DecoderLayer)}


def q8_weight(n: int, k: int, native: NativeKernels, g: torch.Generator):
    """A random linear weight as the CPU backend packs a GGUF Q8_0 one: its blocks."""
    values = (torch.randn(n, k, generator=g) * 0.2).numpy()
    blocks = quantize(values, GGMLQuantizationType.Q8_0)
    return pack_block_weight([QuantizedWeight("Q8_0", torch.from_numpy(blocks.reshape(n, -1)), k)], native)


def op_by_op(dispatch: NativeDispatch, layers: list[DecoderLayer], shape: DecoderShape, hidden, positions, meta):
    """The layers' ops one by one through the CPU backend's kernel table, as the plan runs them unfused."""
    s, a, rows, residual = shape, shape.attention, hidden.shape[0], None
    for layer in layers:
        if residual is None:
            x, residual = dispatch.rmsnorm(hidden, layer.input_norm, s.eps), hidden
        else:
            x, residual = dispatch.add_rmsnorm(hidden, residual, layer.input_norm, s.eps)
        qkv = dispatch.linear(x, layer.qkv, layer.qkv_bias)
        q, k, v = qkv.split([HQ * D, HK * D, HK * D], dim=1)
        q, k = dispatch.rope(q.view(rows, HQ, D), k.view(rows, HK, D), positions, a.cos_sin)
        caches = PagedKv(layer.k_cache, layer.v_cache)
        spec = AttentionSpec(a.scale, layer.window, a.softcap)
        attended = dispatch.attention(q, k, v.view(rows, HK, D), caches, meta, spec)
        o = dispatch.linear(attended.reshape(rows, -1), layer.o_proj, layer.o_bias)
        x, residual = dispatch.add_rmsnorm(o, residual, layer.post_norm, s.eps)
        hidden = dispatch.linear(dispatch.silu_mul(dispatch.linear(x, layer.gate_up, None)), layer.down, None)
    return hidden, residual


@pytest.mark.parametrize(("window", "softcap"), [(24, 0.0), (40, 5.0), (0, 5.0)])
def test_fused_decoder_layers_with_a_window_are_bit_identical_to_op_by_op(
    native: NativeKernels, paged_sequences: type, window: int, softcap: float
) -> None:
    g = torch.Generator().manual_seed(window)
    seqs = paged_sequences(HQ, HK, D, block_size=4, seed=1)
    names, prompt_lens = ["a", "b", "c"], [10, 60, 150]  # below and above the window, up to 38 blocks
    q, k, v, meta, _ = seqs.step([], list(zip(names, prompt_lens)))
    torch_ops.write_kv(k, v, seqs.cache, meta.slot_mapping)
    _, _, _, meta, _ = seqs.step(names, [])  # the decode step: its new K/V come from the layers
    caches = [PagedKv(*(c.clone() for c in seqs.cache)), PagedKv(*(c.flip(0) for c in seqs.cache))]
    layers = [
        DecoderLayer(
            torch.rand(HIDDEN, generator=g) + 0.5,
            q8_weight((HQ + 2 * HK) * D, HIDDEN, native, g),
            None,
            q8_weight(HIDDEN, HQ * D, native, g),
            None,
            torch.rand(HIDDEN, generator=g) + 0.5,
            q8_weight(2 * INTER, HIDDEN, native, g),
            None,
            q8_weight(HIDDEN, INTER, native, g),
            None,
            *cache,
            window=layer_window,
        )
        for cache, layer_window in zip(caches, (window, 0))  # layers alternate a window and none (Gemma 2)
    ]
    angles = torch.arange(256.0)[:, None] * 10000 ** (-torch.arange(0, D, 2) / D)
    cos_sin = torch.cat([angles.cos(), angles.sin()], 1).contiguous()  # [256, D]
    shape = shape_of(cos_sin, softcap=softcap)
    dispatch = NativeDispatch(native)
    fused = dispatch.decoder_layers(layers, shape)
    assert fused is not None, "every linear has its blocks"
    hidden = torch.randn(len(names), HIDDEN, generator=g)
    positions = meta.decode_context_lens.long() - 1
    before = [(kc.clone(), vc.clone()) for kc, vc in caches]
    expected = op_by_op(dispatch, layers, shape, hidden, positions, meta)
    after = [(kc.clone(), vc.clone()) for kc, vc in caches]
    for (kc, vc), (k0, v0) in zip(caches, before):  # the step again from the same caches
        kc.copy_(k0), vc.copy_(v0)
    out = fused(hidden, None, positions, meta)
    assert out is not None and all(torch.equal(a, b) for a, b in zip(out, expected))
    assert all(torch.equal(a, b) for pair, pair_after in zip(caches, after) for a, b in zip(pair, pair_after))
    unbounded = dispatch.decoder_layers([replace(layer, window=0) for layer in layers], shape_of(cos_sin))
    for (kc, vc), (k0, v0) in zip(caches, before):
        kc.copy_(k0), vc.copy_(v0)
    assert not torch.allclose(unbounded(hidden, None, positions, meta)[0], out[0], atol=1e-4), "the options act"
