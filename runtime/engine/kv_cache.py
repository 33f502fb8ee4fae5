"""The paged KV cache's memory: one preallocated K and one V tensor per attention layer with KV of its own, each
[num_blocks, block_size, Hk, D] of that layer's heads (a linear attention layer keeps a recurrent state instead:
state_cache.py; a layer sharing another's KV reads that one's cache).

Sizing is by a memory budget, so the same engine fits a laptop or a server; the block manager does the bookkeeping
and never touches these tensors."""

from __future__ import annotations

import math
import mmap
from functools import partial

import torch

from sagellm.backends.layer_caches import PagedKv
from sagellm.runtime.models.config import ModelConfig

KVCaches = list[PagedKv]


def bytes_per_block(
    config: ModelConfig, block_size: int, dtype: torch.dtype = torch.float32, window: int | None = None
) -> int:
    """A block's bytes over every layer with KV of its own, or (`window`) over those of that sliding window only
    (0: the full attention layers)."""
    layers = [i for i in config.kv_layers if window is None or config.window_of(i) == window]
    per_token = sum(2 * config.num_kv_heads_of(i) * config.head_dim_of(i) for i in layers)  # K and V
    return per_token * dtype.itemsize * block_size


def num_blocks_for_budget(config: ModelConfig, block_size: int, budget_bytes: int, dtype=torch.float32) -> int:
    return max(1, budget_bytes // bytes_per_block(config, block_size, dtype))


def window_group(config: ModelConfig) -> int:
    """The sliding window whose layers can keep a cache group of their own (window_blocks.py), 0 for none: a model
    mixing full attention layers with sliding ones of one window (gpt-oss, Gemma 2, 3 and 4)."""
    windows = {config.window_of(i) for i in config.kv_layers}
    return max(windows) if len(windows) == 2 and 0 in windows else 0


def uniform_window(config: ModelConfig) -> int:
    """The window every KV layer slides over (Mistral 7B v0.1, Phi-3 mini), 0 otherwise: the one group of blocks
    then gives back those the window has passed."""
    windows = {config.window_of(i) for i in config.kv_layers}
    return windows.pop() if len(windows) == 1 else 0


def allocate_kv_caches(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    window_blocks: int = 0,
) -> KVCaches:
    """`window_blocks`: the blocks of the sliding-window layers' own group (0: they take `num_blocks` as the others)."""
    zeros = untouched_zeros if device.type == "cpu" else partial(torch.zeros, device=device)
    shapes = [
        (window_blocks if window_blocks and config.window_of(i) else num_blocks, block_size,
         config.num_kv_heads_of(i), config.head_dim_of(i))
        for i in config.kv_layers
    ]  # fmt: skip
    return [PagedKv(zeros(shape, dtype=dtype), zeros(shape, dtype=dtype)) for shape in shapes]


def untouched_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros in a private anonymous mapping of their own: the kernel maps pages of zeros as they are first written,
    so a cache of a GiB costs no time and no resident memory until it fills (torch.zeros writes every byte: seconds
    per worker at start-up). Not calloc: in a process that has freed much, calloc may hand back heap memory and
    write every byte of it."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(shape)  # the tensor keeps the region


def token_slots(
    block_table: list[int],
    start: int,
    end: int,
    block_size: int,
    device: torch.device,
    null_block: int | None = None,
) -> torch.Tensor:
    """Flat cache slots (block * block_size + offset) of token positions [start, end) of one sequence; -1 for those
    in `null_block` (a sliding-window group's passed positions: not kept)."""
    positions = torch.arange(start, end)
    table = torch.tensor(block_table, dtype=torch.int64)
    blocks = table[positions // block_size]
    slots = blocks * block_size + positions % block_size
    if null_block is not None:
        slots[blocks == null_block] = -1
    return slots.to(device)  # [end - start]


Slots = torch.Tensor | list[torch.Tensor]  # the same slots for every layer, or each layer's own (-1: none)


def read_tokens(caches: KVCaches, slots: Slots, out: torch.Tensor | None = None) -> torch.Tensor:
    """The K and V of the given slots in every layer, as one [num_layers, 2, n, Hk, D] tensor (a copy): what a
    prefill worker sends to a decode worker; zeros where a layer's slot is -1. Layers of different head shapes
    (Gemma 4) fill the widest shape's first heads and dimensions, the rest zeros. `out`: where to gather them
    (shared memory the sender sends without copying again), else a new tensor."""
    k0 = caches[0][0]
    per_layer = slots if isinstance(slots, list) else [slots] * len(caches)
    heads, dims = max(k.shape[2] for k, _ in caches), max(k.shape[3] for k, _ in caches)
    if out is None:
        out = torch.empty((len(caches), 2, per_layer[0].numel(), heads, dims), dtype=k0.dtype, device=k0.device)
    for layer, ((k, v), layer_slots) in enumerate(zip(caches, per_layer)):
        missing = layer_slots < 0
        some_missing = bool(missing.any())
        if some_missing:
            layer_slots = layer_slots.clamp(min=0)
        for kind, cache in enumerate((k, v)):
            rows = cache.flatten(0, 1)
            if rows.shape[1:] == (heads, dims):
                torch.index_select(rows, 0, layer_slots, out=out[layer, kind])
            else:
                out[layer, kind].zero_()[:, : rows.shape[1], : rows.shape[2]] = rows.index_select(0, layer_slots)
        if some_missing:
            out[layer, :, missing] = 0
    return out


def write_tokens(caches: KVCaches, slots: Slots, kv: torch.Tensor) -> None:
    """Stores [num_layers, 2, n, Hk, D] K/V (from `read_tokens`, possibly another process's) at the given slots
    (where a layer's slot is -1, nothing)."""
    per_layer = slots if isinstance(slots, list) else [slots] * len(caches)
    if kv.shape[0] != len(caches) or kv.shape[1] != 2 or kv.shape[2] != per_layer[0].numel():
        raise ValueError(
            f"KV of shape {tuple(kv.shape)} does not fit {len(caches)} layers x {per_layer[0].numel()} tokens"
        )
    kv = kv.to(device=caches[0][0].device, dtype=caches[0][0].dtype)
    for (k, v), layer, layer_slots in zip(caches, kv, per_layer):
        heads, dims = k.shape[2:]
        kept = layer_slots >= 0
        if not bool(kept.all()):
            layer, layer_slots = layer[:, kept], layer_slots[kept]
        k.flatten(0, 1).index_copy_(0, layer_slots, layer[0, :, :heads, :dims])
        v.flatten(0, 1).index_copy_(0, layer_slots, layer[1, :, :heads, :dims])
