"""Which prompt prefixes each engine instance has probably cached, as seen from the requests sent to it.

A shared helper of `route` (cache_aware, locality) and `pd_split` (uncached prompt tokens), not an operator. An
engine's prefix cache is keyed, as in vLLM's automatic prefix caching, by chained hashes of full token blocks: block
i's hash covers (block i-1's hash, block i's tokens), so one hash names a whole prefix and two prompts share a cached
block exactly when they share every token up to its end. The control plane cannot see inside the engines, so it
remembers what it sent where and treats that as cached: a bounded LRU per instance, evicting the deepest blocks of the
least recently sent prompts first, like the engine's own cache. It is an estimate (the engine may have evicted sooner),
which is all routing needs.

Hashes are the engines' own (`sagellm.runtime.engine.prefix_hash`), so what the index remembers names exactly the
blocks an engine's prefix cache finds, in every process and run."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from sagellm.common.errors import FieldError, InvalidInput
from sagellm.runtime.engine.prefix_hash import block_hashes


class PrefixIndex:
    """Per instance, the block hashes of prompts recently sent there (an LRU of at most `max_blocks_per_instance`).

    Methods take the token ids, and optionally their `block_hashes` when the caller already has them, so one routing
    decision hashes a prompt once however many instances it compares."""

    def __init__(self, block_size: int = 16, max_blocks_per_instance: int = 100_000) -> None:
        if block_size < 1:
            raise FieldError("block_size", f"block_size must be >= 1, got {block_size}")
        if max_blocks_per_instance < 1:
            raise InvalidInput(f"max_blocks_per_instance must be >= 1, got {max_blocks_per_instance}")
        self.block_size = block_size
        self.max_blocks_per_instance = max_blocks_per_instance
        self._blocks: dict[str, OrderedDict[int, None]] = {}

    def hashes(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[int]:
        return block_hashes(token_ids, self.block_size, cache_salt)

    def cached_tokens(self, instance: str, token_ids: Sequence[int], hashes: list[int] | None = None) -> int:
        """Length in tokens of the longest prefix of `token_ids` remembered on `instance` (a multiple of block_size).

        Looking up does not refresh recency: only sending a prompt (`record`) keeps it in the engine's cache."""
        blocks = self._blocks.get(instance)
        if not blocks:
            return 0
        hashes = self.hashes(token_ids) if hashes is None else hashes
        matched = 0
        for h in hashes:
            if h not in blocks:
                break
            matched += 1
        return matched * self.block_size

    def record(self, instance: str, token_ids: Sequence[int], hashes: list[int] | None = None) -> None:
        """Remember that `token_ids` was sent to `instance`: its full blocks become the most recently used there."""
        hashes = self.hashes(token_ids) if hashes is None else hashes
        blocks = self._blocks.setdefault(instance, OrderedDict())
        # Deepest block first, so the shared root ends up most recent and eviction trims prompts from their tails,
        # never orphaning a remembered block by evicting its parent.
        for h in reversed(hashes):
            blocks[h] = None
            blocks.move_to_end(h)
        while len(blocks) > self.max_blocks_per_instance:
            blocks.popitem(last=False)

    def num_blocks(self, instance: str) -> int:
        return len(self._blocks.get(instance, ()))
