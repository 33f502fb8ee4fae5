"""Maps the CPU KV cache's pages a little ahead of the blocks the engine writes, in a background thread.

The cache is allocated untouched (kv_cache.py: a GiB costs nothing until it fills), so the first write into each
page faults: the kernel traps, zeroes 4 KiB and maps it, once per page. On the 2-core VMs this project runs on
that costs more than the writes themselves: a 512-token prefill's K/V takes ~1.5 ms a layer to store where the
copy is ~40 us, ~2.3 s of a W1 run (64 requests fill ~1.1 GiB of fresh cache once). Blocks are handed out in
ascending order until the cache has been used once (block_manager.py), so the pages about to be written are known:
this thread asks the kernel to map the next window of blocks in every layer's K and V in one call each
(madvise(MADV_POPULATE_WRITE), Linux 5.14+; ctypes releases the GIL, so the engine runs meanwhile). The zeroing
still happens, but off the step's critical path and without a trap per page. Where the call is missing (another
OS, an older kernel) the thread stops and pages fault on their first write."""

from __future__ import annotations

import ctypes
import mmap
import threading

import structlog
import torch

from sagellm.common.memory import libc_function

log = structlog.get_logger("sagellm.kv_prefault")

MADV_DONTNEED = 4  # linux/mman.h
MADV_POPULATE_WRITE = 23
WINDOW_BLOCKS = 64  # blocks mapped ahead of the highest one written (SmolLM2: 47 MB over its 60 K/V tensors)


class KVPrefault:
    """Keeps blocks [0, highest written + WINDOW_BLOCKS) of `tensors` ([num_blocks, ...] each) mapped, or with
    `everything`, maps them all from the start, a window at a time from block 0 up (the order blocks are used in)."""

    def __init__(self, tensors: list[torch.Tensor], window: int = WINDOW_BLOCKS, everything: bool = False) -> None:
        self._regions = [(t.data_ptr(), t[0].numel() * t.element_size()) for t in tensors]  # (address, block bytes)
        self._num_blocks = tensors[0].shape[0]
        self._window = window
        self._mapped = 0  # blocks [0, _mapped) are mapped
        self._everything = everything
        self._wanted = self._num_blocks if everything else min(window, self._num_blocks)
        self._closed = False
        self._changed = threading.Condition()
        self._madvise = libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int)
        if self._madvise is not None and tensors[0].device.type == "cpu":
            threading.Thread(target=self._run, name="kv-prefault", daemon=True).start()

    def written(self, highest_block: int) -> None:
        """The engine is writing up to block `highest_block`: keep a window of blocks beyond it mapped."""
        wanted = min(self._num_blocks, highest_block + 1 + self._window)
        if wanted > self._wanted:
            with self._changed:
                self._wanted = wanted
                self._changed.notify()

    def release(self) -> bool:
        """Gives every page of the tensors back to the kernel and maps none ahead (a sleeping engine's cache: they
        read as zeros after); False where madvise is missing (nothing was given back)."""
        if self._madvise is None:
            return False
        with self._changed:
            self._mapped = self._wanted = 0
            for address, block_bytes in self._regions:
                if self._madvise(ctypes.c_void_p(address), ctypes.c_size_t(block_bytes * self._num_blocks),
                                 MADV_DONTNEED) != 0:  # fmt: skip
                    return False
        return True

    def restore(self) -> None:
        """Maps ahead again as at start (a woken engine)."""
        with self._changed:
            self._wanted = self._num_blocks if self._everything else min(self._window, self._num_blocks)
            self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._closed and self._wanted <= self._mapped:
                    self._changed.wait()
                if self._closed:
                    return
                start, end = self._mapped, min(self._wanted, self._mapped + self._window)
            if not self._populate(start, end):
                return
            self._mapped = end

    def _populate(self, start: int, end: int) -> bool:
        page = mmap.PAGESIZE
        for address, block_bytes in self._regions:
            first = (address + start * block_bytes) // page * page
            last = address + end * block_bytes
            if self._madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_POPULATE_WRITE) != 0:
                log.debug("kv_prefault_unavailable", errno=ctypes.get_errno())
                return False
        return True
