"""The tiers under the prefix cache as one store: RAM, then disk, each optional.

A block put here goes to RAM; what RAM evicts goes to the disk tier's writer thread (off the engine's step), or is
dropped without one (or straight to disk with no RAM tier). A lookup asks the blocks just fetched from another
instance for one prompt (`stage`), then RAM, then the disk (a `stat`: another instance's files count). Counters say
what was stored, loaded and from where, for the engine's metrics."""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING

import torch

from sagellm.runtime.engine.kv_tiers.block_file import BlockKey, BlockMeta
from sagellm.runtime.engine.kv_tiers.disk_tier import DiskTier
from sagellm.runtime.engine.kv_tiers.ram_tier import RamTier

if TYPE_CHECKING:
    from sagellm.runtime.engine.block_events import BlockEvents

RAM, DISK, PEER = "ram", "disk", "peer"
CPU_MEDIUM, DISK_MEDIUM = "CPU", "DISK"  # their KV events' media (vLLM's names: kv_events/wire.py)


class TierStore:
    def __init__(self, ram: RamTier | None, disk: DiskTier | None) -> None:
        self.ram, self.disk = ram, disk
        if ram is not None:
            ram.on_evict = self._demote
        self.stored = 0  # blocks put
        self.loaded: Counter[str] = Counter()  # blocks loaded, by tier
        self.events: BlockEvents | None = None
        # Blocks handed to the disk's writer and not yet written: still served from memory meanwhile (a prompt
        # returning right after its blocks left RAM finds them). Entries leave from the writer thread.
        self._writing: dict[BlockKey, tuple[BlockMeta, torch.Tensor]] = {}
        if disk is not None:
            disk.on_written = self._written
        # Blocks fetched from another instance for the prompt being looked up (`stage`), until it has its blocks.
        self._staged: dict[BlockKey, tuple[BlockMeta, torch.Tensor]] = {}

    def announce(self, events: BlockEvents) -> None:
        """Reports to `events` from now on: what RAM takes and drops, what the disk's writer publishes and its
        janitor deletes, and the disk blocks lookups find or lose (an instance's DISK set is the blocks it knows
        of: those it wrote and those it found)."""
        self.events = events
        if self.disk is not None:
            self.disk.on_removed = events.disk_removed
            threading.Thread(target=self._announce_disk, name="kv-disk-announce", daemon=True).start()

    def _announce_disk(self) -> None:
        """The blocks already on disk at start (earlier runs', other instances'), announced as this instance's, read
        from their files' headers in a thread of its own."""
        for key in self.disk.published():
            if (meta := self.disk.meta_of(key)) is not None:
                self.events.disk_written(key, meta)

    def put(self, key: BlockKey, meta: BlockMeta, payload: torch.Tensor) -> None:
        """Keeps a block leaving the KV cache (the payload is owned from now on)."""
        self.stored += 1
        if self.ram is not None and self.ram.put(key, meta, payload):
            if self.events is not None:
                self.events.tier_stored(key, meta, CPU_MEDIUM)
        else:
            self._demote(key, meta, payload)

    def holds(self, key: BlockKey) -> bool:
        """Whether RAM has `key` (a block the cache evicts again needs no new copy then)."""
        return self.ram is not None and key in self.ram

    def where(self, key: BlockKey, meta: BlockMeta | None = None) -> str | None:
        """The tier holding `key` (whose hash is of `meta`): PEER (staged), RAM, DISK or None."""
        if key in self._staged:
            return PEER
        if self.ram is not None and key in self.ram or key in self._writing:
            return RAM
        if self.disk is not None and self.disk.contains(key):
            if self.events is not None and meta is not None:
                self.events.tier_stored(key, meta, DISK_MEDIUM)
            return DISK
        return None

    def load(self, key: BlockKey, meta: BlockMeta, nbytes: int) -> tuple[str, torch.Tensor] | None:
        """(tier, payload) of the block `key` whose hash was computed from `meta`, checked to be that block and
        `nbytes` long; None when no tier holds it whole (a bad disk file is set aside there and counted)."""
        for tier, entry in ((PEER, self._staged.get(key)), (RAM, self._in_memory(key))):
            if entry is not None and entry[0] == meta and entry[1].numel() == nbytes:
                self.loaded[tier] += 1
                return tier, entry[1]
        if self.disk is not None:
            payload = torch.empty(nbytes, dtype=torch.uint8)
            if self.disk.read_into(key, meta, payload):
                self.loaded[DISK] += 1
                return DISK, payload
            if self.events is not None:  # gone, or bad and set aside
                self.events.tier_removed(key, DISK_MEDIUM)
        return None

    def serve(self, key: BlockKey, nbytes: int) -> tuple[BlockMeta, torch.Tensor] | None:
        """(meta, payload) of `key`, `nbytes` long, from RAM or the disk, for another instance that fetches it (the
        disk's file checked as for a load); None when neither holds it."""
        entry = self._in_memory(key)
        if entry is not None or self.disk is None or (meta := self.disk.meta_of(key)) is None:
            return entry
        payload = torch.empty(nbytes, dtype=torch.uint8)
        return (meta, payload) if self.disk.read_into(key, meta, payload) else None

    def stage(self, key: BlockKey, meta: BlockMeta, payload: torch.Tensor) -> None:
        """Holds a block fetched from another instance for the prompt being looked up (until `unstage`)."""
        self._staged[key] = (meta, payload)

    def unstage(self) -> None:
        self._staged.clear()

    def _in_memory(self, key: BlockKey) -> tuple[BlockMeta, torch.Tensor] | None:
        """RAM's entry for `key`, or that of a block on its way to the disk."""
        entry = self.ram.get(key) if self.ram is not None else None
        return entry if entry is not None else self._writing.get(key)

    def flush(self, timeout_s: float) -> int:
        """Moves RAM's blocks to the disk and waits for the writes (before sleep, unload or exit); without a disk,
        RAM keeps them. Returns how many writes were left undone at the deadline."""
        if self.disk is None:
            return 0
        if self.ram is not None:
            self.ram.drain()
        return self.disk.flush(timeout_s)

    def close(self, timeout_s: float) -> None:
        self.flush(timeout_s)
        if self.disk is not None:
            self.disk.close(timeout_s)

    def _demote(self, key: BlockKey, meta: BlockMeta, payload: torch.Tensor) -> None:
        """A block RAM evicted (or could not take): to the disk, unless a file holds it already."""
        if self.events is not None:
            self.events.tier_removed(key, CPU_MEDIUM)
        if self.disk is not None and key not in self._writing and not self.disk.contains(key):
            self._writing[key] = (meta, payload)  # before the writer may finish it
            if not self.disk.submit(key, meta, payload):
                self._writing.pop(key, None)

    def _written(self, key: BlockKey, meta: BlockMeta, on_disk: bool) -> None:
        """The disk's writer is done with a block (on its thread)."""
        self._writing.pop(key, None)
        if on_disk and self.events is not None:
            self.events.disk_written(key, meta)
