"""What a process's resident memory is made of: the weights its engines' plans hold, their KV caches (reserved, and
the part the kernel has mapped so far), a model with recurrent layers' state slots (the same two figures) and the
rest, out of VmRSS. An engine logs it when ready (`engine_ready`), a
server when it answers (`gateway_ready`), so a memory figure says where it goes:

    weights 0.13 GiB, KV cache 5.62 GiB reserved (131,072 tokens) 0.05 GiB mapped, other 0.48 GiB, RSS 0.66 GiB

Weights are the tensors the lowered plan holds as constants (`Instr.consts`, and those of a fused instruction's
fallback plan), whatever holds them (a packed linear, interleaved GGUF blocks): each storage counted once, the KV
caches left out. The cache is allocated untouched (kv_cache.py), so what it costs is what mincore(2) finds mapped."""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sagellm.common.memory import libc_function, resident_bytes
from sagellm.runtime.engine.kv_cache import KVCaches
from sagellm.runtime.engine.model_runner import ModelRunner
from sagellm.runtime.execution_graph.fuse_layers import FusedLayers
from sagellm.runtime.execution_graph.plan import Plan

GIB = 2**30


@dataclass(frozen=True)
class MemoryReport:
    weights_bytes: int
    kv_reserved_bytes: int
    kv_mapped_bytes: int
    kv_tokens: int
    rss_bytes: int
    on_host: bool = True  # the weights and caches are host memory (in RSS), not a GPU's
    # A model with recurrent layers: their state slots (state_cache.py), reserved and mapped like the KV cache's.
    state_reserved_bytes: int = 0
    state_mapped_bytes: int = 0
    state_slots: int = 0

    @property
    def other_bytes(self) -> int:
        """RSS less what the weights and the mapped cache account for: the interpreter, torch, tokenizers, buffers."""
        counted = self.weights_bytes + self.kv_mapped_bytes + self.state_mapped_bytes if self.on_host else 0
        return max(0, self.rss_bytes - counted)

    def line(self) -> str:
        kv = f"KV cache {_gib(self.kv_reserved_bytes)} reserved ({self.kv_tokens:,} tokens)"
        states = f"states {_gib(self.state_reserved_bytes)} reserved ({self.state_slots} slots)"
        if not self.on_host:
            kv += f", {states}" if self.state_slots else ""
            return f"weights {_gib(self.weights_bytes)}, {kv} in device memory; host RSS {_gib(self.rss_bytes)}"
        states = f"{states} {_gib(self.state_mapped_bytes)} mapped, " if self.state_slots else ""
        return (
            f"weights {_gib(self.weights_bytes)}, {kv} {_gib(self.kv_mapped_bytes)} mapped, {states}"
            f"other {_gib(self.other_bytes)}, RSS {_gib(self.rss_bytes)}"
        )


def memory_report(runners: Iterable[ModelRunner]) -> MemoryReport:
    """This process's memory with the weights and caches of `runners` (its engines' model runners) counted apart."""
    weights = reserved = mapped = tokens = state_reserved = state_mapped = slots = 0
    on_host = True
    for runner in runners:
        caches = [t for pair in (*runner.kv_caches, *runner.state_caches) for t in pair]
        weights += plan_weight_bytes(runner.plan, skip=caches)
        r, m = kv_cache_bytes(runner.kv_caches)
        reserved, mapped = reserved + r, mapped + m
        r, m = kv_cache_bytes(runner.state_caches)
        state_reserved, state_mapped = state_reserved + r, state_mapped + m
        tokens += max((k.shape[0] for k, _ in runner.kv_caches), default=0) * runner.block_size  # the full layers'
        slots += runner.state_caches[0][0].shape[0] if runner.state_caches else 0
        on_host &= runner.device.type == "cpu"
    rss = resident_bytes() or 0
    return MemoryReport(weights, reserved, mapped, tokens, rss, on_host, state_reserved, state_mapped, slots)


def plan_weight_bytes(plan: Plan, skip: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors `plan` holds as constants, each storage once, those sharing a storage with `skip` (the
    KV caches) left out."""
    seen = {t.untyped_storage().data_ptr() for t in skip}
    total = 0
    for tensor in _tensors(plan):
        if tensor.is_mkldnn:  # oneDNN's opaque layout has no storage to share
            key, nbytes = id(tensor), tensor.numel() * tensor.element_size()
        else:
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def kv_cache_bytes(caches: KVCaches) -> tuple[int, int]:
    """(reserved, mapped) bytes of the caches (the KV cache's, or the recurrent states'): mapped is what the kernel
    has backed with pages (a device's cache is all of it: torch.zeros wrote it)."""
    tensors = [t for pair in caches for t in pair]
    reserved = sum(t.numel() * t.element_size() for t in tensors)
    if any(t.device.type != "cpu" for t in tensors):
        return reserved, reserved
    return reserved, sum(resident_in(t.data_ptr(), t.numel() * t.element_size()) for t in tensors)


def resident_in(address: int, length: int) -> int:
    """Bytes of the pages over [address, address + length) that are mapped (mincore); `length` where the call is
    missing (not Linux), as if all were."""
    if _mincore is None or length == 0:
        return length
    page = mmap.PAGESIZE
    start = address // page * page
    pages = -(-(address + length - start) // page)
    vector = (ctypes.c_ubyte * pages)()
    if _mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vector) != 0:
        return length
    return int((np.frombuffer(vector, np.uint8) & 1).sum()) * page


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in a plan's constants: directly, in containers, in dataclasses (packed weights), and in a fused
    instruction's fallback plan (the layers' own constants, which the fused kernel shares)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Plan):
        for instr in value.instrs:
            yield from _tensors(instr.consts)
            if isinstance(instr.kernel, FusedLayers):
                yield from _tensors(instr.kernel.fallback)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        yield from _tensors(list(value.values()))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield from _tensors([getattr(value, f.name) for f in dataclasses.fields(value)])


_mincore = libc_function("mincore", (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)), ctypes.c_int)


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"
