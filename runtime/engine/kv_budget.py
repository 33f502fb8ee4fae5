"""How many KV cache blocks an engine gets: `num_kv_blocks` when given, else `kv_cache_memory_gb`'s worth (vLLM's
--kv-cache-memory-bytes), else, by default, what its settings can use: `max_num_seqs` sequences of `max_model_len`
tokens, at most KV_MEMORY_FRACTION of the memory this process may still take (common/memory.py: MemAvailable, or a
cgroup's room when less). That is read after the model is loaded, so its weights are already counted out; the
runner's packed copy replaces the loader's, which the engine drops.

The cache is allocated untouched (kv_cache.py) and mapped a window ahead of the blocks in use (kv_prefault.py), so a
large reservation costs resident memory only as requests fill it: a small model on a big machine reserves its whole
context for every seat and holds what it has used. When not even one `max_model_len` sequence fits the cap, the
engine caps its context to the blocks it got, as with a size given."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from sagellm.common.memory import available_bytes
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.kv_cache import bytes_per_block, num_blocks_for_budget, window_group
from sagellm.runtime.models.config import ModelConfig

log = structlog.get_logger("sagellm.engine")

# Of the memory available when the engine starts. Not vLLM's 0.9 of a GPU it owns: a host's memory is shared with
# the OS's page cache, the gateway, an embedding model, and the other engines on the host, which size their caches
# from the same MemAvailable without seeing this one (untouched pages are not used memory yet). At 0.4, the two
# engines of a prefill/decode pair (graphs/pd.yaml) together fill at most 0.8 of it, leaving a fifth for the rest.
KV_MEMORY_FRACTION = 0.4
# Where no figure of free memory applies: a GPU or NPU (its cache is in device memory, which host figures do not
# describe), another OS: a fixed budget.
FALLBACK_BUDGET_GIB = 1.0


def kv_cache_blocks(
    config: EngineConfig,
    cache: ModelConfig,
    max_model_len: int,
    device_type: str = "cpu",
    available: Callable[[], int | None] | None = None,
) -> int:
    """The blocks of one rank's cache (`cache`: the model as that rank's KV cache sees it, rank 0's the largest);
    `max_model_len`: the context asked for (the setting, else the model's), before any cap; `available`: what reads
    the memory free (default: common/memory.py's `available_bytes`)."""
    if config.num_kv_blocks:
        return config.num_kv_blocks
    if config.kv_cache_memory_gb is not None:
        return num_blocks_for_budget(cache, config.block_size, int(config.kv_cache_memory_gb * 2**30))
    per_block = bytes_per_block(cache, config.block_size)
    wanted = -(-max_model_len // config.block_size) * config.max_num_seqs  # whole blocks for every seat
    free = (available or available_bytes)() if device_type == "cpu" else None
    # Each rank of a parallel group takes its share: its ranks may all be on this host.
    cap = KV_MEMORY_FRACTION * free / config.world_size if free is not None else FALLBACK_BUDGET_GIB * 2**30
    blocks = max(1, min(wanted, int(cap) // per_block))
    cut = blocks * config.block_size < max_model_len  # the engine's context is cut to the cache: worth a warning
    (log.warning if cut else log.info)(
        "kv_cache_sized",
        context_cut=cut,
        blocks=blocks,
        tokens=blocks * config.block_size,
        wanted_tokens=wanted * config.block_size,
        gib=round(blocks * per_block / 2**30, 2),
        available_gib=None if free is None else round(free / 2**30, 2),
        fraction=KV_MEMORY_FRACTION if free is not None else None,
    )
    return blocks


def window_group_blocks(
    config: EngineConfig, cache: ModelConfig, num_blocks: int, max_model_len: int
) -> tuple[int, int]:
    """(the full attention layers' blocks, the sliding-window layers' own group's) for a model whose sliding layers
    keep blocks of their own (window_blocks.py); (num_blocks, 0) for any other, and for a parallel engine (its
    ranks keep one group). `num_blocks`: kv_cache_blocks' count, as if every layer kept every token.

    The sliding group needs each seat's window (window / block_size + 2 blocks: it straddles one more, and a
    chunk's first query reads one before it), twice over for the sequences waiting with imported KV, plus a step's
    tokens, plus the null block; never more than the full group's. What the sliding layers no longer hold goes to
    the full group, where the cache was cut to fit memory (not where its size was given in blocks)."""
    window = window_group(cache)
    if not window or config.world_size > 1:
        return num_blocks, 0
    bs = config.block_size
    per_seat = window // bs + 2
    sliding = min(num_blocks, 2 * config.max_num_seqs * per_seat + -(-config.max_num_batched_tokens // bs)) + 1
    wanted = -(-max_model_len // bs) * config.max_num_seqs
    full = num_blocks
    if not config.num_kv_blocks and num_blocks < wanted:
        per_full, per_sliding = bytes_per_block(cache, bs, window=0), bytes_per_block(cache, bs, window=window)
        budget = num_blocks * (per_full + per_sliding)
        full = min(wanted, (budget - sliding * per_sliding) // per_full)
    log.info("kv_cache_groups", window=window, full_blocks=full, window_blocks=sliding)
    return full, sliding
