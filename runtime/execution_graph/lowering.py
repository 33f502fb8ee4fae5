"""Lowering: binds an optimized model graph to a backend's kernel table and weights, giving a flat `Plan`.

The plan (plan.py) is a list of instructions run in order over a slot table: the whole forward is one loop of
plain calls, readable in one screen and cheap per op. Weights of fused linears are
concatenated and packed once here, and a mixture of experts' experts stacked once, so the hot path never touches a
weight name. A weight the GGUF file kept as blocks goes to the backend as its blocks, and its floats are never
made when the backend reads those (`prepare_block_weight`): a Q4_K_M model stays Q4_K_M in memory."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from sagellm.backends.base import HardwareBackend
from sagellm.backends.layer_caches import PagedKv, RecurrentStates
from sagellm.backends.layer_specs import AttentionSpec, DeltaNetSpec, MoeSpec
from sagellm.backends.quantized import QuantizedWeight
from sagellm.backends.torch_ops import altup
from sagellm.common.memory import drop_pages_under
from sagellm.runtime.execution_graph.fuse_layers import fuse_decoder_layers
from sagellm.runtime.execution_graph.graph import Graph, GraphError, Value
from sagellm.runtime.execution_graph.lora_linear import LoraLinear
from sagellm.runtime.execution_graph.multimodal_binders import MULTIMODAL_BINDERS
from sagellm.runtime.execution_graph.passes import plan_buffers
from sagellm.runtime.execution_graph.plan import Instr, Plan


class Collectives(Protocol):
    """What a tensor parallel rank's graph calls between ranks (runtime/comm/collectives.py `Communicator`)."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor: ...


@dataclass
class LoweringContext:
    """What binding needs besides the graph: weights by canonical name, the KV caches, the rotary tables."""

    backend: HardwareBackend
    weights: Mapping[str, torch.Tensor]  # dense weights (a GGUF's made only when read: models/loaded.WeightsOnRead)
    kv_caches: list[PagedKv]
    rope_tables: dict[str, torch.Tensor]  # by the rope node's `table`: [max_positions, rotary dims] (rope.py)
    head_dim: int
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # GGUF blocks of some weights, by name
    collectives: Collectives | None = None  # a tensor parallel rank's group
    linear_dtype: torch.dtype = torch.float32  # the dtype linear weights are packed in (EngineConfig.dtype)
    int8_activations: bool = False  # the linears on blocks that allow it round x to int8 (EngineConfig's)
    # The mapped GGUF file `quantized` views: each weight's pages are let go once the backend has packed it.
    mapped: Any = None
    # The linear attention layers' states, per layer (runtime/engine/state_cache.py).
    state_caches: list[RecurrentStates] = field(default_factory=list)
    # Whole linear weights as the backend packed them, by name: filled as they are bound, and handed to the lowering
    # of another graph over the same weights (the MTP head shares the model's lm_head), which binds them as they are.
    packed: dict[str, tuple[Any, tuple]] = field(default_factory=dict)
    # LoRA adapters (runtime/engine/lora_weights.LoraWeights): `whole` names the weights they change, whose linears
    # bind their slice of the adapters (`bind`) and add each row's update (`add`) after the base matmul; None: none.
    lora: Any = None


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
    plan = Plan(instrs, graph.attrs["num_slots"], input_slots, output_slots)
    # Whole layers as one instruction, where the backend can (adding the step's adapter rows' updates too).
    lora_rows = (lambda: ctx.lora.row_slots) if ctx.lora is not None else None
    return fuse_decoder_layers(plan, graph, kernels, lora_rows)


# -- binders: op params -> (kernel, constants appended after the slot inputs) ----------------------------------------


def _weight(ctx: LoweringContext, name: str) -> torch.Tensor:
    try:
        return ctx.weights[name]
    except KeyError:
        raise GraphError(f"the model graph needs weight {name!r}, which the loaded model lacks") from None


def _bind_linear(params, ctx, kernels):
    """One packed weight of the node's weights (several when fused), each cut to this rank's `shard` if it has one:
    their GGUF blocks where the backend reads them all, else their floats. A whole weight is packed once
    (`ctx.packed`)."""
    whole = isinstance(params["weight"], str) and not params.get("shard") and not params.get("bias")
    if whole and params["weight"] in ctx.packed:
        return _with_lora(ctx.packed[params["weight"]], params, ctx)
    bound = _pack_linear(params, ctx, kernels)
    if whole:
        ctx.packed[params["weight"]] = bound
    return _with_lora(bound, params, ctx)


