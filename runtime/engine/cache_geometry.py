"""The KV cache's geometry: how many blocks, of how many tokens each, and the longest sequence they serve. The engine
sizes it once (to rank 0's budget) and it travels as one value to every runner that allocates a cache of its shape:
the engine's own, each other rank's of a parallel group (in its `RankSpec`), and a draft model's or MTP head's (in
the `ProposerContext`), so none of them can take the three from different places."""

from __future__ import annotations

import msgspec


class CacheGeometry(msgspec.Struct, frozen=True, kw_only=True):
    num_blocks: int  # every rank of a group allocates as many blocks (for its own heads and layers)
    block_size: int  # tokens a block holds
    max_model_len: int  # the longest sequence: the model's context, cut to what the blocks hold
    # The most tokens one step runs (the scheduler's budget): as many rope table rows for a step's pictures where a
    # model's rope is multimodal (models/mrope.py); 0: none
    max_step_tokens: int = 0
