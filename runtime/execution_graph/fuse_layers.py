"""Lowering's last step: each run of whole decoder layers in a plan becomes one instruction, when the backend has a
kernel that runs them in one call (the kernel table's optional `decoder_layers`, backends/kernel_contracts.py).

A layer is recognized by its instructions, in the order the optimized graph lowers them:
    rmsnorm | add_rmsnorm, <mixer>, add_rmsnorm, linear (gate_up), silu_mul, linear (down) | moe
with one of the mixers (MIXERS): attention (with sinks and a sliding window, per layer; its heads normed, Qwen3's),
Qwen3.5's gated attention or its Gated DeltaNet; and a dense MLP or a mixture of experts routed from the layer's own
norm (MLPS); wired as one layer, the next layer reading this one's output and residual. Tensor parallel ranks
(all_reduce between the ops), Gemma 4's experts beside a dense MLP and Qwen3.5-MoE's shared expert do not match and
keep their ops. The fused instruction keeps the original ones as its fallback: the backend's kernel declines a step
it does not take (prefill rows, too many rows) by returning None, and the original ops then run one by one. Linears
LoRA adapters change (lora_linear.LoraLinear) hand their adapters to the layer (DecoderLayer.lora), and each step
its rows' adapter slots to the kernel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from sagellm.backends.decoder_layer import (
    DECODER_LINEARS,
    AttentionShape,
    DecoderLayer,
    DecoderShape,
    DeltaNetShape,
    LoraPart,
    MoeShape,
)
from sagellm.backends.kernel_contracts import DecoderLayers, DecoderLayersKernel, KernelTable
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.execution_graph.lora_linear import LoraLinear
from sagellm.runtime.execution_graph.plan import Instr, Plan

MIXERS = {
    "attention": ("linear", "split", "rope", "attention", "linear"),
    "normed_attention": ("linear", "split", "head_rmsnorm", "head_rmsnorm", "rope", "attention", "linear"),
    "gated_attention": (
        *("linear", "split", "split_head_halves", "head_rmsnorm", "head_rmsnorm", "sigmoid", "rope", "attention"),
        *("mul", "linear"),
    ),
    "gated_delta_net": ("linear", "split", "gated_delta_net", "gated_rmsnorm", "linear"),
}
MLPS = {"dense": ("add_rmsnorm", "linear", "silu_mul", "linear"), "moe": ("add_rmsnorm", "moe")}
NORMS = ("rmsnorm", "add_rmsnorm")
# Ops of the head that topological order may place between a last layer's ops (the rows whose logits are taken);
# they move after the fused instruction when they read only what it outputs or what came before it.
MOVABLE = ("index_rows",)
STEP_INPUTS = ("hidden", "residual", "positions", "meta")  # the fused instruction's, those a run reads


@dataclass(frozen=True)
class _Layer:
    span: range  # the instructions from the layer's first to its last
    movable: list[int]  # instructions inside the span that are not the layer's
    hidden: int  # slots: the layer's input
    residual: int | None  # and the residual stream it adds to (None: its input starts the stream)
    positions: int | None  # None: a layer without rope (a Gated DeltaNet)
    meta: int
    out_hidden: int
    out_residual: int
    hidden_at: tuple[int, int]  # (instruction, output) that writes out_hidden: the down projection, or the moe
    residual_at: tuple[int, int]  # and out_residual: the post-attention norm
    weights: DecoderLayer
    shape: DecoderShape


def fuse_decoder_layers(
    plan: Plan, graph: Graph, kernels: KernelTable, lora_rows: Callable[[], torch.Tensor | None] | None = None
) -> Plan:
    """`plan` with each run of whole decoder layers as one instruction, where the backend fuses them (a model whose
    layers differ in kind, dense and mixture of experts' MLPs, makes several runs). `lora_rows()`: the step's rows'
    LoRA adapter slots (None: no row has an adapter), which the kernel is given."""
    build = kernels.get("decoder_layers")
    if build is None:
        return plan
    begin = 0
    while (fused := _fuse_run(plan, graph, build, begin, lora_rows)) is not None:
        plan, begin = fused
    return plan


def _fuse_run(
    plan: Plan, graph: Graph, build: DecoderLayers, begin: int, lora_rows: Callable[[], torch.Tensor | None] | None
) -> tuple[Plan, int] | None:
    """The plan with its first run of layers from instruction `begin` on fused (or left as it is, when the backend
    declines it) and the instruction to look on from; None when no layer starts there or after."""
    instrs = plan.instrs
    ops = [graph.nodes[instr.node].op if instr.node in graph.nodes else "" for instr in instrs]  # "": a fused run
    found = next((layer for i in range(begin, len(ops)) if (layer := _match(instrs, ops, graph, i))), None)
    if found is None:
        return None
    start, run, shape = found.span.start, [found], found.shape
    while (layer := _match(instrs, ops, graph, run[-1].span.stop)) and (joined := _continues(run, shape, layer)):
        run.append(layer)
        shape = joined
    first, last = run[0], run[-1]
    moved = {j for layer in run for j in layer.movable}
    # The run's outputs go to two fresh slots: its last residual's slot may be reused inside the run (by its last
    # hidden) once the instructions that now move after it had read it.
    outputs = (plan.num_slots, plan.num_slots + 1)
    rest = _after_run(plan, start, last, moved, outputs)
    kernel = None if rest is None else build([layer.weights for layer in run], shape)
    if rest is None or kernel is None:
        return plan, last.span.stop
    own = _own(instrs, range(start, last.span.stop), moved, last, outputs)
    positions = next((layer.positions for layer in run if layer.positions is not None), None)
    step = dict(zip(STEP_INPUTS, (first.hidden, first.residual, positions, first.meta)))
    step = {name: slot for name, slot in step.items() if slot is not None}
    out_slots = {"hidden": outputs[0], "residual": outputs[1]}
    fallback = Plan(own, plan.num_slots + 2, {str(slot): slot for slot in step.values()}, out_slots)
    fused = Instr(FusedLayers(kernel, fallback, tuple(step), lora_rows), tuple(step.values()), (), outputs, _name(own))
    output_slots, later = rest
    return Plan([*instrs[:start], fused, *later], plan.num_slots + 2, plan.input_slots, output_slots), start + 1


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


def _continues(run: list[_Layer], shape: DecoderShape, layer: _Layer) -> DecoderShape | None:
    """The shape of `run` with `layer` after it, when `layer` reads the run's output and residual, with the same
    step inputs, and its shape agrees with the run's; else None."""
    before = run[-1]
    positions = {p for p in (layer.positions, *(r.positions for r in run)) if p is not None}
    wired = (layer.hidden, layer.residual, layer.meta) == (before.out_hidden, before.out_residual, before.meta)
    return shape.joined(layer.shape) if wired and len(positions) <= 1 else None


class FusedLayers:
    """The fused instruction's kernel: the backend's one call, or the layers' own instructions for the steps it
    declines. `inputs`: which of STEP_INPUTS the instruction passes, in that order; `lora_rows()`: the step's rows'
    adapter slots, passed on to the kernel."""

    def __init__(
        self,
        kernel: DecoderLayersKernel,
        fallback: Plan,
        inputs: tuple[str, ...],
        lora_rows: Callable[[], torch.Tensor | None] | None = None,
    ) -> None:
        self.kernel = kernel
        self.fallback = fallback
        self.inputs = inputs
        self.lora_rows = lora_rows

    def __call__(self, *args: Any) -> tuple[Any, Any]:
        given = dict(zip(self.inputs, args))
        rows = self.lora_rows() if self.lora_rows is not None else None
        out = self.kernel(*(given.get(name) for name in STEP_INPUTS), rows)
        if out is not None:
            return out
        result = self.fallback.run(**dict(zip(self.fallback.input_slots, args)))
        return result["hidden"], result["residual"]


def _match(instrs: list[Instr], ops: list[str], graph: Graph, i: int) -> _Layer | None:
    """The layer whose first instruction is instrs[i], if the instructions after it other than MOVABLE ones are one
    (a mixer of MIXERS and an MLP of MLPS, wired as one layer)."""
    if i >= len(ops) or ops[i] not in NORMS:  # past the plan's end: a pipeline stage ends with its last layer
        return None
    for kind, mixer in MIXERS.items():
        for mlp_kind, mlp in MLPS.items():
            at = [i]  # the layer's instructions
            j = i + 1
            while len(at) < 1 + len(mixer) + len(mlp) and j < len(ops):
                if ops[j] not in MOVABLE:
                    at.append(j)
                j += 1
            if tuple(ops[k] for k in at[1:]) == (*mixer, *mlp):
                return _layer(kind, mlp_kind, instrs, ops, graph, at)
    return None


def _layer(kind: str, mlp_kind: str, instrs: list[Instr], ops: list[str], graph: Graph, at: list[int]) -> _Layer | None:
    """The layer of mixer `kind` and MLP `mlp_kind` at instructions `at` (its ops in the order MIXERS and MLPS list
    them), if they are wired as one and of shapes the kernels take."""
    mlp = len(MLPS[mlp_kind])
    norm, *mixer = (instrs[k] for k in at[: len(at) - mlp])
    post, *rest = (instrs[k] for k in at[len(at) - mlp :])
    x = norm.outputs[0]
    residual = norm.inputs[0] if ops[at[0]] == "rmsnorm" else norm.outputs[1]
    mixed = _MIXER_MATCHERS[kind](mixer, x)
    if mixed is None:
        return None
    (input_norm, eps), (post_norm, post_eps) = norm.consts, post.consts
    mlp_fields = _MLP_MATCHERS[mlp_kind](rest, post, graph)
    wired = post.inputs == (mixed.out, residual) and mlp_fields is not None
    if not wired or post_eps != eps or mixed.eps not in (None, eps):
        return None
    fields, intermediate_size, moe = mlp_fields
    shape = DecoderShape(input_norm.shape[0], intermediate_size, eps, mixed.attention, mixed.delta_net, moe)
    kind = "attention" if kind == "normed_attention" else kind  # its norms are the layer's q_norm and k_norm
    lora = _lora_parts([instrs[k] for k in at if ops[k] == "linear"])
    layer = DecoderLayer(input_norm=input_norm, post_norm=post_norm, kind=kind, **fields, **mixed.weights, lora=lora)
    span = range(at[0], at[-1] + 1)
    return _Layer(
        span,
        [j for j in span if j not in at],
        hidden=norm.inputs[0],
        residual=norm.inputs[1] if ops[at[0]] == "add_rmsnorm" else None,
        positions=mixed.positions,
        meta=mixed.meta,
        out_hidden=instrs[at[-1]].outputs[0],
        out_residual=post.outputs[1],
        hidden_at=(at[-1], 0),
        residual_at=(at[-mlp], 1),
        weights=layer,
        shape=shape,
    )


def _lora_parts(linears: list[Instr]) -> dict[str, tuple[LoraPart, ...]]:
    """The adapters' parts of a layer's linears (its mixer's input and output projections, then a dense MLP's
    gate_up and down, in DecoderLayer's order) that LoRA adapters change."""
    return {name: i.kernel.parts for name, i in zip(DECODER_LINEARS, linears) if isinstance(i.kernel, LoraLinear)}


def _dense_mlp(ops: list[Instr], post: Instr, graph: Graph) -> tuple[dict[str, Any], int, None] | None:
    """gate_up, silu_mul, down after the post-attention norm: their DecoderLayer fields and the MLP's width."""
    gate_up, silu_mul, down = ops
    wired = gate_up.inputs == (post.outputs[0],) and silu_mul.inputs == gate_up.outputs
    if not (wired and down.inputs == silu_mul.outputs):
        return None
    fields = dict(zip(("gate_up", "gate_up_bias", "down", "down_bias"), (*gate_up.consts, *down.consts)))
    return fields, graph.nodes[gate_up.node].params["out_features"] // 2, None


def _moe_mlp(ops: list[Instr], post: Instr, graph: Graph) -> tuple[dict[str, Any], int, MoeShape] | None:
    """A mixture of experts reading the post-attention norm: its DecoderLayer fields, its experts' width and how it
    routes; None for one routed from another input (Gemma 4) or with float experts (stacked tensors)."""
    (moe,) = ops
    params = graph.nodes[moe.node].params
    if moe.inputs != (post.outputs[0],) or params.get("expert_scale"):
        return None
    (spec,) = moe.consts
    gate_up, down = spec.gate_up, spec.down
    if not (isinstance(gate_up, list) and isinstance(down, list)) or not gate_up:
        return None
    routing = (spec.router.shape[0], spec.top_k, spec.first_expert, len(gate_up), bool(spec.normalize))
    shape = MoeShape(*routing, spec.activation, spec.alpha, spec.limit)
    fields = dict(gate_up=gate_up, gate_up_bias=spec.gate_up_bias, down=down, down_bias=spec.down_bias)
    return fields | {"router": spec.router, "router_bias": spec.router_bias}, params["intermediate_size"], shape


@dataclass(frozen=True)
class _Mixer:
    """A matched mixer: the slots of its output, of the positions (None: no rope) and of the step's metadata; the
    DecoderLayer fields it binds; the eps of its own norms (None: none; else it must be the layer's); its shape."""

    out: int
    positions: int | None
    meta: int
    weights: dict[str, Any]
    eps: float | None = None
    attention: AttentionShape | None = None
    delta_net: DeltaNetShape | None = None


def _attention(mixer: list[Instr], x: int) -> _Mixer | None:
    """Attention, or with each head's query and key normed before rope (`normed_attention`: Qwen3)."""
    qkv, split, *norms, rope, attention, o_proj = mixer
    q, k, v = split.outputs
    own: dict[str, Any] = {}
    eps = None
    if norms:
        pair = _head_norms(*norms, q, k)
        if pair is None:
            return None
        (q_weight, eps), (k_weight, k_eps) = pair[0].consts, pair[1].consts
        if eps != k_eps:
            return None
        q, k, own = pair[0].outputs[0], pair[1].outputs[0], {"q_norm": q_weight, "k_norm": k_weight}
    wired = (
        qkv.inputs == (x,)
        and split.inputs == qkv.outputs
        and rope.inputs[:2] == (q, k)
        and attention.inputs[:3] == (*rope.outputs, v)
        and o_proj.inputs == attention.outputs
    )
    if not wired:
        return None
    q_size, kv_size, v_size = split.consts[0]
    shape = _attention_shape(attention, rope, q_size, kv_size)
    if shape is None or kv_size != v_size:
        return None
    weights = _projections(qkv, o_proj) | _caches(attention) | own
    return _Mixer(o_proj.outputs[0], rope.inputs[2], attention.inputs[3], weights, eps, attention=shape)


def _head_norms(norm_a: Instr, norm_b: Instr, q: int, k: int) -> tuple[Instr, Instr] | None:
    """The two per-head norms as (q's, k's), when they read q and k."""
    norms = {norm_a.inputs: norm_a, norm_b.inputs: norm_b}
    return (norms[(q,)], norms[(k,)]) if set(norms) == {(q,), (k,)} else None


def _gated_attention(mixer: list[Instr], x: int) -> _Mixer | None:
    qkv, split, halves, norm_a, norm_b, sigmoid, rope, attention, mul, o_proj = mixer
    both, k, v = split.outputs
    q, gate = halves.outputs
    norms = _head_norms(norm_a, norm_b, q, k)
    if norms is None:
        return None
    q_norm, k_norm = norms
    wired = (
        qkv.inputs == (x,)
        and split.inputs == qkv.outputs
        and halves.inputs == (both,)
        and sigmoid.inputs == (gate,)
        and rope.inputs[:2] == (q_norm.outputs[0], k_norm.outputs[0])
        and attention.inputs[:3] == (*rope.outputs, v)
        and set(mul.inputs) == {attention.outputs[0], sigmoid.outputs[0]}
        and o_proj.inputs == mul.outputs
    )
    if not wired:
        return None
    both_size, kv_size, v_size = split.consts[0]
    shape = _attention_shape(attention, rope, both_size // 2, kv_size)
    (q_weight, q_eps), (k_weight, k_eps) = q_norm.consts, k_norm.consts
    if shape is None or halves.consts != (shape.head_dim,) or q_eps != k_eps or kv_size != v_size:
        return None
    weights = _projections(qkv, o_proj) | _caches(attention) | {"q_norm": q_weight, "k_norm": k_weight}
    return _Mixer(o_proj.outputs[0], rope.inputs[2], attention.inputs[3], weights, q_eps, attention=shape)


def _attention_shape(attention: Instr, rope: Instr, q_size: int, kv_size: int) -> AttentionShape | None:
    """The attention's shape, for queries and keys `q_size` and `kv_size` wide; None for widths that are not whole
    heads of the cache's."""
    cache, spec = attention.consts
    (cos_sin,) = rope.consts
    _, _, kv_heads, head_dim = cache.k.shape
    if q_size % head_dim or kv_size != kv_heads * head_dim:
        return None
    return AttentionShape(q_size // head_dim, kv_heads, head_dim, spec.scale, cos_sin, spec.softcap)


def _projections(into: Instr, out: Instr) -> dict[str, Any]:
    """The mixer's input and output projections (weight, bias) as DecoderLayer's qkv and o_proj fields."""
    return dict(zip(("qkv", "qkv_bias", "o_proj", "o_bias"), (*into.consts, *out.consts)))


def _caches(attention: Instr) -> dict[str, Any]:
    """The layer's own attention constants: its caches, sliding window and sinks."""
    cache, spec = attention.consts
    return {"k_cache": cache.k, "v_cache": cache.v, "window": spec.window, "sinks": spec.sinks}


def _gated_delta_net(mixer: list[Instr], x: int) -> _Mixer | None:
    in_proj, split, delta, norm, out_proj = mixer
    qkv, z, b, a = split.outputs
    wired = (
        in_proj.inputs == (x,)
        and split.inputs == in_proj.outputs
        and delta.inputs[:3] == (qkv, b, a)
        and norm.inputs == (delta.outputs[0], z)
        and out_proj.inputs == norm.outputs
    )
    if not wired:
        return None
    (spec,) = delta.consts
    out_norm, eps = norm.consts
    shape = DeltaNetShape(
        spec.num_k_heads,
        spec.head_k_dim,
        spec.a_log.shape[0],
        spec.head_v_dim,
        spec.conv_weight.shape[1],
        spec.tiled_value_heads,
    )
    weights = _projections(in_proj, out_proj)
    weights |= dict(conv_states=spec.states.conv, ssm_states=spec.states.ssm, conv_weight=spec.conv_weight)
    weights |= dict(a_log=spec.a_log, dt_bias=spec.dt_bias, out_norm=out_norm)
    return _Mixer(out_proj.outputs[0], None, delta.inputs[3], weights, eps, delta_net=shape)


_MLP_MATCHERS = {"dense": _dense_mlp, "moe": _moe_mlp}
_MIXER_MATCHERS = {
    "attention": _attention,
    "normed_attention": _attention,
    "gated_attention": _gated_attention,
    "gated_delta_net": _gated_delta_net,
}
