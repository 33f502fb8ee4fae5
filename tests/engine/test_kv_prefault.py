"""The KV cache's pages are mapped ahead of use by a background thread: a window beyond the highest block written,
or the whole cache for a server; the memory stays zeros and the engine's tokens are the same."""

from __future__ import annotations

import ctypes
import mmap
import sys
import time

import pytest
import torch

from sagellm.runtime.engine.kv_cache import allocate_kv_caches
from sagellm.runtime.engine.kv_prefault import KVPrefault
from tests.tiny_models import tiny_model_config

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="MADV_POPULATE_WRITE is Linux's")


def resident_blocks(tensor: torch.Tensor) -> int:
    """Whole blocks of `tensor` ([num_blocks, ...]) whose pages are all mapped (mincore)."""
    page, block_bytes = mmap.PAGESIZE, tensor[0].numel() * tensor.element_size()
    start = tensor.data_ptr() // page * page
    length = tensor.data_ptr() + tensor.numel() * tensor.element_size() - start
    flags = (ctypes.c_ubyte * (-(-length // page)))()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), flags) == 0
    blocks = 0
    for block in range(tensor.shape[0]):
        first = (tensor.data_ptr() + block * block_bytes - start) // page
        last = (tensor.data_ptr() + (block + 1) * block_bytes - 1 - start) // page
        if not all(flags[p] & 1 for p in range(first, last + 1)):
            break
        blocks += 1
    return blocks


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the prefault thread did not get there"
        time.sleep(0.01)


@pytest.fixture
def caches():
    config = tiny_model_config(num_layers=2, head_dim=64)  # 8 KiB per block: two pages
    return allocate_kv_caches(config, num_blocks=400, block_size=16, device=torch.device("cpu"))


def test_a_window_ahead_of_the_highest_block_written_is_mapped(caches) -> None:
    tensors = [t for pair in caches for t in pair]  # 8 KiB per block: two pages each
    prefault = KVPrefault(tensors, window=32)
    try:
        wait_for(lambda: all(resident_blocks(t) >= 32 for t in tensors))
        prefault.written(200)
        wait_for(lambda: all(resident_blocks(t) >= 233 for t in tensors))
        assert all(torch.count_nonzero(t) == 0 for t in tensors), "mapped pages are zeros"
    finally:
        prefault.close()


def test_a_server_maps_the_whole_cache(caches) -> None:
    tensors = [t for pair in caches for t in pair]
    prefault = KVPrefault(tensors, window=32, everything=True)
    try:
        wait_for(lambda: all(resident_blocks(t) == 400 for t in tensors))
    finally:
        prefault.close()