def _with_lora(bound: tuple[Any, tuple], params: dict[str, Any], ctx: LoweringContext) -> tuple[Any, tuple]:
    """The linear's kernel followed by the adapters' updates of its weights that adapters change (each its own
    columns of a fused linear's output), when the step has rows with an adapter."""
    names = params["weight"] if isinstance(params["weight"], list) else [params["weight"]]
    lora = ctx.lora
    if lora is None or not any(name in lora.whole for name in names):
        return bound
    shards = params.get("shard") or [None] * len(names)
    shards = shards if isinstance(shards, list) else [shards]
    columns, start = [], 0
    for name, shard in zip(names, shards):
        cut = (shard[0], _runs(shard)) if shard is not None else None
        width = _out_features(ctx, name) if cut is None or cut[0] else sum(b - a for a, b in cut[1])  # this rank's
        if name in lora.whole:
            lora.bind(name, cut)  # this rank's slice of its adapters' weights
            columns.append((name, start, start + width))
        start += width
    return LoraLinear(bound[0], lora, columns), bound[1]


def _out_features(ctx: LoweringContext, name: str) -> int:
    blocks = ctx.quantized.get(name)
    return blocks.out_features if blocks is not None else int(_weight(ctx, name).shape[0])


def _pack_linear(params, ctx, kernels):
    names = params["weight"] if isinstance(params["weight"], list) else [params["weight"]]
    shards = params.get("shard") or [None] * len(names)
    shards = shards if isinstance(shards, list) else [shards]
    bias = None
    if params.get("bias"):  # a row-parallel rank's bias (inputs cut) is the whole output's
        biases = [_weight(ctx, n.removesuffix(".weight") + ".bias") for n in names]
        biases = [b if shard is None or shard[0] == 1 else _cut(b, shard) for b, shard in zip(biases, shards)]
        bias = torch.cat(biases).to(ctx.backend.device)
    blocks = [_cut_blocks(ctx.quantized.get(n), shard) for n, shard in zip(names, shards)]
    if all(b is not None for b in blocks):
        packed = _packed_blocks(ctx, blocks)
        if packed is not None:
            return kernels["linear"], (packed, bias)
    weights = [_cut(_weight(ctx, n), shard) for n, shard in zip(names, shards)]
    weight = torch.cat(weights) if len(weights) > 1 else weights[0]
    weight = weight.to(ctx.linear_dtype)  # bf16 when asked for
    return kernels["linear"], (ctx.backend.prepare_linear_weight(weight), bias)


def _bind_embedding(params, ctx, kernels):
    """The embedding's rows, read from the GGUF file's blocks when it kept them (dequantized per step, only the rows
    the step's tokens select), else from its floats. The token embedding's blocks are copied out of the file's
    mapping into memory of their own: a model whose other weights were repacked holds about the file's size again,
    so the kernel evicts the mapping's pages as it reads the file, and each token not seen since loading would read
    its row from disk (gpt-oss-20b on a 24 GB machine: 10 ms a decode step, some steps 30). A table a token reads
    one row of per layer (`rows`: Gemma 3n's, GBs) stays mapped, read as it is asked for."""
    blocks = ctx.quantized.get(params["weight"])
    if blocks is not None and "rows" not in params:
        blocks = replace(blocks, blocks=blocks.blocks.clone())
    if blocks is not None:
        device = ctx.backend.device
        embed = lambda ids, weight: weight.rows(ids).to(device)  # noqa: E731
        consts: tuple = (blocks,)
    else:
        table = _weight(ctx, params["weight"]).to(ctx.backend.device)
        embed, consts = kernels["embedding"], (table,)
        if table.dtype != torch.float32:  # a table kept narrow (hf_loader.ROW_TABLES): the rows read widened
            narrow = embed
            embed = lambda ids, weight: narrow(ids, weight).float()  # noqa: E731
    if "rows" not in params:
        return embed, consts
    rows = params["rows"]  # a table shorter than the vocabulary (Gemma 3n's per-layer one): row 0 for the rest
    return (lambda ids, weight: embed(ids.masked_fill(ids >= rows, 0), weight)), consts


def _cut(tensor: torch.Tensor, shard: tuple[int, ...] | None) -> torch.Tensor:
    """A rank's slice `(dim, start, stop, ...)` of a weight (or a bias, whose only dimension is the output's)."""
    if shard is None:
        return tensor
    return take_runs(tensor, min(shard[0], tensor.dim() - 1), _runs(shard))


