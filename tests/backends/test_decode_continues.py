"""Decode attention that extends last step's gathered K/V must equal gathering every context again, step after step,
across a new block, growth past the kept capacity, and a change of the decode rows."""

from __future__ import annotations

import torch

from sagellm.backends.attention_metadata import AttentionMetadata
from sagellm.backends.layer_caches import PagedKv
from sagellm.backends.layer_specs import AttentionSpec
from sagellm.backends.torch_ops import DECODE_KV_HEADROOM, attention, paged_decode_attention

BLOCK, HQ, HK, D = 4, 4, 2, 8


def decode_step(caches, tables: list[list[int]], lens: list[int], continues: bool, buffers, g):
    """Writes one new token per row at position lens[i] - 1, then attends; returns (extended, reference)."""
    q = torch.randn(len(lens), HQ, D, generator=g)
    k, v = torch.randn(len(lens), HK, D, generator=g), torch.randn(len(lens), HK, D, generator=g)
    slots = [tables[i][(n - 1) // BLOCK] * BLOCK + (n - 1) % BLOCK for i, n in enumerate(lens)]
    width = max(-(-n // BLOCK) for n in lens)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_size=BLOCK,
        num_decode_tokens=len(lens),
        decode_block_tables=torch.tensor(
            [t[:width] + [0] * (width - len(t[:width])) for t in tables], dtype=torch.int32
        ),
        decode_context_lens=torch.tensor(lens, dtype=torch.int32),
        decode_continues=continues,
    )
    decode = lambda *a, **kw: paged_decode_attention(*a, buffers=buffers, **kw)  # noqa: E731
    spec = AttentionSpec(0.3)
    extended = attention(q, k, v, caches, meta, spec, decode=decode, buffers=buffers)
    reference = paged_decode_attention(q, caches, meta.decode_block_tables, meta.decode_context_lens, spec)
    return extended, reference


def test_extending_equals_regathering_over_many_steps():
    from sagellm.backends.torch_ops import GatherBuffers

    g = torch.Generator().manual_seed(0)
    num_blocks = 300
    caches = PagedKv(*(torch.randn(num_blocks, BLOCK, HK, D, generator=g) for _ in "kv"))
    free = iter(torch.randperm(num_blocks, generator=g).tolist())
    tables = [[next(free) for _ in range(80)] for _ in range(3)]
    lens = [5, 9, 2]
    buffers = GatherBuffers()
    continues = False
    steps = DECODE_KV_HEADROOM + 20  # grows past the kept capacity once
    for step in range(steps):
        if step == 40:  # a row leaves the batch: the rows no longer continue
            tables, lens, continues = tables[:2], lens[:2], False
        extended, reference = decode_step(caches, tables, lens, continues, buffers, g)
        torch.testing.assert_close(extended, reference, rtol=1e-5, atol=1e-6)
        lens = [n + 1 for n in lens]
        continues = True
