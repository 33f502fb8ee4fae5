"""Attention sinks (gpt-oss: a logit per query head in each softmax's denominator, taking no value) in the native
CPU kernels (decode_attention.c, prefill_attention.c) against the torch ops that define them and a float64 reference,
alone and with a sliding window and a soft cap, decode split into shares across threads too."""

from __future__ import annotations

import shutil

import pytest
import torch

from sagellm.backends import torch_ops
from sagellm.backends.cpu import NativeDispatch
from sagellm.backends.layer_caches import PagedKv
from sagellm.backends.layer_specs import AttentionSpec
from sagellm.backends.native import NativeKernels, prefill_scratch_size
from tests.backends.test_attention_window import close, decode_batch, reference

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler (gcc or cc)"
)


def sinks_for(hq: int) -> torch.Tensor:
    """Sinks from well below to well above the scores (|s| of a few units): some heads barely change, some shrink
    to nearly nothing."""
    return torch.linspace(-4.0, 6.0, hq)


CASES = [  # (hq, hk, d, window, softcap)
    (9, 3, 64, 0, 0.0),
    (9, 3, 64, 50, 0.0),
    (8, 2, 16, 8, 3.0),
    (8, 1, 128, 0, 0.0),
]


@pytest.mark.parametrize(("hq", "hk", "d", "window", "softcap"), CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_paged_decode_attention_with_sinks(
    native: NativeKernels, paged_sequences: type, hq: int, hk: int, d: int, window: int, softcap: float, threads: int
) -> None:
    seqs, q, _, meta, owners = decode_batch(paged_sequences, hq, hk, d, [0, 40, 300] if threads == 1 else [300])
    sinks, scale = sinks_for(hq), d**-0.5
    args = (q, seqs.cache, meta.decode_block_tables, meta.decode_context_lens)
    spec = AttentionSpec(scale, window, softcap, sinks)
    expected = torch_ops.paged_decode_attention(*args, spec)
    close(expected, reference(seqs, q, owners, scale, window, softcap, sinks))
    assert not torch.allclose(expected, torch_ops.paged_decode_attention(*args, AttentionSpec(scale, window, softcap)))
    close(native.paged_decode_attention(*args, spec, threads), expected)


@pytest.mark.parametrize(("hq", "hk", "d", "window", "softcap"), CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_paged_prefill_attention_with_sinks(
    native: NativeKernels, paged_sequences: type, hq: int, hk: int, d: int, window: int, softcap: float, threads: int
) -> None:
    seqs, scale, sinks = paged_sequences(hq, hk, d), d**-0.5, sinks_for(hq)
    spec = AttentionSpec(scale, window, softcap, sinks)
    for n in (37, 9, 100):
        q, k, v, meta, owners = seqs.step([], [("a", n)])
        native.write_kv(k, v, seqs.cache, meta.slot_mapping)
        chunk, q = meta.prefills[0], q * 3
        expected = torch_ops.prefill_attention(q, k, v, seqs.cache, chunk, spec)
        close(expected, reference(seqs, q, owners, scale, window, softcap, sinks))
        ctx = chunk.context_len
        scratch = torch.empty(prefill_scratch_size(ctx, hk, d, n, window))
        out = native.paged_prefill_attention(q, seqs.cache, chunk.block_table, ctx, spec, threads, scratch)
        close(out, expected)


def test_dispatched_attention_with_sinks_runs_natively(native: NativeKernels, paged_sequences: type) -> None:
    """The CPU backend's attention over mixed and decode-only steps with sinks: native, equal to the torch op's."""
    dispatch = NativeDispatch(native)
    seqs, sinks = paged_sequences(4, 2, 16, block_size=4), sinks_for(4)
    spec = AttentionSpec(0.25, 8, 0.0, sinks)
    for decodes, prefills in [([], [("a", 37), ("b", 9)]), (["a", "b"], []), (["a", "b"], [("c", 30)])]:
        q, k, v, meta, owners = seqs.step(decodes, prefills)
        expected = torch_ops.attention(q, k, v, PagedKv(*(c.clone() for c in seqs.cache)), meta, spec)
        out = dispatch.attention(q, k, v, seqs.cache, meta, spec)
        close(out, expected)
        close(out, reference(seqs, q, owners, 0.25, 8, 0.0, sinks))
