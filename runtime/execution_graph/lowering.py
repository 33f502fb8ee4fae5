"""Lowering: binds an optimized model graph to a backend's kernel table and weights, giving a flat `Plan`.

A plan is a list of instructions `(kernel, input slots, constants, output slots)` run in order over a slot table;
the whole forward is one loop of plain calls, readable in one screen and cheap per op. Weights of fused linears are
concatenated and packed once here, so the hot path never touches a weight name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sagellm.backends.base import HardwareBackend
from sagellm.backends.quantized import QuantizedWeight
from sagellm.runtime.execution_graph.graph import Graph, GraphError, Value
from sagellm.runtime.execution_graph.passes import plan_buffers


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


@dataclass
class LoweringContext:
    """What binding needs besides the graph: weights by canonical name, the KV caches, the rotary table."""

    backend: HardwareBackend
    weights: dict[str, torch.Tensor]
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    cos_sin: torch.Tensor  # [max_positions, head_dim]
    head_dim: int
    scale: float
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # GGUF blocks of some weights, by name


def lower(graph: Graph, ctx: LoweringContext) -> Plan:
    if "buffer_plan" not in graph.attrs:
        graph = plan_buffers(graph)
    slots: dict[Value, int] = graph.attrs["buffer_plan"]
    kernels = ctx.backend.kernels()
    instrs: list[Instr] = []
    input_slots: dict[str, int] = {}
    output_slots: dict[str, int] = {}
    for node_id in graph.attrs["order"]:
        node = graph.nodes[node_id]
        ins = tuple(slots[v] for v in graph.inputs_of(node_id))
        if node.op == "input":
            input_slots[node.params["name"]] = slots[Value(node_id)]
            continue
        if node.op == "output":
            output_slots[node.params["name"]] = ins[0]
            continue
        binder = _BINDERS.get(node.op)
        if binder is None:
            raise GraphError(f"node {node_id!r}: no lowering for op {node.op!r}")
        kernel, consts = binder(node.params, ctx, kernels)
        outs = tuple(slots[Value(node_id, p)] for p in range(node.num_outputs))
        instrs.append(Instr(kernel, ins, tuple(consts), outs, node_id))
    return Plan(instrs, graph.attrs["num_slots"], input_slots, output_slots)


# -- binders: op params -> (kernel, constants appended after the slot inputs) ----------------------------------------


def _weight(ctx: LoweringContext, name: str) -> torch.Tensor:
    try:
        return ctx.weights[name]
    except KeyError:
        raise GraphError(f"the model graph needs weight {name!r}, which the loaded model lacks") from None


def _bind_linear(params, ctx, kernels):
    names = params["weight"] if isinstance(params["weight"], list) else [params["weight"]]
    weight = torch.cat([_weight(ctx, n) for n in names]) if len(names) > 1 else _weight(ctx, names[0])
    bias = None
    if params.get("bias"):
        bias = torch.cat([_weight(ctx, n.removesuffix(".weight") + ".bias") for n in names])
        bias = bias.to(ctx.backend.device)
    quantized = QuantizedWeight.concat([ctx.quantized.get(n) for n in names])
    return kernels["linear"], (ctx.backend.prepare_linear_weight(weight, quantized), bias)


def _bind_norm(op):
    def bind(params, ctx, kernels):
        return kernels[op], (_weight(ctx, params["weight"]).to(ctx.backend.device), params["eps"])

    return bind


def _bind_rope(params, ctx, kernels):
    rope, d = kernels["rope"], ctx.head_dim

    def rope_flat(q, k, positions, cos_sin):
        n = q.shape[0]
        return rope(q.view(n, -1, d), k.view(n, -1, d), positions, cos_sin)  # [T, Hq, D], [T, Hk, D]

    return rope_flat, (ctx.cos_sin,)


def _bind_attention(params, ctx, kernels):
    attention, d = kernels["attention"], ctx.head_dim
    k_cache, v_cache = ctx.kv_caches[params["layer"]]

    def attention_flat(q, k, v, meta, k_cache, v_cache, scale):
        n = q.shape[0]
        out = attention(q, k, v.view(n, -1, d), k_cache, v_cache, meta, scale)  # [T, Hq, D]
        return out.reshape(n, -1)  # [T, Hq * D]

    return attention_flat, (k_cache, v_cache, ctx.scale)


def _split(x, sizes):
    return torch.split(x, sizes, dim=-1)


def _index_rows(x, indices):
    return x if indices is None else x.index_select(0, indices)


_BINDERS: dict[str, Callable] = {
    "embedding": lambda p, ctx, k: (k["embedding"], (_weight(ctx, p["weight"]).to(ctx.backend.device),)),
    "linear": _bind_linear,
    "rmsnorm": _bind_norm("rmsnorm"),
    "add_rmsnorm": _bind_norm("add_rmsnorm"),
    "rope": _bind_rope,
    "attention": _bind_attention,
    "silu_mul": lambda p, ctx, k: (k["silu_mul"], ()),
    "add": lambda p, ctx, k: (k["add"], ()),
    "split": lambda p, ctx, k: (_split, (p["sizes"],)),
    "index_rows": lambda p, ctx, k: (_index_rows, ()),
    "silu": lambda p, ctx, k: (torch.nn.functional.silu, ()),
    "mul": lambda p, ctx, k: (torch.mul, ()),
}
