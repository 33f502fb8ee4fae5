"""The RAM tier: blocks evicted from the KV cache, kept in host memory up to a byte budget, least recently used out.

A block's bytes are one flat uint8 tensor (block_payloads.py's layout), so loading it back is one copy per layer and
writing it to the disk tier below is one `write`. What this tier evicts goes to `on_evict` (the disk tier's queue),
so with both tiers a block walks pages -> RAM -> disk as each fills."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from sagellm.runtime.engine.kv_tiers.block_file import BlockKey, BlockMeta


class RamTier:
    def __init__(self, budget_bytes: int, on_evict: Callable[[BlockKey, BlockMeta, torch.Tensor], None] | None = None):
        self.budget_bytes = budget_bytes
        self.on_evict = on_evict
        self._entries: OrderedDict[BlockKey, tuple[BlockMeta, torch.Tensor]] = OrderedDict()  # oldest first
        self.bytes_used = 0

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def held(self) -> list[BlockKey]:
        return list(self._entries)

    def put(self, key: BlockKey, meta: BlockMeta, payload: torch.Tensor) -> bool:
        """Keeps `payload` (owned from now on) under `key`, evicting the least recently used past the budget; False
        when one block alone exceeds the budget (nothing kept)."""
        if payload.numel() > self.budget_bytes:
            return False
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        self._entries[key] = (meta, payload)
        self.bytes_used += payload.numel()
        while self.bytes_used > self.budget_bytes:
            self._evict_oldest()
        return True

    def get(self, key: BlockKey) -> tuple[BlockMeta, torch.Tensor] | None:
        """The block under `key`, now the most recently used; None when absent."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def drain(self) -> None:
        """Evicts everything, oldest first (to the disk tier where there is one): a flush before sleep or exit."""
        while self._entries:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        key, (meta, payload) = self._entries.popitem(last=False)
        self.bytes_used -= payload.numel()
        if self.on_evict is not None:
            self.on_evict(key, meta, payload)
