"""Graph -> Graph optimizations for model graphs.

Each pass copies the graph, rewrites a pattern, and leaves everything else alone, so passes compose in any order
and `sagellm inspect` can show the graph before and after. `optimize` is the pipeline the runner uses."""

from __future__ import annotations

from collections import defaultdict

from sagellm.runtime.execution_graph.graph import Graph, Value


def fuse_sibling_linears(graph: Graph) -> Graph:
    """Linears reading the same input (q/k/v, gate/up) become one wide linear and a split: one GEMM, not three.
    A tensor parallel rank's slices of their weights (`shard`, all along the output features) become one per weight."""
    g = graph.copy()
    groups: dict[tuple[Value, bool], list[str]] = defaultdict(list)
    for node in g.topological_order():
        if node.op == "linear" and all(shard is None or shard[0] == 0 for shard in _shards(node.params)):
            (x,) = g.inputs_of(node.id)
            groups[(x, bool(node.params.get("bias")))].append(node.id)
    for (x, has_bias), members in groups.items():
        if len(members) < 2:
            continue
        nodes = [g.nodes[m] for m in members]
        sizes = [n.params["out_features"] for n in nodes]
        weights = [w for n in nodes for w in _as_list(n.params["weight"])]
        extra = {"bias": True} if has_bias else {}
        if any("shard" in n.params for n in nodes):
            extra["shard"] = [s for n in nodes for s in _shards(n.params)]
        fused = g.add("linear", [x], weight=weights, out_features=sum(sizes), **extra)
        parts = g.add_multi("split", [fused], len(members), sizes=sizes)
        for member, part in zip(members, parts):
            g.redirect(Value(member), part)
            g.remove_node(member)
    return g


GATED = {"silu": "silu_mul", "gelu_tanh": "gelu_tanh_mul"}  # an activation -> its gated op on the unsplit tensor


def fuse_gated_activation(graph: Graph) -> Graph:
    """mul(act(a), b) where a and b are the two halves of one split -> act_mul on the unsplit tensor (SwiGLU's
    silu_mul, GeGLU's gelu_tanh_mul)."""
    g = graph.copy()
    readers = g.consumers()
    for node in list(g.nodes.values()):
        if node.op != "mul" or node.id not in g.nodes:
            continue
        act_out, b = g.inputs_of(node.id)
        act = g.nodes[act_out.node]
        if act.op not in GATED:
            continue
        (a,) = g.inputs_of(act.id)
        split = g.nodes[a.node]
        if not (split.op == "split" and split.num_outputs == 2 and (a.port, b.node, b.port) == (0, split.id, 1)):
            continue
        if len(readers[a]) != 1 or len(readers[b]) != 1:
            continue  # the halves are read elsewhere too; keep them
        (wide,) = g.inputs_of(split.id)
        fused = g.add(GATED[act.op], [wide])
        g.redirect(Value(node.id), fused)
        for dead in (node.id, act.id, split.id):
            g.remove_node(dead)
    return g


def fuse_add_rmsnorm(graph: Graph) -> Graph:
    """rmsnorm(add(x, residual)) -> add_rmsnorm(x, residual) giving (normed, sum): one pass over the row."""
    g = graph.copy()
    for node in list(g.nodes.values()):
        if node.op != "rmsnorm" or node.id not in g.nodes:
            continue
        (summed,) = g.inputs_of(node.id)
        add = g.nodes[summed.node]
        if add.op != "add":
            continue
        normed, new_sum = g.add_multi("add_rmsnorm", g.inputs_of(add.id), 2, **node.params)
        g.redirect(Value(node.id), normed)
        g.redirect(Value(add.id), new_sum)
        g.remove_node(node.id)
        g.remove_node(add.id)
    return g


def plan_buffers(graph: Graph) -> Graph:
    """Assigns every value a buffer slot by liveness: a value's slot is freed after its last reader runs and reused
    by the next value produced, so intermediates are released as early as possible and the slot table stays small.
    The plan is stored in attrs["buffer_plan"] ({Value: slot}) with attrs["order"] (node ids) and attrs["num_slots"]."""
    g = graph.copy()
    order = g.topological_order()
    position = {node.id: i for i, node in enumerate(order)}
    last_use: dict[Value, int] = {}
    for e in g.edges:
        value = Value(e.src, e.src_port)
        last_use[value] = max(last_use.get(value, -1), position[e.dst])
    keep_alive = {v for n in order if n.op == "output" for v in g.inputs_of(n.id)}
    free: list[int] = []
    plan: dict[Value, int] = {}
    expiring: dict[int, list[Value]] = defaultdict(list)
    num_slots = 0
    for i, node in enumerate(order):
        for port in range(node.num_outputs if node.op != "output" else 0):
            value = Value(node.id, port)
            if free:
                plan[value] = free.pop()
            else:
                plan[value], num_slots = num_slots, num_slots + 1
            if value in last_use and value not in keep_alive:
                expiring[last_use[value]].append(value)
            elif value not in last_use:  # never read: its slot is free right after this node
                expiring[i].append(value)
        free.extend(plan[v] for v in expiring.pop(i, []))
    g.attrs.update(buffer_plan=plan, order=[n.id for n in order], num_slots=num_slots)
    return g


def optimize(graph: Graph) -> Graph:
    for graph_pass in (fuse_sibling_linears, fuse_gated_activation, fuse_add_rmsnorm, plan_buffers):
        graph = graph_pass(graph)
    return graph


def _as_list(weight: str | list[str]) -> list[str]:
    return weight if isinstance(weight, list) else [weight]


def _shards(params: dict) -> list:
    """One slice (or None: the whole weight) per weight of a linear."""
    shard = params.get("shard")
    if isinstance(params["weight"], list):
        return shard or [None] * len(params["weight"])
    return [shard]
