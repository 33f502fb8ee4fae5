"""One rank's LoRA adapter weights: every slot's A and B for each base weight adapters may change that this rank's
graph computes, stacked per weight (A [S, R, in], B as [S, R, out]; rank padded with zeros to `max_rank`, B
scaled), and each step's rows' slots. The linears of the rank's plan add each row's low-rank update after the one
base matmul of the whole batch (`add`, the backend's `add_lora` kernel).

A weight's tensors are made when lowering binds its linear (`bind`), cut to the rank's slice of it: a
column-parallel weight (its output features cut) keeps the rows of B for its outputs and the whole of A; a
row-parallel one (its input features cut) keeps the columns of A for its inputs and the whole of B, its partial
update summed over the ranks by the all-reduce that sums the base matmul's parts. A pipeline stage binds only its
own layers' weights, so it holds only theirs. Which adapter a slot holds is the engine's to decide (`lora_slots`):
it tells every rank to `load` one."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from sagellm.runtime.execution_graph.lowering import take_runs
from sagellm.runtime.models.lora_adapter import is_lora_target

NO_ADAPTER = -1


class LoraWeights:
    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        max_loras: int,
        max_rank: int,
        add_lora: Callable[..., torch.Tensor],
        device: torch.device,
    ) -> None:
        """`shapes`: every base weight adapters may change, whole [out, in], by canonical name; `add_lora`: the
        backend's kernel (out, x, row_slots, A, B)."""
        self.whole, self.max_loras, self.max_rank = dict(shapes), max_loras, max_rank
        self._add_lora, self.device = add_lora, device
        self.shapes: dict[str, tuple[int, int]] = {}  # the weights bound, this rank's [out, in] of each
        self.cuts: dict[str, tuple[int, list[tuple[int, int]]] | None] = {}  # their slices: (dim, runs), or whole
        self.a: dict[str, torch.Tensor] = {}
        # B kept as [S, R, N] and handed to the kernel as its [S, N, R] view: the CPU kernel reads it as [S R, N]
        self.b_t: dict[str, torch.Tensor] = {}
        self.row_slots: torch.Tensor | None = None  # this step's: a slot per row, None when no row has an adapter

    def bind(self, name: str, cut: tuple[int, list[tuple[int, int]]] | None) -> None:
        """Makes the slots of `name` for the linear lowering binds, `cut` to this rank's runs of its output (dim 0)
        or input (dim 1) features (once: a weight bound again keeps them)."""
        if name in self.shapes:
            return
        out, into = self.whole[name]
        if cut is not None:
            width = sum(stop - start for start, stop in cut[1])
            out, into = (width, into) if cut[0] == 0 else (out, width)
        self.shapes[name], self.cuts[name] = (out, into), cut
        self.a[name] = torch.zeros(self.max_loras, self.max_rank, into, device=self.device)
        self.b_t[name] = torch.zeros(self.max_loras, self.max_rank, out, device=self.device)

    def load(
        self, slot: int, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], rank: int, scaling: float
    ) -> None:
        """Puts an adapter in `slot`: its A and scaled B of each weight bound here (`factors`, A [rank, in] and
        B [out, rank] by canonical name, as `LoraAdapter.weights`), this rank's slice of them."""
        for name, a in self.a.items():
            a[slot].zero_()
            self.b_t[name][slot].zero_()
            if name not in factors:
                continue
            lora_a, lora_b = factors[name]
            cut = self.cuts[name]
            if cut is not None and cut[0] == 0:
                lora_b = take_runs(lora_b, 0, cut[1])
            elif cut is not None:
                lora_a = take_runs(lora_a, 1, cut[1])
            a[slot, :rank].copy_(lora_a)
            self.b_t[name][slot, :rank].copy_((lora_b * scaling).t())

    def begin_step(self, row_slots: list[int]) -> None:
        """This step's rows' slots ([] or all -1: the base alone, and the linears add nothing)."""
        active = any(s != NO_ADAPTER for s in row_slots)
        self.row_slots = torch.tensor(row_slots, dtype=torch.int64, device=self.device) if active else None

    def add(self, out: torch.Tensor, x: torch.Tensor, weight: str) -> None:
        """Adds this step's rows' updates of `weight` to `out` (its columns of the linear's output)."""
        if self.row_slots is not None:
            self._add_lora(out, x, self.row_slots, self.a[weight], self.b_t[weight].transpose(1, 2))


def adapted_shapes(weights: Any, quantized: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Every base weight LoRA adapters may change, [out, in] by canonical name: of the dense weights (a mapping, or
    a loader's store that says its `shapes()` without reading them) and of the GGUF blocks kept."""
    dense = weights.shapes() if hasattr(weights, "shapes") else {n: tuple(t.shape) for n, t in weights.items()}
    shapes = {n: (int(s[0]), int(s[1])) for n, s in dense.items() if is_lora_target(n)}
    shapes |= {n: (q.out_features, q.in_features) for n, q in quantized.items() if is_lora_target(n)}
    return shapes
