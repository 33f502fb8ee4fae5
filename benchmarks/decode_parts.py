"""Where a single-stream decode step's time goes: the roofline's answer to "what holds decode back", measured in the
engine as it runs rather than inferred from the kernels alone.

Every instruction of the model's plan is timed by kind while `LLM.generate` decodes (the embedding lookup, the
vocabulary projection, and the decoder layers: their one native call where the plan fused them, else their
instructions, with the final norm and the rows picked for sampling, a few µs), and the engine's whole step around
them; what the step spends outside the plan is the engine's own Python (scheduling, the step's input tensors,
sampling, detokenizing and outputs). Each part is the median over the decode steps (the prompt's step left out).
The perf_counter calls add ~1 µs an instruction, about 15 a step: nothing against milliseconds."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

PARTS = ("decoder layers", "vocabulary projection", "embedding", "engine outside the model")


def decode_parts(llm: Any, run: Callable[[], Any]) -> dict[str, float]:
    """Milliseconds a decode step spends in each of PARTS (and "step", their whole), the medians of the steps of
    `run()` (a single-stream greedy generate on `llm`). The plan and the engine are restored after."""
    engine, plan = llm.engine, llm.engine.runner.plan
    logits_slot = plan.output_slots.get("logits")
    current: dict[str, float] = {}

    def part_of(instr: Any) -> str:
        if logits_slot in instr.outputs:
            return "vocabulary projection"
        return "embedding" if instr.node.startswith("embedding") else "decoder layers"

    def timed(part: str, kernel: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return kernel(*args)
            finally:
                current[part] = current.get(part, 0.0) + time.perf_counter() - start

        return call

    steps: list[dict[str, float]] = []
    step = engine.step

    def timed_step() -> Any:
        current.clear()
        start = time.perf_counter()
        outputs = step()
        if current:  # a step that ran the model
            steps.append({**current, "step": time.perf_counter() - start})
        return outputs

    instrs = plan.instrs
    plan.instrs = [dataclasses.replace(i, kernel=timed(part_of(i), i.kernel)) for i in instrs]
    engine.step = timed_step
    try:
        run()
    finally:
        plan.instrs = instrs
        engine.step = step
    decodes = steps[1:]  # the first ran the prompt
    if not decodes:
        return {}
    for s in decodes:
        s["engine outside the model"] = s["step"] - sum(s.get(p, 0.0) for p in PARTS[:-1])
    return {p: statistics.median(s.get(p, 0.0) for s in decodes) * 1e3 for p in (*PARTS, "step")}
