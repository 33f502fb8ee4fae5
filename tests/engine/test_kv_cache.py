"""The KV cache's memory: per layer a K and a V of [num_blocks, block_size, Hk, D], zeros, each its own memory."""

from __future__ import annotations

import torch

from sagellm.runtime.engine.kv_cache import allocate_kv_caches, bytes_per_block, num_blocks_for_budget
from tests.tiny_models import tiny_model_config as _config


def test_caches_are_zeros_of_the_paged_shape_each_in_its_own_writable_memory() -> None:
    caches = allocate_kv_caches(_config(), num_blocks=5, block_size=4, device=torch.device("cpu"))
    assert len(caches) == 3
    for k, v in caches:
        assert k.shape == v.shape == (5, 4, 2, 8) and k.dtype == torch.float32 and k.is_contiguous()
        assert not k.any() and not v.any()
    caches[0][0][1, 2] = 7.0
    assert caches[0][0].sum() == 7.0 * 16 and not caches[0][1].any() and not caches[1][0].any()
    halves = allocate_kv_caches(_config(), num_blocks=2, block_size=4, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert halves[0][0].dtype == torch.bfloat16 and not halves[0][0].any()


def test_a_budget_buys_whole_blocks() -> None:
    per_block = bytes_per_block(_config(), 4)
    assert per_block == 2 * 3 * 2 * 8 * 4 * 4
    assert num_blocks_for_budget(_config(), 4, 10 * per_block + 1) == 10 and num_blocks_for_budget(_config(), 4, 1) == 1
