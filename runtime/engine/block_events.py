"""What the engine's block bookkeeping reports as blocks come and go, in its pages and in the tiers under them: the
interface the block managers and the tiers call, which the engine's KV events implement
(`kv_events/engine_events.EngineKvEvents`). A protocol here, so the bookkeeping knows nothing of events or sockets."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from sagellm.runtime.engine.kv_tiers.block_file import BlockKey, BlockMeta


class BlockEvents(Protocol):
    def cached(self, group_idx: int, blocks: Iterable[tuple[int, BlockMeta]]) -> None:
        """(hash, meta) of blocks the prefix cache registered in the pages of group `group_idx`."""

    def evicted(self, group_idx: int, hashes: list[int]) -> None:
        """Blocks the pages of group `group_idx` no longer hold."""

    def tier_stored(self, key: BlockKey, meta: BlockMeta, medium: str) -> None:
        """A block a tier (`medium`: vLLM's "CPU" for RAM, "DISK") holds now."""

    def tier_removed(self, key: BlockKey, medium: str) -> None:
        """A block a tier no longer holds."""

    def disk_written(self, key: BlockKey, meta: BlockMeta) -> None:
        """A block the disk tier's writer published, or a start found there (called from their threads)."""

    def disk_removed(self, key: BlockKey) -> None:
        """A block the disk tier's janitor deleted (from its thread)."""
