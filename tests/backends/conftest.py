"""Shared test helpers: the native kernels, sequences living in a block-paged KV cache, stepped like the engine
schedules them, and the naive attention they are checked against."""

from __future__ import annotations

import pytest
import torch

from sagellm.backends.attention_metadata import AttentionMetadata, PrefillChunk
from sagellm.backends.layer_caches import PagedKv
from sagellm.backends.native import NativeKernels
from sagellm.backends.native.isa import runnable


@pytest.fixture(scope="session", params=runnable(), ids=lambda variant: variant.name)
def native(request) -> NativeKernels:
    """The built library, once per instruction-set variant this CPU runs (avx512vnni, avx512, avx2, portable here):
    every kernel test checks every path the machine can run."""
    kernels = NativeKernels.load(request.param)
    assert kernels is not None, "a C compiler is on PATH, so the native kernels must build"
    assert kernels.isa == request.param.name
    return kernels


class PagedSequences:
    """Sequences whose K/V live in a paged cache at scattered blocks; every step's new tokens get random q/k/v and the
    full K/V history of each sequence is kept so the reference can recompute attention from scratch.

    Unwritten cache slots hold large finite junk, so reading any slot a sequence does not own shows up as an error."""

    def __init__(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = 16,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        self.gen = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)
        self.hq, self.hk, self.d, self.block_size = num_q_heads, num_kv_heads, head_dim, block_size
        num_blocks = 64
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.cache = PagedKv(*((torch.randn(shape, generator=self.gen) * 50).to(self.device) for _ in "kv"))
        self.free = torch.randperm(num_blocks, generator=self.gen).tolist()
        self.blocks: dict[str, list[int]] = {}
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def _grow(self, seq: str, n: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Appends n random tokens to seq; returns their flat cache slots and their k, v [n, Hk, D]."""
        start = len(self.keys.get(seq, ()))
        blocks = self.blocks.setdefault(seq, [])
        while len(blocks) * self.block_size < start + n:
            blocks.append(self.free.pop())
        slots = [blocks[p // self.block_size] * self.block_size + p % self.block_size for p in range(start, start + n)]
        k = torch.randn(n, self.hk, self.d, generator=self.gen)
        v = torch.randn(n, self.hk, self.d, generator=self.gen)
        self.keys[seq] = torch.cat([self.keys.get(seq, torch.empty(0, self.hk, self.d)), k])
        self.values[seq] = torch.cat([self.values.get(seq, torch.empty(0, self.hk, self.d)), v])
        return slots, k, v

    def step(
        self, decodes: list[str], prefills: list[tuple[str, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, list[tuple[str, int]]]:
        """One batch: a token for each decode sequence, then the prefill chunks. Returns q, k, v [T, H, D], the
        metadata, and for every batch token its (sequence, absolute position)."""
        plan = [(seq, 1) for seq in decodes] + prefills
        slots, ks, vs, owners, chunks = [], [], [], [], []
        for i, (seq, n) in enumerate(plan):
            s, k, v = self._grow(seq, n)
            ctx = len(self.keys[seq])
            if i >= len(decodes):
                block_table = torch.tensor(self.blocks[seq], dtype=torch.int32, device=self.device)
                chunks.append(PrefillChunk(len(slots), n, ctx, block_table))
            slots += s
            ks.append(k)
            vs.append(v)
            owners += [(seq, p) for p in range(ctx - n, ctx)]
        tables = torch.zeros(len(decodes), max((len(self.blocks[s]) for s in decodes), default=0), dtype=torch.int32)
        for i, seq in enumerate(decodes):
            tables[i, : len(self.blocks[seq])] = torch.tensor(self.blocks[seq], dtype=torch.int32)
        context_lens = torch.tensor([len(self.keys[s]) for s in decodes], dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device),
            block_size=self.block_size,
            num_decode_tokens=len(decodes),
            decode_block_tables=tables.to(self.device) if decodes else None,
            decode_context_lens=context_lens.to(self.device) if decodes else None,
            prefills=chunks,
        )
        q = torch.randn(len(slots), self.hq, self.d, generator=self.gen)
        return q.to(self.device), torch.cat(ks).to(self.device), torch.cat(vs).to(self.device), meta, owners

    def reference(self, q: torch.Tensor, owners: list[tuple[str, int]], scale: float) -> torch.Tensor:
        """Attention token by token and head by head, in float64: softmax(q . k_j * scale) over j <= position."""
        q = q.cpu()
        out = torch.empty(q.shape, dtype=torch.float64)
        group = self.hq // self.hk
        for t, (seq, pos) in enumerate(owners):
            keys = self.keys[seq][: pos + 1].double()  # [pos + 1, Hk, D]
            values = self.values[seq][: pos + 1].double()
            for h in range(self.hq):
                scores = keys[:, h // group] @ q[t, h].double() * scale  # [pos + 1]
                weights = torch.exp(scores - scores.max())
                out[t, h] = (weights / weights.sum()) @ values[:, h // group]  # [D]
        return out


@pytest.fixture
def paged_sequences() -> type[PagedSequences]:
    return PagedSequences
