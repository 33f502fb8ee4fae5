"""Lowering's last step: a run of whole decoder layers in a plan becomes one instruction, when the backend has a
kernel that runs them in one call (the kernel table's optional `decoder_layers`, backends/base.py).

A layer is recognized by its instructions, in the order the optimized graph lowers them:
    rmsnorm | add_rmsnorm, linear (qkv), split, rope, attention, linear (o), add_rmsnorm, linear (gate_up), silu_mul,
    linear (down)
wired as one layer, the next layer reading this one's output and residual. Tensor parallel ranks (all_reduce between
the ops) and mixtures of experts do not match and keep their ops. The fused instruction keeps the original ones as
its fallback: the backend's kernel declines a step it does not take (prefill rows, too many rows) by returning None,
and the original ops then run one by one."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sagellm.backends.base import DecoderLayer, DecoderLayersKernel, DecoderShape, KernelTable
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.execution_graph.plan import Instr, Plan

LAYER_OPS = ("linear", "split", "rope", "attention", "linear", "add_rmsnorm", "linear", "silu_mul", "linear")
NORMS = ("rmsnorm", "add_rmsnorm")
# Ops of the head that topological order may place between a last layer's ops (the rows whose logits are taken);
# they move after the fused instruction when they read only what it outputs or what came before it.
MOVABLE = ("index_rows",)


@dataclass(frozen=True)
class _Layer:
    span: range  # the instructions from the layer's first to its last
    movable: list[int]  # instructions inside the span that are not the layer's
    hidden: int  # slots: the layer's input
    residual: int | None  # and the residual stream it adds to (None: its input starts the stream)
    positions: int
    meta: int
    out_hidden: int
    out_residual: int
    hidden_at: tuple[int, int]  # (instruction, output) that writes out_hidden: the down projection
    residual_at: tuple[int, int]  # and out_residual: the post-attention norm
    weights: DecoderLayer
    shape: DecoderShape


def fuse_decoder_layers(plan: Plan, graph: Graph, kernels: KernelTable) -> Plan:
    """`plan` with its first run of whole decoder layers as one instruction, if the backend fuses them."""
    build = kernels.get("decoder_layers")
    if build is None:
        return plan
    instrs = plan.instrs
    ops = [graph.nodes[instr.node].op for instr in instrs]
    found = next((layer for i in range(len(ops)) if (layer := _match(instrs, ops, graph, i))), None)
    if found is None:
        return plan
    start, run = found.span.start, [found]
    while (layer := _match(instrs, ops, graph, run[-1].span.stop)) and _continues(run[-1], layer):
        run.append(layer)
    first, last = run[0], run[-1]
    moved = {j for layer in run for j in layer.movable}
    # The run's outputs go to two fresh slots: its last residual's slot may be reused inside the run (by its last
    # hidden) once the instructions that now move after it had read it.
    outputs = (plan.num_slots, plan.num_slots + 1)
    rest = _after_run(plan, start, last, moved, outputs)
    if rest is None:
        return plan
    kernel = build([layer.weights for layer in run], first.shape)
    if kernel is None:
        return plan
    own = _own(instrs, range(start, last.span.stop), moved, last, outputs)
    inputs = tuple(slot for slot in (first.hidden, first.residual, first.positions, first.meta) if slot is not None)
    out_slots = {"hidden": outputs[0], "residual": outputs[1]}
    fallback = Plan(own, plan.num_slots + 2, {str(slot): slot for slot in inputs}, out_slots)
    fused = Instr(FusedLayers(kernel, fallback, first.residual is not None), inputs, (), outputs, _name(own))
    output_slots, later = rest
    return Plan([*instrs[:start], fused, *later], plan.num_slots + 2, plan.input_slots, output_slots)


def _own(instrs: list[Instr], span: range, moved: set[int], last: _Layer, outputs: tuple[int, int]) -> list[Instr]:
    """The run's own instructions, its last hidden and residual written to `outputs` (and read from there)."""
    own: list[Instr] = []
    renamed: dict[int, int] = {}  # slot -> the fresh slot now holding its value
    for j in (j for j in span if j not in moved):
        instr = instrs[j]
        inputs = tuple(renamed.get(slot, slot) for slot in instr.inputs)
        writes = list(instr.outputs)
        for port, slot in enumerate(instr.outputs):
            renamed.pop(slot, None)
            for at, fresh in zip((last.hidden_at, last.residual_at), outputs):
                if (j, port) == at:
                    writes[port], renamed[slot] = fresh, fresh
        own.append(replace(instr, inputs=inputs, outputs=tuple(writes)))
    return own


