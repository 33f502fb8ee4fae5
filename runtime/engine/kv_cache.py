"""The paged KV cache's memory: one preallocated K and one V tensor per layer, each [num_blocks, block_size, Hk, D].

Sizing is by a memory budget, so the same engine fits a laptop or a server; the block manager does the bookkeeping
and never touches these tensors."""

from __future__ import annotations

import torch

from sagellm.runtime.models.config import ModelConfig

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype = torch.float32) -> int:
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize  # K and V
    return per_token * block_size


def num_blocks_for_budget(config: ModelConfig, block_size: int, budget_bytes: int, dtype=torch.float32) -> int:
    return max(1, budget_bytes // bytes_per_block(config, block_size, dtype))


def allocate_kv_caches(
    config: ModelConfig, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> KVCaches:
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(config.num_layers)
    ]
