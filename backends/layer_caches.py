"""What a layer's kernels keep from one step to the next, as one value each: an attention layer's paged KV cache
(`PagedKv`) and a Gated DeltaNet layer's per-sequence states (`RecurrentStates`).

The runner allocates them (runtime/engine/kv_cache.py, state_cache.py), lowering binds each layer's to its kernel,
and every kernel family that reads or writes them (kernel_contracts.py) takes the pair as one parameter, as vLLM's
attention backends take a layer's `kv_cache`: a cache's two tensors always travel together, so no backend restates
them. They are tuples, so `k, v = cache` still reads."""

from __future__ import annotations

from typing import NamedTuple

import torch


class PagedKv(NamedTuple):
    """One attention layer's paged cache: token t of a sequence lives at flat slot block * block_size + offset."""

    k: torch.Tensor  # [num_blocks, block_size, Hk, D]
    v: torch.Tensor  # [num_blocks, block_size, Hk, D]


class RecurrentStates(NamedTuple):
    """One Gated DeltaNet layer's states, a slot per running sequence or prefix checkpoint (state_slots.py)."""

    conv: torch.Tensor  # [S, C, K-1]: the causal convolution's last K-1 inputs
    ssm: torch.Tensor  # [S, Hv, Dk, Dv]: the delta rule's matrix

    def copy_slot(self, source: int, slot: int) -> None:
        """Both states of `slot` set to `source`'s, or to zeros for source -1 (a sequence's start: a freed slot is
        never cleared); nothing when they are the same slot."""
        for states in self:
            if source < 0:
                states[slot].zero_()
            elif source != slot:
                states[slot].copy_(states[source])
