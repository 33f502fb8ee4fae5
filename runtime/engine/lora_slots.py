"""The engine's LoRA adapters (vLLM's multi-LoRA): `max_loras` slots, each holding one adapter's weights on every
rank (`lora_weights.LoraWeights`, which a slot's load fills). A step's rows each name a slot (-1: the base alone); the
linears of the model's plan add each row's low-rank update after the one base matmul of the whole batch, so requests
of different adapters and of none share every step.

An adapter takes a slot while any of its requests runs; a request whose adapter finds no free slot waits in the
scheduler's line until one is released (`admission_gates.LoraSlotGate`). The least recently used free slot is reloaded
first; an adapter still in a slot needs no reload. Adapters are read from their directories once
(`lora_adapter.read_lora_adapter`), checked against the engine's rank limit and the base model's weights; a name given
again with another directory (an adapter unloaded and loaded anew at run time) is read again, and its old weights stay
only in the slot of the requests that still use them. Each adapter's digest (`lora_digest`) is computed once, as it
is read: its requests' prefix blocks are hashed under it."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from pathlib import Path

from sagellm.runtime.engine.lora_digest import adapter_digest
from sagellm.runtime.engine.lora_request import LoRARequest
from sagellm.runtime.engine.lora_weights import NO_ADAPTER
from sagellm.runtime.models.lora_adapter import LoraAdapter, check_adapter_fits, read_lora_adapter


class LoraSlots:
    def __init__(self, shapes: Mapping[str, tuple[int, int]], max_loras: int, max_rank: int) -> None:
        """`shapes`: every base weight adapters may change, [out, in] by canonical name (what an adapter is checked
        against). `load(slot, adapter)` fills a slot on every rank: the runner's, set once it runs."""
        self.shapes, self.max_loras, self.max_rank = dict(shapes), max_loras, max_rank
        self.load: Callable[[int, LoraAdapter], None] | None = None
        self.adapters: dict[str, LoraAdapter] = {}  # read and checked, by name
        self._digests: dict[LoraAdapter, str] = {}  # those adapters' digests (an adapter hashes as itself)
        self._held: list[LoraAdapter | None] = [None] * max_loras  # the adapter in each slot
        self._users = [0] * max_loras  # requests of that adapter running
        self._used_at = [0] * max_loras  # when each slot was last taken (a counter): the least recent is reloaded
        self._clock = itertools.count(1)

    def adapter(self, request: LoRARequest) -> LoraAdapter:
        """The adapter a request names, read from its directory the first time (InvalidInput, or a FieldError on
        max_lora_rank, when the engine cannot serve it)."""
        known = self.adapters.get(request.lora_name)
        if known is not None and known.path == Path(request.lora_path).expanduser():
            return known
        adapter = read_lora_adapter(request.lora_path, request.lora_name, max_rank=self.max_rank)
        check_adapter_fits(adapter, self.shapes)
        if known is not None:
            del self._digests[known]
        self.adapters[request.lora_name] = adapter
        self._digests[adapter] = adapter_digest(adapter)
        return adapter

    def digest(self, adapter: LoraAdapter) -> str:
        """The digest of an adapter `adapter()` returned, which its requests' prefix blocks are hashed under: the one
        computed as it was read (computed again for one since replaced under its name)."""
        known = self._digests.get(adapter)
        return known if known is not None else adapter_digest(adapter)

    def can_acquire(self, adapter: LoraAdapter) -> bool:
        """Whether `acquire` would find `adapter` a slot now."""
        return any(held is adapter for held in self._held) or not all(self._users)

    def acquire(self, adapter: LoraAdapter) -> int | None:
        """A slot holding `adapter` for one more request (loading it into the least recently used free slot if it
        is in none); None when every slot holds an adapter in use."""
        slot = next((i for i, held in enumerate(self._held) if held is adapter), None)
        if slot is None:
            free = [i for i in range(self.max_loras) if not self._users[i]]
            if not free:
                return None
            slot = min(free, key=lambda i: self._used_at[i])
            assert self.load is not None, "the runner loads the slots"
            self.load(slot, adapter)
            self._held[slot] = adapter
        self._users[slot] += 1
        self._used_at[slot] = next(self._clock)
        return slot

    def release(self, slot: int) -> None:
        if slot != NO_ADAPTER:
            self._users[slot] -= 1
