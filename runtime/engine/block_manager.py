"""The paged KV cache's bookkeeping: which fixed-size block holds which tokens of which sequence.

Blocks are ref-counted so sequences sharing a prompt prefix share blocks. A full block is named by a chained hash
(its tokens plus the hash of the block before it: `prefix_hash`, the same numbers the router predicts with), so equal
prefixes find equal blocks. Freed blocks keep their hash
and stay findable until a new allocation needs them; they are reused least-recently-freed first (LRU).
Allocation answers False, never raises, when the cache is full: the scheduler then preempts."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sagellm.runtime.engine.kv_tiers.block_file import BlockMeta
from sagellm.runtime.engine.prefix_hash import hash_block, media_keys, prefix_root
from sagellm.runtime.engine.sequence import Sequence

if TYPE_CHECKING:
    from sagellm.runtime.engine.block_events import BlockEvents


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered in the prefix cache
    meta: BlockMeta | None = None  # what `hash` was computed from, kept where evicted blocks go to a tier


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        table: str = "block_table",
        window: int = 0,
    ) -> None:
        """`table`: the sequences' attribute holding their tables in these blocks; `window` > 0: the blocks of
        sliding-window layers of that window, which keep a table of their own (window_blocks.py): blocks before
        the window of every query still to come go back to the pool, their entries pointing at the null block."""
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.table = table
        self.window = window
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = next to reuse
        # Where passed entries point: a block never handed out, never written, so a kernel that reads a whole table
        # reads zeros there.
        self.null_block: int | None = None
        if window:
            del self._free[0]
            self.blocks[0].ref_count = 1
            self.null_block = 0
        self._cached: dict[int, int] = {}  # block hash -> block id
        # Where a cached block goes as it is evicted (the tiers under the prefix cache, kv_tiers/): called before its
        # memory is reused, so it may still read it.
        self.on_evict: Callable[[Block], None] | None = None
        # The engine's KV events (kv_events/): blocks registered and evicted here, as vLLM's group `group_idx`.
        self.events: BlockEvents | None = None
        self.group_idx = 0
        self._seq_hashes: dict[str, list[int]] = {}  # request id -> hashes of its registered full blocks
        self.prefix_queries = 0  # prompt blocks looked up
        self.prefix_hits = 0  # ... and found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        usable = self.num_blocks - (self.null_block is not None)
        return 1.0 - self.num_free_blocks / usable

    @property
    def cached_hashes(self) -> dict[int, int]:
        """Block hash -> the block holding it, of every block findable in the prefix cache."""
        return self._cached

    def passed_blocks(self, first_query: int) -> int:
        """How many leading blocks of a table no query at position >= `first_query` reads (0 without a window)."""
        return max(0, first_query - self.window + 1) // self.block_size if self.window else 0

    # -- prefix cache -------------------------------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence, usable: Callable[[list[int]], bool] | None = None) -> list[int]:
        """Blocks already holding the longest cached prefix of `seq`. At least one token is always left to
        compute, because the step that computes the last token is the one that samples the next. `usable(hashes)`:
        whether a prefix of blocks of those chained hashes may be resumed from (a model with recurrent layers needs
        their states after its last block too, one whose sliding-window layers keep blocks of their own needs the
        window's): the prefix is cut to the longest such."""
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        hashes: list[int] = []
        resumable = 0
        parent = prefix_root(seq.cache_salt)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            parent = self._hash(parent, seq, i)
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            found.append(block_id)
            hashes.append(parent)
            if usable is None or usable(hashes):
                resumable = len(found)
        self.prefix_queries += max_blocks
        self.prefix_hits += resumable
        return found[:resumable]

    def prefix_hash(self, seq: Sequence, num_blocks: int) -> int:
        """The chained hash of `seq`'s first `num_blocks` full blocks (computed or not): what the prefix cache will
        name them by."""
        hashes = self._seq_hashes.get(seq.request_id, [])
        if len(hashes) >= num_blocks:
            return hashes[num_blocks - 1]
        parent = hashes[-1] if hashes else prefix_root(seq.cache_salt)
        for i in range(len(hashes), num_blocks):
            parent = self._hash(parent, seq, i)
        return parent

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Registers the blocks of `seq` that became full and computed, so later prompts can share them; with a
        window, then gives back those no query will read (its next query is at `num_computed_tokens`): full ones
        stay findable until reused."""
        if self.enable_prefix_caching:
            hashes = self._seq_hashes.setdefault(seq.request_id, [])
            registered: list[Block] = []
            for i in range(len(hashes), seq.num_computed_tokens // self.block_size):
                parent = hashes[-1] if hashes else prefix_root(seq.cache_salt)
                h = self._hash(parent, seq, i)
                hashes.append(h)
                block = self.blocks[getattr(seq, self.table)[i]]
                if block.id != self.null_block and block.hash is None and h not in self._cached:
                    block.hash = h
                    self._cached[h] = block.id
                    if self.on_evict is not None or self.events is not None:
                        block.meta = self.meta_of(parent, seq, i)
                        registered.append(block)
            if self.events is not None and registered:
                self.events.cached(self.group_idx, [(b.hash, b.meta) for b in registered])
        if self.window:
            self._release_passed(seq, self.passed_blocks(seq.num_computed_tokens))

    def _hash(self, parent: int, seq: Sequence, index: int) -> int:
        start, end = index * self.block_size, (index + 1) * self.block_size
        return hash_block(parent, seq.token_ids[start:end], media_keys(seq.mm_features, start, end))

    def meta_of(self, parent: int, seq: Sequence, index: int) -> BlockMeta:
        """What the hash of `seq`'s block `index`, chained to `parent`, is computed from."""
        start, end = index * self.block_size, (index + 1) * self.block_size
        return BlockMeta(parent, tuple(seq.token_ids[start:end]), media_keys(seq.mm_features, start, end))

    def block_meta(self, seq: Sequence, index: int) -> BlockMeta:
        """What the hash of `seq`'s block `index` is computed from (its parent's hash, its tokens, its media keys)."""
        parent = self.prefix_hash(seq, index) if index else prefix_root(seq.cache_salt)
        return self.meta_of(parent, seq, index)

    # -- the tiers under the prefix cache (kv_tiers/) -----------------------------------------------------------
    def adopt(self, block_hash: int, meta: BlockMeta) -> int:
        """A free block taken (the least recently used) to hold the block of `block_hash` loaded from a tier: it is
        registered in the prefix cache, free and most recently used, so the lookup that follows finds it. The caller
        writes its KV before any step runs."""
        block_id = self._take_free_block()
        block = self.blocks[block_id]
        block.hash, block.meta, block.ref_count = block_hash, meta, 0
        self._cached[block_hash] = block_id
        self._free[block_id] = None
        if self.events is not None:
            self.events.cached(self.group_idx, [(block_hash, meta)])
        return block_id

    def touch(self, block_ids: list[int]) -> None:
        """Makes these free blocks the most recently used, so adopting others next does not evict them."""
        for block_id in block_ids:
            if block_id in self._free:
                self._free.move_to_end(block_id)

    # -- allocation ---------------------------------------------------------------------------------------------
    def allocate(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = (), first_query: int | None = None
    ) -> bool:
        """Gives `seq` the cached prefix blocks plus enough fresh blocks for `num_new_tokens` more tokens after
        them. Changes nothing and answers False when the cache cannot hold that. With a window, entries before the
        window of `first_query` (the earliest position that will attend; default: the first new token) get the
        null block instead, cached or not."""
        if not self.fits(seq, num_new_tokens, cached_blocks, first_query):
            return False
        table = getattr(seq, self.table)
        start, total, passed = self.span(seq, num_new_tokens, cached_blocks, first_query)
        for i, block_id in enumerate(cached_blocks, start):
            if i < passed:
                table.append(self.null_block)
                continue
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            table.append(block_id)
        for i in range(start + len(cached_blocks), total):
            table.append(self.null_block if i < passed else self._take_free_block())
        return True

    def fits(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = (), first_query: int | None = None
    ) -> bool:
        """Whether `allocate` with these arguments would succeed."""
        start, total, passed = self.span(seq, num_new_tokens, cached_blocks, first_query)
        kept = [b for i, b in enumerate(cached_blocks, start) if i >= passed]
        revived = sum(1 for b in kept if self.blocks[b].ref_count == 0)  # leave the free pool
        return len(range(max(start + len(cached_blocks), passed), total)) + revived <= self.num_free_blocks

    def span(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = (), first_query: int | None = None
    ) -> tuple[int, int, int]:
        """What `allocate` would do: (the table's length now, its length after, the entries below which are null)."""
        computed = len(cached_blocks) * self.block_size if cached_blocks else seq.num_computed_tokens
        passed = self.passed_blocks(computed if first_query is None else first_query)
        return len(getattr(seq, self.table)), -(-(computed + num_new_tokens) // self.block_size), passed

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict it from the prefix cache
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
                if self.on_evict is not None and block.meta is not None:
                    self.on_evict(block)
                if self.events is not None:
                    self.events.evicted(self.group_idx, [block.hash])
            block.hash = block.meta = None
        block.ref_count = 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Releases the blocks of `seq`; the tail is freed first so it is also evicted first."""
        for block_id in reversed(getattr(seq, self.table)):
            self._release(block_id)
        setattr(seq, self.table, [])
        self._seq_hashes.pop(seq.request_id, None)

    def _release_passed(self, seq: Sequence, passed: int) -> None:
        """Gives back `seq`'s blocks below table index `passed` and points their entries at the null block."""
        table = getattr(seq, self.table)
        for i in reversed(range(min(passed, len(table)))):
            if table[i] == self.null_block:  # those before it went earlier
                break
            self._release(table[i])
            table[i] = self.null_block

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block_id == self.null_block:
            return
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
            if block.hash is None:  # nothing to find in it: reuse it before cached blocks
                self._free.move_to_end(block_id, last=False)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0:
                block.hash = block.meta = None
        dropped = [h for h, b in self._cached.items() if self.blocks[b].hash != h]
        self._cached = {h: b for h, b in self._cached.items() if self.blocks[b].hash == h}
        if self.events is not None and dropped:
            self.events.evicted(self.group_idx, dropped)
