"""A lowered model: a flat list of instructions `(kernel, input slots, constants, output slots)` run in order over a
slot table, so the whole forward is one loop of plain calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Instr:
    kernel: Callable[..., Any]
    inputs: tuple[int, ...]
    consts: tuple[Any, ...]
    outputs: tuple[int, ...]
    node: str  # for error messages and profiling


@dataclass
class Plan:
    instrs: list[Instr]
    num_slots: int
    input_slots: dict[str, int]
    output_slots: dict[str, int]

    def run(self, **inputs: Any) -> dict[str, Any]:
        env: list[Any] = [None] * self.num_slots
        for name, slot in self.input_slots.items():
            env[slot] = inputs[name]
        for instr in self.instrs:
            result = instr.kernel(*[env[i] for i in instr.inputs], *instr.consts)
            if len(instr.outputs) == 1:
                env[instr.outputs[0]] = result
            else:
                for slot, value in zip(instr.outputs, result):
                    env[slot] = value
        return {name: env[slot] for name, slot in self.output_slots.items()}
