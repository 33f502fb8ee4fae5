"""Prefill chunks whose picture runs attend both ways (Gemma 3, `PrefillChunk.bidirectional`): the torch op and the
CPU backend's dispatch (which sends such chunks to the torch op, its C kernel being causal only) against a dense
oracle, softmax over a mask built by hand as transformers builds Gemma 3's: OR(causal, block) where a block is one
run of image tokens, AND a sliding window's key > query - window."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch

from sagellm.backends import torch_ops
from sagellm.backends.cpu import NativeDispatch
from sagellm.backends.layer_specs import AttentionSpec
from sagellm.backends.native import NativeKernels

HQ, HK, D = 4, 2, 16


def oracle_mask(positions: range, ctx: int, runs: list[tuple[int, int]], window: int) -> torch.Tensor:
    """[n, ctx] bool, entry by entry: key j visible to the query at position p."""
    mask = torch.zeros(len(positions), ctx, dtype=torch.bool)
    for i, p in enumerate(positions):
        block = next((end for start, end in runs if start <= p < end), None)
        for j in range(ctx):
            seen = j <= p or (block is not None and j < block)
            mask[i, j] = seen and (not window or j > p - window)
    return mask


def oracle(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, spec: AttentionSpec):
    """Dense float64 attention of q [n, Hq, D] over keys, values [ctx, Hk, D] under `mask` [n, ctx]."""
    group = HQ // HK
    k = keys.double().repeat_interleave(group, 1).transpose(0, 1)  # [Hq, ctx, D]
    v = values.double().repeat_interleave(group, 1).transpose(0, 1)
    scores = q.double().transpose(0, 1) @ k.transpose(1, 2) * spec.scale  # [Hq, n, ctx]
    if spec.softcap:
        scores = spec.softcap * torch.tanh(scores / spec.softcap)
    probs = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)
    return (probs @ v).transpose(0, 1)  # [n, Hq, D]


def transformers_mask(positions: range, ctx: int, runs: list[tuple[int, int]], window: int) -> torch.Tensor:
    """[n, ctx] bool, as transformers' Gemma 3 composes it (create_masks_for_vision_model): its block ids from the
    token types, then OR(causal, blockwise), AND the sliding window for a windowed layer."""
    from transformers.masking_utils import (
        and_masks,
        blockwise_overlay,
        causal_mask_function,
        or_masks,
        sliding_window_overlay,
    )
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    token_type_ids = torch.zeros(1, ctx, dtype=torch.long)
    for start, end in runs:
        token_type_ids[0, start:end] = 1
    visible = or_masks(causal_mask_function, blockwise_overlay(get_block_sequence_ids_for_mask(token_type_ids)))
    if window:
        visible = and_masks(sliding_window_overlay(window), visible)
    q, kv = torch.tensor(list(positions))[:, None], torch.arange(ctx)[None, :]
    return visible(0, 0, q, kv)


# (chunks computed before, the chunk, its runs, window): every chunk's K/V is written, the last one attends
CASES = {
    "a chunk starting the sequence": ([], 24, [(5, 14)], 0),
    "a later chunk reading earlier context from the cache": ([10], 22, [(2, 8), (14, 25)], 0),
    "a chunk starting mid-run (a prefix hit inside the picture)": ([9], 15, [(4, 16)], 0),
    "a windowed layer": ([6], 26, [(10, 24)], 5),
    "a windowed layer, a chunk starting mid-run": ([12], 14, [(8, 20)], 4),
    "two runs in one chunk": ([], 30, [(3, 9), (12, 21)], 0),
}


def run_case(paged_sequences: type, case: str, seed: int):
    """The case's sequence in a paged cache: the last chunk's q (scaled: sharp scores), k, v, chunk with its runs,
    and the oracle's mask."""
    before, n, runs, window = CASES[case]
    seqs = paged_sequences(HQ, HK, D, block_size=4, seed=seed)
    for m in before:
        _, k, v, meta, _ = seqs.step([], [("a", m)])
        torch_ops.write_kv(k, v, seqs.cache, meta.slot_mapping)
    q, k, v, meta, _ = seqs.step([], [("a", n)])
    torch_ops.write_kv(k, v, seqs.cache, meta.slot_mapping)
    overlapping = tuple((s, e) for s, e in runs if s < sum(before) + n and e > sum(before))
    chunk = dataclasses.replace(meta.prefills[0], bidirectional=overlapping)
    ctx = chunk.context_len
    mask = oracle_mask(range(ctx - n, ctx), ctx, runs, window)
    return seqs, q * 3, k, v, chunk, mask, window