def _runs(shard: tuple[int, ...]) -> list[tuple[int, int]]:
    """A `shard`'s ranges (start, stop): one, or several joined in order (tensor_parallel.py)."""
    return list(zip(shard[1::2], shard[2::2]))


def take_runs(tensor: torch.Tensor, dim: int, runs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The ranges `runs` of `dim`, joined in order."""
    parts = [tensor.narrow(dim, start, stop - start) for start, stop in runs]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim)).contiguous()


def _bind_norm(op):
    def bind(params, ctx, kernels):
        return kernels[op], (_weight(ctx, params["weight"]).to(ctx.backend.device), params["eps"])

    return bind


def _bind_head_norm(params, ctx, kernels):
    """RMSNorm over each head of a [T, H * D] projection (Qwen3's q/k norms), the weight [D] shared by the heads;
    without a weight (Gemma 4's values), ones."""
    head_rmsnorm, d = kernels["head_rmsnorm"], params.get("head_dim", ctx.head_dim)

    def head_rmsnorm_flat(x, weight, eps):
        n = x.shape[0]
        return head_rmsnorm(x.view(n, -1, d), weight, eps).view(n, -1)

    name = params["weight"]
    weight = torch.ones(d) if name is None else _weight(ctx, name)
    return head_rmsnorm_flat, (weight.to(ctx.backend.device), params["eps"])


def _bind_rope(params, ctx, kernels):
    rope, d = kernels["rope"], params.get("head_dim", ctx.head_dim)

    def rope_flat(q, k, positions, cos_sin):
        n = q.shape[0]
        return rope(q.view(n, -1, d), k.view(n, -1, d), positions, cos_sin)  # [T, Hq, D], [T, Hk, D]

    return rope_flat, (ctx.rope_tables[params.get("table", "global")],)


def _bind_rope_query(params, ctx, kernels):
    """The queries' rope alone, for a layer that attends over another's keys (turned by that one); the kernel takes
    a key head too, so it turns the first query head again, to no use."""
    rope, d = kernels["rope"], params.get("head_dim", ctx.head_dim)

    def rope_query(q, positions, cos_sin):
        heads = q.view(q.shape[0], -1, d)
        return rope(heads, heads[:, :1], positions, cos_sin)[0]  # [T, Hq, D]

    return rope_query, (ctx.rope_tables[params.get("table", "global")],)


def _bind_attention(params, ctx, kernels):
    """Constants: the layer's cache, then its AttentionSpec: its scale, sliding window (0: none), score soft-cap
    (0: none) and attention sinks (a logit per query head, or None), built once here."""
    attention, d = kernels["attention"], params.get("head_dim", ctx.head_dim)
    cache = ctx.kv_caches[params["cache"]]
    sinks = None
    if params.get("sinks"):
        first, end = params.get("sinks_heads") or (0, params["num_heads"])  # a tensor parallel rank's heads
        sinks = _weight(ctx, params["sinks"])[first:end].float().contiguous().to(ctx.backend.device)

    def attention_flat(q, k, v, meta, cache, spec):
        n = q.shape[0]
        meta = meta.for_window(spec.window)
        out = attention(q, k, v.view(n, -1, d), cache, meta, spec)  # [T, Hq, D]
        return out.reshape(n, -1)  # [T, Hq * D]

    spec = AttentionSpec(params["scale"], params.get("window", 0), params.get("softcap", 0.0), sinks)
    return attention_flat, (cache, spec)


def _bind_gated_delta_net(params, ctx, kernels):
    """Constant: the layer's DeltaNetSpec: its states, its convolution's weight [C, K], A_log and dt_bias, its head
    counts and sizes, and whether its value heads are tiled by key head (a GGUF's order). A tensor
    parallel rank's are cut to its `channels` and `value_heads` (tensor_parallel.py)."""
    states = ctx.state_caches[params["state"]]
    device = ctx.backend.device
    conv_weight = _weight(ctx, params["conv_weight"]).float()[:, 0, :]  # [C, 1, K] -> [C, K]
    a_log, dt_bias = (_weight(ctx, params[name]).float() for name in ("a_log", "dt_bias"))
    if "channels" in params:
        conv_weight = take_runs(conv_weight, 0, params["channels"])
        a_log, dt_bias = (take_runs(t, 0, params["value_heads"]) for t in (a_log, dt_bias))
    weights = (t.contiguous().to(device) for t in (conv_weight, a_log, dt_bias))
    dims = (params["num_k_heads"], params["head_k_dim"], params["head_v_dim"], params.get("tiled_value_heads", False))
    return kernels["gated_delta_net"], (DeltaNetSpec(states, *weights, *dims),)


def _bind_altup(op):
    """Gemma 3n's AltUp ops (backends/torch_ops/altup.py) with their weights: the streams' projections [K-1, H, H]
    stacked, or a layer's router norm, router, coefficients and output scale."""

    def bind(params, ctx, kernels):
        device = ctx.backend.device
        weight = lambda name: _weight(ctx, name).float().to(device)  # noqa: E731
        if op in ("embed", "unembed"):
            stacked = torch.stack([weight(name) for name in params["weights"]])
            return (altup.embed_streams if op == "embed" else altup.unembed_streams), (stacked,)
        router = (weight(params["norm"]), weight(params["router"]), weight(params["coefs"]))
        if op == "predict":
            return altup.predict, (*router, params["active"], params["eps"])
        scale = weight(params["output_scale"]) if params.get("output_scale") else None
        return altup.correct, (*router, scale, params["active"], params["eps"])

    return bind


def _bind_gaussian_top_k(params, ctx, kernels):
    """Activation sparsity: the normal quantile of the share cut, in fp32 as transformers takes it. A tensor parallel
    rank's rows are its slice of rows `width` wide, whose mean and deviation its group sums (tensor_parallel.py)."""
    quantile = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(params["sparsity"], dtype=torch.float32))
    if "width" not in params:
        return altup.gaussian_top_k, (float(quantile),)
    split = functools.partial(altup.split_gaussian_top_k, all_reduce=_group(ctx).all_reduce)
    return split, (float(quantile), params["width"])


def _split_head_halves(x: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, H * 2D] holding each head's two halves in turn (Qwen3.5's query, then its gate) -> two [T, H * D]."""
    n = x.shape[0]
    heads = x.view(n, -1, 2 * head_dim)
    return heads[..., :head_dim].reshape(n, -1), heads[..., head_dim:].reshape(n, -1)


def _bind_moe(params, ctx, kernels):
    """The router whole, and the experts this rank holds (`experts`: (first, end), every one when absent): each
    expert's gate and up projections as one weight [2I, H] and its down projection [H, I], as the GGUF blocks the
    backend reads when the loader kept them (prepared per expert), else as floats stacked once ([L, 2I, H] and
    [L, H, I]); with `bias`, the router's and the projections' biases, stacked the same way: one MoeSpec."""
    first, end = params.get("experts") or (0, params["num_experts"])
    held = range(first, end)
    device = ctx.backend.device
    gate, up, down = (params[role] for role in ("gate", "up", "down"))
    stacked = (
        _experts(ctx, [[gate.format(e), up.format(e)] for e in held]),
        _experts(ctx, [[down.format(e)] for e in held]),
    )
    router = _weight(ctx, params["router"]).to(device)
    biases: tuple = (None, None, None)
    if params.get("bias"):
        bias = lambda name: _weight(ctx, name.removesuffix(".weight") + ".bias")  # noqa: E731
        gate_up_bias = [torch.cat([bias(gate.format(e)), bias(up.format(e))]) for e in held]
        down_bias = [bias(down.format(e)) for e in held]
        biases = (bias(params["router"]), torch.stack(gate_up_bias), torch.stack(down_bias))
        biases = tuple(b.to(device) for b in biases)  # router [E], gate_up [L, 2I], down [L, H]
    options = {k: params[k] for k in ("activation", "alpha", "limit") if k in params}
    if params.get("expert_scale"):  # Gemma 4: each expert's weight scaled, routed from the node's second input
        options["expert_scale"] = _weight(ctx, params["expert_scale"]).float().to(device)
    spec = MoeSpec(router, *stacked, params["top_k"], first, params.get("normalize", True), *biases, **options)
    moe = functools.partial(kernels["moe"], linear=kernels["linear"])
    routed = lambda x, routing, spec: moe(x, spec, routing=routing)  # noqa: E731
    return (routed if spec.expert_scale is not None else moe), (spec,)


def _experts(ctx: LoweringContext, names: list[list[str]]) -> list[Any] | torch.Tensor:
    """One projection of each held expert (`names`: each expert's parts, gate and up stacked): the backend's packing
    of their GGUF blocks when it reads every one of them, else their floats stacked, [L, out, in]."""
    packed = []
    for parts in names:
        blocks = [ctx.quantized.get(n) for n in parts]
        weight = _packed_blocks(ctx, blocks) if all(b is not None for b in blocks) else None
        if weight is None:  # not every expert's blocks are read: the floats of all
            floats = [torch.cat([_weight(ctx, n) for n in parts]) for parts in names]
            return torch.stack(floats).to(ctx.backend.device)
        packed.append(weight)
    return packed


def _packed_blocks(ctx: LoweringContext, parts: list[QuantizedWeight]) -> Any | None:
    """The backend's packing of `parts`' blocks (their rows stacked), None when it does not read them; once packed,
    the file's pages under them leave this process's memory."""
    packed = ctx.backend.prepare_block_weight(parts, ctx.int8_activations)
    if packed is not None:
        for part in parts:
            drop_pages_under(ctx.mapped, part.blocks)
    return packed


def _cut_blocks(blocks: QuantizedWeight | None, shard: tuple[int, ...] | None) -> QuantizedWeight | None:
    """A rank's slice of a weight's blocks, None when a range of inputs cuts blocks (the dense copy is read)."""
    if blocks is None or shard is None:
        return blocks
    dim = shard[0]
    parts = [blocks.narrow(dim, start, stop) for start, stop in _runs(shard)]
    if dim == 0 or len(parts) == 1 or any(part is None for part in parts):
        return QuantizedWeight.concat(parts)
    joined = torch.cat([part.blocks for part in parts], dim=1)  # ranges of whole blocks of inputs, side by side
    return QuantizedWeight(blocks.kind, joined, sum(part.in_features for part in parts))


def _group(ctx: LoweringContext):
    if ctx.collectives is None:
        raise GraphError("the graph is one tensor parallel rank's, but lowering was given no collectives")
    return ctx.collectives


def _split(x, sizes):
    return torch.split(x, sizes, dim=-1)


def _concat(*parts):
    return torch.cat(parts, dim=-1)


def _index_rows(x, indices):
    return x if indices is None else x.index_select(0, indices)


def _softcap(x, cap):
    """cap * tanh(x / cap): Gemma's soft-capped logits."""
    return (x / cap).tanh_().mul_(cap)


_BINDERS: dict[str, Callable] = {
    "embedding": _bind_embedding,
    "linear": _bind_linear,
    "rmsnorm": _bind_norm("rmsnorm"),
    "add_rmsnorm": _bind_norm("add_rmsnorm"),
    "head_rmsnorm": _bind_head_norm,
    "rope": _bind_rope,
    "rope_query": _bind_rope_query,
    "attention": _bind_attention,
    "moe": _bind_moe,
    "gated_delta_net": _bind_gated_delta_net,
    "gated_rmsnorm": _bind_norm("gated_rmsnorm"),
    "split_head_halves": lambda p, ctx, k: (_split_head_halves, (p["head_dim"],)),
    "sigmoid": lambda p, ctx, k: (k["sigmoid"], ()),
    "silu_mul": lambda p, ctx, k: (k["silu_mul"], ()),
    "gelu_tanh_mul": lambda p, ctx, k: (k["gelu_tanh_mul"], ()),
    "add": lambda p, ctx, k: (k["add"], ()),
    "split": lambda p, ctx, k: (_split, (p["sizes"],)),
    "concat": lambda p, ctx, k: (_concat, ()),
    "index_rows": lambda p, ctx, k: (_index_rows, ()),
    "silu": lambda p, ctx, k: (torch.nn.functional.silu, ()),
    "gelu_tanh": lambda p, ctx, k: (functools.partial(torch.nn.functional.gelu, approximate="tanh"), ()),
    # The factor made an fp32 tensor once (the embeddings' dtype), as transformers rounds Gemma's sqrt(hidden)
    "scale": lambda p, ctx, k: (torch.mul, (torch.tensor(p["factor"], dtype=torch.float32),)),
    "softcap": lambda p, ctx, k: (_softcap, (p["cap"],)),
    "mul": lambda p, ctx, k: (torch.mul, ()),
    "altup_embed": _bind_altup("embed"),
    "altup_unembed": _bind_altup("unembed"),
    "altup_predict": _bind_altup("predict"),
    "altup_correct": _bind_altup("correct"),
    "altup_add_to_others": lambda p, ctx, k: (altup.add_to_others, ()),
    "gaussian_top_k": _bind_gaussian_top_k,
    "mul_weight": lambda p, ctx, k: (torch.mul, (_weight(ctx, p["weight"]).to(ctx.backend.device),)),
    "all_reduce": lambda p, ctx, k: (_group(ctx).all_reduce, ()),
    "all_gather": lambda p, ctx, k: (_group(ctx).all_gather, (p["sizes"],)),
    **MULTIMODAL_BINDERS,  # a vision encoder's ops, and the decoder's scatter of its embeddings
}
