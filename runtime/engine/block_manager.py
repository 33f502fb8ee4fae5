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

from sagellm.runtime.engine.prefix_hash import hash_block, prefix_root
from sagellm.runtime.engine.sequence import Sequence


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered in the prefix cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = next to reuse
        self._cached: dict[int, int] = {}  # block hash -> block id
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
        return 1.0 - self.num_free_blocks / self.num_blocks

    # -- prefix cache -------------------------------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence, usable: Callable[[int], bool] | None = None) -> list[int]:
        """Blocks already holding the longest cached prefix of `seq`. At least one token is always left to
        compute, because the step that computes the last token is the one that samples the next. `usable(hash)`:
        whether a prefix ending with the block of that hash may be resumed from (a model with recurrent layers needs
        their states there too): the prefix is cut to the longest such."""
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        resumable = 0
        parent = prefix_root(seq.cache_salt)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for i in range(max_blocks):
            parent = self._hash(parent, seq.token_ids, i)
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            found.append(block_id)
            if usable is None or usable(parent):
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
            parent = self._hash(parent, seq.token_ids, i)
        return parent

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Registers the blocks of `seq` that became full and computed, so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        hashes = self._seq_hashes.setdefault(seq.request_id, [])
        for i in range(len(hashes), seq.num_computed_tokens // self.block_size):
            h = self._hash(hashes[-1] if hashes else prefix_root(seq.cache_salt), seq.token_ids, i)
            hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self._cached:
                block.hash = h
                self._cached[h] = block.id

    def _hash(self, parent: int, token_ids: list[int], index: int) -> int:
        start = index * self.block_size
        return hash_block(parent, token_ids[start : start + self.block_size])

    # -- allocation ---------------------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Gives `seq` the cached prefix blocks plus enough fresh blocks for `num_new_tokens` more tokens after
        them. Changes nothing and answers False when the cache cannot hold that."""
        computed = len(cached_blocks) * self.block_size if cached_blocks else seq.num_computed_tokens
        needed = -(-(computed + num_new_tokens) // self.block_size) - len(seq.block_table) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)  # leave the free pool
        if max(needed, 0) + revived > self.num_free_blocks:
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(max(needed, 0)):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict it from the prefix cache
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def free(self, seq: Sequence) -> None:
        """Releases the blocks of `seq`; the tail is freed first so it is also evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:  # nothing to find in it: reuse it before cached blocks
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []
        self._seq_hashes.pop(seq.request_id, None)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0:
                block.hash = None
        self._cached = {h: b for h, b in self._cached.items() if self.blocks[b].hash == h}
