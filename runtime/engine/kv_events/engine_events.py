"""One engine's KV events: every change to the set of blocks it holds, in its pages ("GPU", as vLLM names an
engine's own cache whatever the device), its RAM tier ("CPU") and its disk tier ("DISK"), as vLLM's events.

The block managers and the tiers call this as blocks are cached, evicted, stored and dropped (the disk tier's
writer and a start's announcement of what the disk already holds, from threads of their own: the recorder takes a
lock). The engine flushes once a step, and a thread of this object every FLUSH_S while the engine idles (what a disk
writes after the last step, a start's announcement): one batch per flush that has anything, numbered in order, to the
publisher (or kept for a consumer in this process)."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sagellm.runtime.engine.kv_events.config import KvEventsConfig, parse_kv_events_config
from sagellm.runtime.engine.kv_events.publisher import ZmqKvEventPublisher
from sagellm.runtime.engine.kv_events.recorder import KvEventRecorder
from sagellm.runtime.engine.kv_events.wire import CPU, DISK, GPU, KVEventBatch
from sagellm.runtime.engine.kv_tiers.block_file import BlockKey, BlockMeta

if TYPE_CHECKING:
    from sagellm.runtime.engine.config import EngineConfig
    from sagellm.runtime.engine.scheduler import Scheduler

FLUSH_S = 0.5  # the longest a change waits for its batch while the engine takes no step
GROUPS = {"f": 0, "s": 1}  # a payload group's vLLM group_idx (recurrent checkpoints, "r", are not blocks: no events)


class _Batches(list):
    """Where batches go when no publisher runs (`publisher: "null"`): the last few, for a consumer in this process."""

    def append(self, item: tuple[int, KVEventBatch], /) -> None:
        super().append(item)
        del self[:-1000]


class EngineKvEvents:  # a BlockEvents (block_events.py)
    def __init__(self, config: KvEventsConfig, block_size: int, rank: int | None = None) -> None:
        self.block_size = block_size
        self.batches: _Batches | None = None if config.publishes else _Batches()
        self.publisher = (
            ZmqKvEventPublisher(config, lambda: self.recorder.snapshot(), rank) if config.publishes else None
        )
        self.recorder = KvEventRecorder(self.publisher if self.publisher is not None else self.batches)
        self._closed = threading.Event()
        self._flusher = threading.Thread(target=self._flush_while_idle, name="kv-events-flush", daemon=True)
        self._flusher.start()

    # -- the pages ------------------------------------------------------------------------------------------------
    def cached(self, group_idx: int, blocks: Iterable[tuple[int, BlockMeta]]) -> None:
        """(hash, meta) of blocks the prefix cache registered in the pages of `group_idx`."""
        for block_hash, meta in blocks:
            self._stored(block_hash, meta, GPU, group_idx)

    def evicted(self, group_idx: int, hashes: list[int]) -> None:
        self.recorder.removed(hashes, GPU, group_idx)

    # -- the tiers ------------------------------------------------------------------------------------------------
    def tier_stored(self, key: BlockKey, meta: BlockMeta, medium: str) -> None:
        if key.group in GROUPS:
            self._stored(key.block_hash, meta, medium, GROUPS[key.group])

    def tier_removed(self, key: BlockKey, medium: str) -> None:
        if key.group in GROUPS:
            self.recorder.removed([key.block_hash], medium, GROUPS[key.group])

    def disk_written(self, key: BlockKey, meta: BlockMeta) -> None:
        """A block the disk tier's writer published, or a start found there (from their threads)."""
        self.tier_stored(key, meta, DISK)

    def disk_removed(self, key: BlockKey) -> None:
        """A block the disk tier's janitor deleted (from its thread)."""
        self.tier_removed(key, DISK)

    # -- batches --------------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Once a step: what changed since the last flush goes out as one batch."""
        self.recorder.flush()

    def close(self) -> None:
        self._closed.set()
        self._flusher.join(timeout=5)
        self.flush()
        if self.publisher is not None:
            self.publisher.close()

    def _flush_while_idle(self) -> None:
        while not self._closed.wait(FLUSH_S):
            self.recorder.flush()

    def _stored(self, block_hash: int, meta: BlockMeta, medium: str, group_idx: int) -> None:
        extra = [(meta.extra.hex(),)] if meta.extra else None
        self.recorder.stored([block_hash], meta.parent or None, list(meta.tokens), self.block_size, medium,
                             group_idx, extra_keys=extra)  # fmt: skip


def engine_kv_events(config: EngineConfig, scheduler: Scheduler) -> EngineKvEvents | None:
    """The events `config.kv_events_config` asks for, told by `scheduler`'s block managers and tiers; None: off."""
    settings = parse_kv_events_config(config.kv_events_config)
    if not settings.enable_kv_cache_events:
        return None
    events = EngineKvEvents(settings, config.block_size)
    blocks = scheduler.block_manager
    for group_idx, manager in enumerate((blocks.full, blocks.sliding) if hasattr(blocks, "sliding") else (blocks,)):
        manager.events, manager.group_idx = events, group_idx
    if scheduler.tiers is not None:
        scheduler.tiers.store.announce(events)
    return events


__all__ = ["CPU", "DISK", "GPU", "EngineKvEvents", "engine_kv_events"]