def _after_run(
    plan: Plan, start: int, last: _Layer, moved: set[int], outputs: tuple[int, int]
) -> tuple[dict[str, int], list[Instr]] | None:
    """The instructions that follow the fused one (those moved out of the run, then the rest) and the plan's output
    slots, reading the run's hidden and residual from `outputs`; None when any of them reads a value from inside the
    run or the run reads what a moved one writes."""
    holds: dict[int, str | None] = {}  # slot -> "hidden", "residual" or None (another value) last written by the run
    from_moved: set[int] = set()  # slots a moved instruction wrote
    fresh = {"hidden": outputs[0], "residual": outputs[1]}
    later: list[Instr] = []
    for j in range(start, len(plan.instrs)):
        instr = plan.instrs[j]
        if j < last.span.stop and j not in moved:  # the run's own
            if from_moved & set(instr.inputs):
                return None
            for port, slot in enumerate(instr.outputs):
                holds[slot] = (
                    "hidden" if (j, port) == last.hidden_at else "residual" if (j, port) == last.residual_at else None
                )
            continue
        if any(slot in holds and holds[slot] is None for slot in instr.inputs):
            return None
        later.append(replace(instr, inputs=tuple(fresh[holds[s]] if holds.get(s) else s for s in instr.inputs)))
        for slot in instr.outputs:
            holds.pop(slot, None)
            if j in moved:
                from_moved.add(slot)
    if any(slot in holds and holds[slot] is None for slot in plan.output_slots.values()):
        return None
    output_slots = {name: fresh[holds[s]] if holds.get(s) else s for name, s in plan.output_slots.items()}
    return output_slots, later


def _name(own: list[Instr]) -> str:
    return f"{own[0].node}..{own[-1].node}"


def _continues(before: _Layer, layer: _Layer) -> bool:
    """`layer` reads `before`'s output and residual, with the same step inputs and shape."""
    return (layer.hidden, layer.residual, layer.positions, layer.meta) == (
        before.out_hidden,
        before.out_residual,
        before.positions,
        before.meta,
    ) and layer.shape.key() == before.shape.key()


class FusedLayers:
    """The fused instruction's kernel: the backend's one call, or the layers' own instructions for the steps it
    declines."""

    def __init__(self, kernel: DecoderLayersKernel, fallback: Plan, has_residual: bool) -> None:
        self.kernel = kernel
        self.fallback = fallback
        self.has_residual = has_residual

    def __call__(self, *args: Any) -> tuple[Any, Any]:
        hidden, residual, positions, meta = args if self.has_residual else (args[0], None, *args[1:])
        out = self.kernel(hidden, residual, positions, meta)
        if out is not None:
            return out
        result = self.fallback.run(**dict(zip(self.fallback.input_slots, args)))
        return result["hidden"], result["residual"]


def _match(instrs: list[Instr], ops: list[str], graph: Graph, i: int) -> _Layer | None:
    """The layer whose first instruction is instrs[i], if the next ten instructions other than MOVABLE ones are one
    (wired as one layer)."""
    if i >= len(ops) or ops[i] not in NORMS:  # past the plan's end: a pipeline stage ends with its last layer
        return None
    at = [i]  # the layer's instructions
    j = i + 1
    while len(at) < 10 and j < len(ops):
        if ops[j] not in MOVABLE:
            at.append(j)
        j += 1
    if tuple(ops[k] for k in at[1:]) != LAYER_OPS:
        return None
    span = range(i, at[-1] + 1)
    norm, qkv, split, rope, attention, o_proj, post, gate_up, silu_mul, down = (instrs[k] for k in at)
    x = norm.outputs[0]
    residual = norm.inputs[0] if ops[i] == "rmsnorm" else norm.outputs[1]
    q, k, v = split.outputs
    wired = (
        qkv.inputs == (x,)
        and split.inputs == qkv.outputs
        and rope.inputs[:2] == (q, k)
        and attention.inputs[:3] == (*rope.outputs, v)
        and o_proj.inputs == attention.outputs
        and post.inputs == (o_proj.outputs[0], residual)
        and gate_up.inputs == (post.outputs[0],)
        and silu_mul.inputs == gate_up.outputs
        and down.inputs == silu_mul.outputs
    )
    if not wired:
        return None
    (input_norm, eps), (post_norm, post_eps) = norm.consts, post.consts
    k_cache, v_cache, scale, window, softcap, sinks = attention.consts
    if sinks is not None:  # attention sinks: not in the fused kernels, the ops run one by one
        return None
    (cos_sin,) = rope.consts
    q_size, kv_size, v_size = split.consts[0]
    head_dim = k_cache.shape[-1]
    gate_up_weight, gate_up_bias = gate_up.consts
    if eps != post_eps or kv_size != v_size or q_size % head_dim or kv_size % head_dim:
        return None
    if cos_sin.shape[-1] != head_dim:  # partial rotary: not (yet) in the fused kernels, the ops run one by one
        return None
    shape = DecoderShape(
        hidden_size=input_norm.shape[0],
        num_heads=q_size // head_dim,
        num_kv_heads=kv_size // head_dim,
        head_dim=head_dim,
        intermediate_size=graph.nodes[gate_up.node].params["out_features"] // 2,
        eps=eps,
        scale=scale,
        cos_sin=cos_sin,
        window=window,
        softcap=softcap,
    )
    weights = DecoderLayer(
        input_norm, *qkv.consts, *o_proj.consts, post_norm, gate_up_weight, gate_up_bias, *down.consts, k_cache, v_cache
    )
    return _Layer(
        span,
        [j for j in range(i, span.stop) if j not in at],
        hidden=norm.inputs[0],
        residual=norm.inputs[1] if ops[i] == "add_rmsnorm" else None,
        positions=rope.inputs[2],
        meta=attention.inputs[3],
        out_hidden=down.outputs[0],
        out_residual=post.outputs[1],
        hidden_at=(at[9], 0),
        residual_at=(at[6], 1),
        weights=weights,
        shape=shape,
    )
