"""The prefix cache's tiers joined to the engine: blocks go down as the KV cache evicts them, and come back up into
free blocks of the cache ahead of a prompt that starts with them.

Going down: the block manager calls `_store_block` as it reuses a cached block's memory, so the tiers hold what the
pages lost, each block once: a block the RAM tier still holds costs no copy. The copies are made together, one
gather a layer for all the blocks a schedule evicted (`store_evicted`), before anything writes the cache again: the
scheduler calls it as a schedule ends and before an import writes, a load before it writes. A model with recurrent
layers stores a checkpoint of their states as its slot is replaced (`_store_states`).

Coming up: before the scheduler looks a waiting prompt's prefix up, `revive` walks its chained hashes past what the
pages hold, finds the deepest prefix the tiers can complete (every block, the window's blocks of a sliding-window
group, the recurrent states after its last block), and loads the missing pieces into free blocks (and a checkpoint
slot) registered under their hashes. The lookup that follows then finds an ordinary cached prefix, so every path a
page hit takes (chunked prefill, windows, checkpoints, speculation, PD, resume) takes it unchanged. A block that
fails its checks cuts the prefix there: the rest is computed, never served wrong. Loads run at schedule time,
before the step that reads them.

Across instances: where the router says another instance holds more of the prompt (`Sequence.peer_prefix`), the
walk fetches the blocks past what this instance holds from that one in one round trip (`peers`: peer_blocks.py) and
loads them like a tier's. The other side is `export`: the blocks of given keys from the pages, the checkpoints and
the tiers, for a fetch that arrives while no step runs (the operator running the engine serves them)."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from sagellm.runtime.engine.block_manager import Block, BlockManager
from sagellm.runtime.engine.kv_tiers.block_file import BlockKey, BlockMeta
from sagellm.runtime.engine.kv_tiers.block_payloads import FULL, SLIDING, STATES, BlockPayloads
from sagellm.runtime.engine.kv_tiers.peer_blocks import BlockClient, Found
from sagellm.runtime.engine.kv_tiers.tier_store import TierStore
from sagellm.runtime.engine.outputs import KvOffloadStats
from sagellm.runtime.engine.prefix_hash import hash_block, prefix_root
from sagellm.runtime.engine.sequence import Sequence
from sagellm.runtime.engine.state_slots import StateSlots
from sagellm.runtime.engine.window_blocks import WindowedBlocks

log = structlog.get_logger("sagellm.kv_tiers")


@dataclass
class _Link:
    """One block of a prompt's chain: its hash, what the hash is of, and where the full group's block is."""

    hash: int
    meta: BlockMeta
    page: int | None  # the full group's cached block holding it, None: a tier holds it


class PrefixTiers:
    def __init__(
        self, blocks: BlockManager | WindowedBlocks, slots: StateSlots | None, store: TierStore, payloads: BlockPayloads
    ) -> None:
        self.store, self.payloads, self.slots = store, payloads, slots
        windowed = isinstance(blocks, WindowedBlocks)
        self.full: BlockManager = blocks.full if windowed else blocks
        self.sliding: BlockManager | None = blocks.sliding if windowed else None
        self.full.on_evict = lambda block: self._store_block(FULL, block)
        if self.sliding is not None:
            self.sliding.on_evict = lambda block: self._store_block(SLIDING, block)
        if slots is not None:
            slots.on_evict = self._store_states
        self._evicted: list[tuple[str, int, BlockKey, BlockMeta]] = []  # (group, block, key, meta): not yet copied
        self.peers: BlockClient | None = None  # set with the identity (setup.py)
        self.identity_sha = b""  # what the blocks' headers carry (kv_tiers/identity.py): peers refuse another's

    # -- going down -----------------------------------------------------------------------------------------------
    def _store_block(self, group: str, block: Block) -> None:
        key = BlockKey(group, block.hash)
        if not self.store.holds(key):
            self._evicted.append((group, block.id, key, block.meta))

    def store_evicted(self) -> None:
        """Copies the blocks evicted since the last call out of the cache into the tiers; their memory must not have
        been written since (the step that reuses it runs after the schedule that evicted them)."""
        if not self._evicted:
            return
        evicted, self._evicted = self._evicted, []
        for group in (FULL, SLIDING):
            ours = [(block_id, key, meta) for g, block_id, key, meta in evicted if g == group]
            if ours:
                payloads = self.payloads.read_many(group, [block_id for block_id, _, _ in ours])
                for (_, key, meta), payload in zip(ours, payloads):
                    self.store.put(key, meta, payload)

    def _store_states(self, prefix_hash: int, slot: int, meta: BlockMeta) -> None:
        key = BlockKey(STATES, prefix_hash)
        if not self.store.holds(key):
            self.store.put(key, meta, self.payloads.read(STATES, slot))

    def flush(self, timeout_s: float) -> int:
        """Stores every cached block and checkpoint the pages hold, then moves RAM's to the disk and waits (before
        sleep, unload or exit: the next start finds them). Returns the writes left undone at the deadline."""
        for group, manager in ((FULL, self.full), (SLIDING, self.sliding)):
            for block in manager.blocks if manager is not None else ():
                if block.hash is not None and block.meta is not None:
                    self._store_block(group, block)
        self.store_evicted()
        for prefix_hash, slot, meta in self.slots.checkpoints() if self.slots is not None else ():
            self._store_states(prefix_hash, slot, meta)
        left = self.store.flush(timeout_s)
        if left:
            log.warning("kv_tiers_flush_incomplete", blocks_left=left, timeout_s=timeout_s)
        return left

    def stats(self) -> KvOffloadStats:
        store = self.store
        return KvOffloadStats(
            ram_bytes=store.ram.bytes_used if store.ram is not None else 0,
            disk_bytes=store.disk.bytes_used if store.disk is not None else 0,
            stored_blocks=store.stored,
            loaded_blocks=sum(store.loaded.values()),
        )

    def close(self, timeout_s: float) -> None:
        self.flush(timeout_s)
        self.store.close(timeout_s)

    # -- coming up ------------------------------------------------------------------------------------------------
    def revive(self, seq: Sequence) -> None:
        """Loads into the KV cache the blocks (and recurrent states) of `seq`'s longest prefix the pages lack and the
        tiers (or the peer the router named) hold, registered in the prefix cache; `seq.cached_by_tier_blocks`
        records where each came from."""
        try:
            self._revive(seq)
        finally:
            self.store.unstage()

    def _revive(self, seq: Sequence) -> None:
        chain = self._chain(seq)
        n = self._deepest_usable(chain)
        if n == 0:
            return
        window = range(self.sliding.passed_blocks(n * self.full.block_size), n) if self.sliding is not None else ()
        missing_full = [i for i in range(n) if chain[i].page is None]
        missing_window = [i for i in window if chain[i].hash not in self.sliding.cached_hashes]
        states_missing = self.slots is not None and not self.slots.has_checkpoint(chain[n - 1].hash)
        if not (missing_full or missing_window or states_missing):
            return  # the pages hold it all: an ordinary hit
        if not self._room(self.full, [link.page for link in chain[:n]], len(missing_full)):
            return
        if missing_window:
            pages = [self.sliding.cached_hashes.get(chain[i].hash) for i in window]
            if not self._room(self.sliding, pages, len(missing_window)):
                return
        loaded = self._load_blocks(FULL, self.full, chain, missing_full)
        seq.cached_by_tier_blocks = loaded
        n = min(n, missing_full[len(loaded)] if len(loaded) < len(missing_full) else n)
        if self.sliding is not None:
            self._load_blocks(SLIDING, self.sliding, chain, [i for i in missing_window if i < n])
        if states_missing and n == self._deepest_usable(chain[:n]):
            self._load_states(chain[n - 1])

    def _chain(self, seq: Sequence) -> list[_Link]:
        """`seq`'s prompt blocks, from the first, as long as the pages or a tier hold each (at least one token is left
        to compute, as in `find_cached_prefix`)."""
        chain: list[_Link] = []
        bs, parent = self.full.block_size, prefix_root(seq.cache_salt)
        limit = (seq.num_tokens - 1) // bs
        for i in range(limit):
            meta = self.full.meta_of(parent, seq, i)
            block_hash = hash_block(meta.parent, meta.tokens, meta.extra)
            page = self.full.cached_hashes.get(block_hash)
            key = BlockKey(FULL, block_hash)
            missing = page is None and self.store.where(key, meta) is None
            if missing and (not self._fetch(seq, i, parent, limit) or self.store.where(key, meta) is None):
                break
            chain.append(_Link(block_hash, meta, page))
            parent = block_hash
        return chain

    def _fetch(self, seq: Sequence, start: int, parent: int, limit: int) -> bool:
        """Fetches from the peer the router named for `seq` (once) its blocks from `start` (chained to `parent`) as
        far as the peer holds them, with the window's sliding-group blocks and the recurrent states after each, and
        stages what came; whether anything did."""
        peer, seq.peer_prefix = seq.peer_prefix, None
        end = min(peer.blocks, limit) if peer is not None and self.peers is not None else 0
        if end <= start:
            return False
        wanted: list[tuple[BlockKey, BlockMeta]] = []
        passed = self.sliding.passed_blocks(end * self.full.block_size) if self.sliding is not None else end
        for i in range(start, end):
            meta = self.full.meta_of(parent, seq, i)
            parent = hash_block(meta.parent, meta.tokens, meta.extra)
            wanted.append((BlockKey(FULL, parent), meta))
            if i >= passed:
                wanted.append((BlockKey(SLIDING, parent), meta))
            if self.slots is not None:
                wanted.append((BlockKey(STATES, parent), meta))
        nbytes = {group: self.payloads.nbytes(group) for group in (FULL, SLIDING, STATES)}
        found = self.peers.fetch(peer, wanted, nbytes)
        for key, meta, payload in found:
            self.store.stage(key, meta, payload)
        return bool(found)

    def export(self, keys: list[BlockKey]) -> Found:
        """The blocks of `keys` this engine holds, from its pages, checkpoints and tiers, for another instance that
        fetches them; those it lacks are left out. Called while no step runs."""
        found: Found = []
        paged: dict[str, list[tuple[int, BlockKey, BlockMeta]]] = {FULL: [], SLIDING: []}
        managers = {FULL: self.full, SLIDING: self.sliding}
        checkpoints = {h: (slot, meta) for h, slot, meta in self.slots.checkpoints()} if self.slots is not None else {}
        for key in keys:
            manager = managers.get(key.group)
            page = manager.cached_hashes.get(key.block_hash) if manager is not None else None
            if page is not None and manager.blocks[page].meta is not None:
                paged[key.group].append((page, key, manager.blocks[page].meta))
            elif key.group == STATES and key.block_hash in checkpoints:
                slot, meta = checkpoints[key.block_hash]
                found.append((key, meta, self.payloads.read(STATES, slot)))
            elif (entry := self.store.serve(key, self.payloads.nbytes(key.group))) is not None:
                found.append((key, *entry))
        for group, blocks in paged.items():
            payloads = self.payloads.read_many(group, [page for page, _, _ in blocks]) if blocks else []
            found += [(key, meta, payload) for (_, key, meta), payload in zip(blocks, payloads)]
        return found

    def _deepest_usable(self, chain: list[_Link]) -> int:
        """The most blocks of `chain` a prompt may resume after: with recurrent layers, a prefix whose states after it
        are kept; with a sliding-window group, one whose window's blocks are kept there too."""
        for n in range(len(chain), 0, -1):
            block_hash = chain[n - 1].hash
            if self.slots is not None and not (
                self.slots.has_checkpoint(block_hash) or self.store.where(BlockKey(STATES, block_hash))
            ):
                continue
            if self.sliding is not None and not all(
                chain[i].hash in self.sliding.cached_hashes or self.store.where(BlockKey(SLIDING, chain[i].hash))
                for i in range(self.sliding.passed_blocks(n * self.full.block_size), n)
            ):
                continue
            return n
        return 0

    @staticmethod
    def _room(manager: BlockManager, pages: list[int | None], wanted: int) -> bool:
        """Whether `wanted` blocks can be adopted without evicting the prefix's own cached `pages` (made the most
        recently used first) and with a block left for the prompt's next tokens."""
        held = [page for page in pages if page is not None]
        manager.touch(held)
        free_held = sum(1 for page in held if manager.blocks[page].ref_count == 0)
        return wanted + free_held < manager.num_free_blocks

    def _load_blocks(self, group: str, manager: BlockManager, chain: list[_Link], indexes: list[int]) -> dict[int, str]:
        """Loads the blocks of `chain` at `indexes` into adopted blocks, in order, stopping at the first no tier
        holds whole; block id -> the tier it came from, of those loaded."""
        loaded: dict[int, str] = {}
        nbytes = self.payloads.nbytes(group)
        for i in indexes:
            link = chain[i]
            found = self.store.load(BlockKey(group, link.hash), link.meta, nbytes)
            if found is None:
                break
            block_id = manager.adopt(link.hash, link.meta)
            self.store_evicted()  # what the block held before, if anything, goes down first
            self.payloads.write(group, block_id, found[1])
            loaded[block_id] = found[0]
        return loaded

    def _load_states(self, link: _Link) -> None:
        found = self.store.load(BlockKey(STATES, link.hash), link.meta, self.payloads.nbytes(STATES))
        if found is None:
            return
        slot = self.slots.adopt(link.hash, link.meta)
        if slot is not None:
            self.payloads.write(STATES, slot, found[1])

    def cached_by_tier(self, seq: Sequence, cached: list[int]) -> dict[str, int]:
        """The tokens of `seq`'s cached prefix `cached` (block ids) by where they came from: the pages, or a tier
        `revive` loaded them from for it."""
        bs = self.full.block_size
        by_tier = {"pages": len(cached) * bs}
        for block_id in cached:
            tier = seq.cached_by_tier_blocks.get(block_id)
            if tier is not None:
                by_tier[tier] = by_tier.get(tier, 0) + bs
                by_tier["pages"] -= bs
        return by_tier