@pytest.mark.parametrize("case", list(CASES))
def test_the_oracle_mask_is_transformers_gemma3_mask(case: str) -> None:
    before, n, runs, window = CASES[case]
    ctx = sum(before) + n
    positions = range(ctx - n, ctx)
    assert torch.equal(oracle_mask(positions, ctx, runs, window), transformers_mask(positions, ctx, runs, window))


@pytest.mark.parametrize("softcap", [0.0, 2.0], ids=["sdpa", "softcapped"])
@pytest.mark.parametrize("case", list(CASES))
def test_torch_prefill_attention_opens_picture_runs(paged_sequences: type, case: str, softcap: float) -> None:
    seqs, q, k, v, chunk, mask, window = run_case(paged_sequences, case, seed=len(case))
    spec = AttentionSpec(D**-0.5, window, softcap)
    out = torch_ops.prefill_attention(q, k, v, seqs.cache, chunk, spec)
    expected = oracle(q, seqs.keys["a"], seqs.values["a"], mask, spec)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=2e-5)
    causal = torch_ops.prefill_attention(q, k, v, seqs.cache, dataclasses.replace(chunk, bidirectional=()), spec)
    assert not torch.allclose(out, causal, atol=1e-3), "the runs change what their queries see"


def test_without_runs_the_chunk_stays_causal(paged_sequences: type) -> None:
    seqs, q, k, v, chunk, _, _ = run_case(paged_sequences, "a later chunk reading earlier context from the cache", 3)
    plain = dataclasses.replace(chunk, bidirectional=())
    ctx, n = chunk.context_len, chunk.query_len
    spec = AttentionSpec(D**-0.5)
    expected = oracle(q, seqs.keys["a"], seqs.values["a"], oracle_mask(range(ctx - n, ctx), ctx, [], 0), spec)
    torch.testing.assert_close(torch_ops.prefill_attention(q, k, v, seqs.cache, plain, spec), expected.float())


class CountingPrefills:
    """The native kernels, counting the prefill attention calls that reach them."""

    def __init__(self, native: NativeKernels) -> None:
        self.native, self.prefills = native, 0

    def __getattr__(self, name: str):
        attribute = getattr(self.native, name)
        if name != "paged_prefill_attention":
            return attribute

        def counted(*args, **kwargs):
            self.prefills += 1
            return attribute(*args, **kwargs)

        return counted


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="needs a C compiler")
@pytest.mark.parametrize("case", list(CASES))
def test_the_cpu_backend_sends_picture_runs_to_the_torch_op(
    native: NativeKernels, paged_sequences: type, case: str
) -> None:
    counting = CountingPrefills(native)
    dispatch = NativeDispatch(counting)
    seqs, q, k, v, chunk, mask, window = run_case(paged_sequences, case, seed=len(case))
    spec = AttentionSpec(D**-0.5, window)
    out = dispatch.prefill_attention(q, k, v, seqs.cache, chunk, spec)
    expected = oracle(q, seqs.keys["a"], seqs.values["a"], mask, spec)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=2e-5)
    assert counting.prefills == 0, "the C kernel is causal only"
    dispatch.prefill_attention(q, k, v, seqs.cache, dataclasses.replace(chunk, bidirectional=()), spec)
    assert counting.prefills == 1, "a chunk without runs still runs natively"
