"""The blocks of a model whose sliding-window layers keep a cache of their own beside its full attention layers'
(gpt-oss: 12 of each; Gemma 2 and 3): two groups of blocks (vLLM's hybrid KV cache manager, one group per window).

A sequence holds a table in each. The full layers' table grows with the sequence as always. The sliding layers'
table has the same length, but once every query still to come starts past a block's last token
(query q sees keys q - window < j <= q), that block goes back to its pool and its entry points at the null block:
a sequence holds about window / block_size + 1 blocks there at any length, and the memory so saved goes to the
full layers' pool (kv_budget.py). The scheduler sees one block manager: every allocation takes blocks in both groups
or in neither, a prefix hit needs the window's blocks before the hit point still cached in the sliding group, and a
sequence's blocks go back in both."""

from __future__ import annotations

from collections.abc import Callable

from sagellm.runtime.engine.block_manager import Block, BlockManager
from sagellm.runtime.engine.kv_tiers.block_file import BlockMeta
from sagellm.runtime.engine.sequence import Sequence


class WindowedBlocks:
    """`BlockManager`'s interface over the two groups: `blocks`, hashes and statistics are the full group's."""

    def __init__(
        self, num_blocks: int, num_window_blocks: int, block_size: int, window: int, enable_prefix_caching: bool
    ) -> None:
        self.full = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.sliding = BlockManager(num_window_blocks, block_size, enable_prefix_caching, "window_table", window)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching

    @property
    def blocks(self) -> list[Block]:
        return self.full.blocks

    @property
    def usage(self) -> float:
        return max(self.full.usage, self.sliding.usage)  # the fuller group is the one that stops admissions

    @property
    def prefix_queries(self) -> int:
        return self.full.prefix_queries

    @property
    def prefix_hits(self) -> int:
        return self.full.prefix_hits

    def find_cached_prefix(self, seq: Sequence, usable: Callable[[list[int]], bool] | None = None) -> list[int]:
        """The full group's cached prefix, cut to the longest whose window before the hit point is cached in the
        sliding group too (and that `usable` takes)."""

        def window_cached(hashes: list[int]) -> bool:
            cached, passed = self.sliding.cached_hashes, self.sliding.passed_blocks(len(hashes) * self.block_size)
            return all(h in cached for h in hashes[passed:]) and (usable is None or usable(hashes))

        return self.full.find_cached_prefix(seq, window_cached)

    def prefix_hash(self, seq: Sequence, num_blocks: int) -> int:
        return self.full.prefix_hash(seq, num_blocks)

    def block_meta(self, seq: Sequence, index: int) -> BlockMeta:
        return self.full.block_meta(seq, index)

    def allocate(
        self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = (), first_query: int | None = None
    ) -> bool:
        """Blocks in both groups for `num_new_tokens` more tokens after `cached_blocks` (the full group's cached
        prefix, found by `find_cached_prefix`), or in neither."""
        sliding = [self.sliding.cached_hashes.get(self.full.blocks[b].hash, -1) for b in cached_blocks]
        _, _, passed = self.sliding.span(seq, num_new_tokens, cached_blocks, first_query)
        if -1 in sliding[passed:]:
            return False  # a window the sliding group no longer holds: not a list find_cached_prefix gave
        fits = self.sliding.fits(seq, num_new_tokens, sliding, first_query)
        if not (fits and self.full.fits(seq, num_new_tokens, cached_blocks, first_query)):
            return False
        self.sliding.allocate(seq, num_new_tokens, sliding, first_query)
        return self.full.allocate(seq, num_new_tokens, cached_blocks, first_query)

    def cache_full_blocks(self, seq: Sequence) -> None:
        self.full.cache_full_blocks(seq)
        self.sliding.cache_full_blocks(seq)

    def free(self, seq: Sequence) -> None:
        self.full.free(seq)
        self.sliding.free(seq)

    def reset_prefix_cache(self) -> None:
        self.full.reset_prefix_cache()
        self.sliding.reset_prefix_cache()
