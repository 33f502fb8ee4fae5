"""A KV block's bytes out of the engine's cache and back in: what the tiers under the prefix cache store.

A block of one layer is a contiguous [block_size, Hk, D] slab of that layer's K (and one of its V), since the
cache is [num_blocks, block_size, Hk, D] (kv_cache.py). A tier's payload for a block is the slabs of every layer
of one group, K then V, layer by layer, in each layer's own shape (no padding to the widest head): group "f" holds the
full-attention layers (every layer, where none keeps a sliding window's blocks of its own) and an MTP head's layer,
which the same block tables index; group "s" the sliding-window layers' own blocks (window_blocks.py). Recurrent
states after a prefix ("r") are a state slot's values (`ModelRunner.read_states`). Bytes, not floats, so the tiers
never look inside."""

from __future__ import annotations

from typing import Protocol

import torch

from sagellm.backends.layer_caches import PagedKv

FULL, SLIDING, STATES = "f", "s", "r"


class RunnerCaches(Protocol):
    """What of a model runner (model_runner.ModelRunner) the payloads read and write."""

    kv_caches: list[PagedKv]
    window_blocks: int

    @property
    def windowed_caches(self) -> list[bool]: ...

    @property
    def states_size(self) -> int: ...

    def read_states(self, slot: int) -> torch.Tensor: ...

    def write_states(self, slot: int, states: torch.Tensor) -> None: ...

    def kv_written(self, block: int, sliding: bool = False) -> None: ...


class BlockPayloads:
    def __init__(self, runner: RunnerCaches, head_runner: RunnerCaches | None = None) -> None:
        """`head_runner`: an MTP head's runner, whose KV cache the model's block tables index too."""
        self._runner = runner
        windowed = runner.windowed_caches
        self._tensors: dict[str, list[torch.Tensor]] = {
            group: [t for pair, w in zip(runner.kv_caches, windowed) if w == sliding for t in pair]
            for group, sliding in ((FULL, False), (SLIDING, True))
        }
        if head_runner is not None:
            self._tensors[FULL] += [t for pair in head_runner.kv_caches for t in pair]
        self._sizes = {group: [t[0].numel() * t.element_size() for t in ts] for group, ts in self._tensors.items()}

    def nbytes(self, group: str) -> int:
        """A payload's size: a block's bytes in `group`, or (STATES) a state slot's."""
        if group == STATES:
            return self._runner.states_size * 4
        return sum(self._sizes[group])

    def read(self, group: str, block_id: int) -> torch.Tensor:
        """Block `block_id`'s bytes in `group` (or, STATES, state slot `block_id`'s) as a new flat uint8 CPU tensor."""
        if group == STATES:
            return self._runner.read_states(block_id).cpu().view(torch.uint8)
        out = torch.empty(self.nbytes(group), dtype=torch.uint8)
        for t, part in zip(self._tensors[group], out.split(self._sizes[group])):
            part.copy_(_bytes(t[block_id]))
        return out

    def read_many(self, group: str, block_ids: list[int]) -> list[torch.Tensor]:
        """`read` of several blocks of `group`, gathered a layer at a time into one buffer (a row each): the blocks a
        step evicted cost one copy per layer, not one per layer and block."""
        out = torch.empty(len(block_ids), self.nbytes(group), dtype=torch.uint8)
        ids = torch.tensor(block_ids, dtype=torch.int64, device=self._tensors[group][0].device)
        start = 0
        for t, size in zip(self._tensors[group], self._sizes[group]):
            out[:, start : start + size] = t.view(t.shape[0], -1).view(torch.uint8).index_select(0, ids).cpu()
            start += size
        return list(out)

    def write(self, group: str, block_id: int, payload: torch.Tensor) -> None:
        """Stores `read`'s bytes into block (or state slot) `block_id`."""
        if group == STATES:
            self._runner.write_states(block_id, payload.view(torch.float32))
            return
        self._runner.kv_written(block_id, sliding=group == SLIDING)
        for t, part in zip(self._tensors[group], payload.split(self._sizes[group])):
            _bytes(t[block_id]).copy_(part)


def _bytes(slab: torch.Tensor) -> torch.Tensor:
    """A contiguous slab's memory as flat uint8 (a view, so copying into it writes the cache)."""
    return slab.reshape(-1).view(torch.uint8)
