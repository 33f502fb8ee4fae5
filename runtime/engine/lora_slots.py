"""The engine's LoRA adapters (vLLM's multi-LoRA): `max_loras` slots, each holding one adapter's A and B for every
base weight adapters may change, stacked per weight (A [S, R, in], B as [S, R, out]; rank padded with zeros to
`max_lora_rank`, B scaled). A step's rows each name a slot (-1: the base alone); the linears of the model's plan
add each row's low-rank update after the one base matmul of the whole batch (the backend's `add_lora` kernel), so
requests of different adapters and of none share every step.

An adapter takes a slot while any of its requests runs or waits; a request whose adapter finds no free slot waits
in the engine until one is released. The least recently used free slot is reloaded first; an adapter still in a
slot needs no reload. Adapters are read from their directories once (`lora_adapter.read_lora_adapter`), checked
against the engine's rank limit and the base model's weights; a name given again with another directory (an
adapter unloaded and loaded anew at run time) is read again, and its old weights stay only in the slot of the
requests that still use them."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sagellm.runtime.models.lora_adapter import LoraAdapter, check_adapter_fits, read_lora_adapter

NO_ADAPTER = -1


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's: an adapter a request is generated with, by its name, an id unique to it, and its PEFT directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str


class LoraSlots:
    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        max_loras: int,
        max_rank: int,
        add_lora: Callable[..., torch.Tensor],
        device: torch.device,
    ) -> None:
        """`shapes`: every base weight adapters may change, [out, in] by canonical name; `add_lora`: the backend's
        kernel (out, x, row_slots, A, B)."""
        self.shapes, self.max_loras, self.max_rank = dict(shapes), max_loras, max_rank
        self._add_lora, self.device = add_lora, device
        self.a = {name: torch.zeros(max_loras, max_rank, i, device=device) for name, (_, i) in self.shapes.items()}
        # B kept as [S, R, N] and handed to the kernel as its [S, N, R] view: the CPU kernel reads it as [S R, N]
        self.b_t = {name: torch.zeros(max_loras, max_rank, o, device=device) for name, (o, _) in self.shapes.items()}
        self.row_slots: torch.Tensor | None = None  # this step's: a slot per row, None when no row has an adapter
        self.adapters: dict[str, LoraAdapter] = {}  # read and checked, by name
        self._held: list[LoraAdapter | None] = [None] * max_loras  # the adapter in each slot
        self._users = [0] * max_loras  # requests of that adapter running or waiting
        self._used_at = [0] * max_loras  # when each slot was last taken (a counter): the least recent is reloaded
        self._clock = itertools.count(1)

    # -- adapters and slots -------------------------------------------------------------------------------------
    def adapter(self, request: LoRARequest) -> LoraAdapter:
        """The adapter a request names, read from its directory the first time (InvalidInput, or a FieldError on
        max_lora_rank, when the engine cannot serve it)."""
        known = self.adapters.get(request.lora_name)
        if known is not None and known.path == Path(request.lora_path).expanduser():
            return known
        adapter = read_lora_adapter(request.lora_path, request.lora_name, max_rank=self.max_rank)
        check_adapter_fits(adapter, self.shapes)
        self.adapters[request.lora_name] = adapter
        return adapter

    def acquire(self, adapter: LoraAdapter) -> int | None:
        """A slot holding `adapter` for one more request (loading it into the least recently used free slot if it
        is in none); None when every slot holds an adapter in use."""
        slot = next((i for i, held in enumerate(self._held) if held is adapter), None)
        if slot is None:
            free = [i for i in range(self.max_loras) if not self._users[i]]
            if not free:
                return None
            slot = min(free, key=lambda i: self._used_at[i])
            self._load(slot, adapter)
        self._users[slot] += 1
        self._used_at[slot] = next(self._clock)
        return slot

    def release(self, slot: int) -> None:
        if slot != NO_ADAPTER:
            self._users[slot] -= 1

    def _load(self, slot: int, adapter: LoraAdapter) -> None:
        for name, a in self.a.items():
            a[slot].zero_()
            self.b_t[name][slot].zero_()
        for name, (a, b) in adapter.weights.items():
            self.a[name][slot, : adapter.rank].copy_(a)
            self.b_t[name][slot, : adapter.rank].copy_((b * adapter.scaling).t())
        self._held[slot] = adapter

    # -- steps ------------------------------------------------------------------------------------------------------
    def begin_step(self, row_slots: list[int]) -> None:
        """This step's rows' slots ([] or all -1: the base alone, and the linears add nothing)."""
        active = any(s != NO_ADAPTER for s in row_slots)
        self.row_slots = torch.tensor(row_slots, dtype=torch.int64, device=self.device) if active else None

    def add(self, out: torch.Tensor, x: torch.Tensor, weight: str) -> None:
        """Adds this step's rows' updates of `weight` to `out` (its columns of the linear's output)."""
        if self.row_slots is not None:
            self._add_lora(out, x, self.row_slots, self.a[weight], self.b_t[weight].transpose(1, 2))
