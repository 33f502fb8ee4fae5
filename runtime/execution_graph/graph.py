"""The one IR of sageLLM: a directed graph of named operations.

Two levels use it. Pipeline graphs name streaming operators (admission, route, prefill, ...) with a placement;
model graphs name tensor ops (linear, rmsnorm, attention, ...) that lowering binds to a backend's kernels. Passes are
functions `Graph -> Graph`; a graph never changes behind a pass's back.

An edge feeds output `src_port` of node `src` into input `port` of node `dst`; a node's inputs are its incoming edges
ordered by `port`. Node ids are unique; insertion order is kept, and builders add nodes in a topological order."""

from __future__ import annotations

import copy
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from sagellm.common.errors import InvalidInput


class GraphError(InvalidInput):
    """A malformed graph: unknown node, duplicate id, dangling edge or cycle."""


@dataclass
class Node:
    id: str
    op: str
    params: dict[str, Any] = field(default_factory=dict)
    placement: str = "task"  # pipeline graphs: "task", "process[:GROUP]" or "remote[:GROUP]"; model graphs: unused
    num_outputs: int = 1


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    port: int = 0  # input slot at dst
    src_port: int = 0  # which output of src


@dataclass(frozen=True)
class Value:
    """A handle on one output of a node, so builders read like code: `h = g.add("rmsnorm", [x], eps=...)`."""

    node: str
    port: int = 0


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    _counter: Counter = field(default_factory=Counter, repr=False)

    # -- building -------------------------------------------------------------------------------------------------
    def add(self, op: str, inputs: list[Value] = (), *, id: str | None = None, num_outputs: int = 1, **params) -> Value:
        """Adds a node fed by `inputs` (in port order) and returns a handle on its first output."""
        node_id = id or self._fresh_id(op)
        if node_id in self.nodes:
            raise GraphError(f"duplicate node id {node_id!r}")
        for value in inputs:
            if value.node not in self.nodes:
                raise GraphError(f"node {node_id!r} reads unknown node {value.node!r}")
        self.nodes[node_id] = Node(node_id, op, dict(params), num_outputs=num_outputs)
        self.edges.extend(Edge(v.node, node_id, port, v.port) for port, v in enumerate(inputs))
        return Value(node_id)

    def add_multi(self, op: str, inputs: list[Value], num_outputs: int, **params) -> list[Value]:
        first = self.add(op, inputs, num_outputs=num_outputs, **params)
        return [Value(first.node, port) for port in range(num_outputs)]

    def _fresh_id(self, op: str) -> str:
        while True:
            self._counter[op] += 1
            candidate = f"{op}_{self._counter[op]}"
            if candidate not in self.nodes:
                return candidate

    # -- reading --------------------------------------------------------------------------------------------------
    def inputs_of(self, node_id: str) -> list[Value]:
        incoming = sorted((e for e in self.edges if e.dst == node_id), key=lambda e: e.port)
        return [Value(e.src, e.src_port) for e in incoming]

    def consumers(self) -> dict[Value, list[tuple[str, int]]]:
        """For every produced value, the (node, port) pairs that read it."""
        readers: dict[Value, list[tuple[str, int]]] = defaultdict(list)
        for e in self.edges:
            readers[Value(e.src, e.src_port)].append((e.dst, e.port))
        return readers

    def topological_order(self) -> list[Node]:
        indegree = {node_id: 0 for node_id in self.nodes}
        successors: dict[str, list[str]] = defaultdict(list)
        for e in self.edges:
            if e.src not in self.nodes or e.dst not in self.nodes:
                raise GraphError(f"edge {e.src} -> {e.dst} names a node that does not exist")
            indegree[e.dst] += 1
            successors[e.src].append(e.dst)
        ready = [node_id for node_id, degree in indegree.items() if degree == 0]
        order: list[Node] = []
        while ready:
            node_id = ready.pop(0)
            order.append(self.nodes[node_id])
            for nxt in successors[node_id]:
                indegree[nxt] -= 1
                if indegree[nxt] == 0:
                    ready.append(nxt)
        if len(order) != len(self.nodes):
            stuck = sorted(node_id for node_id, degree in indegree.items() if degree > 0)
            raise GraphError(f"graph has a cycle through {', '.join(stuck[:5])}")
        return order

    def op_counts(self) -> Counter:
        return Counter(node.op for node in self.nodes.values())

    def copy(self) -> Graph:
        return copy.deepcopy(self)

    # -- editing (for passes) -------------------------------------------------------------------------------------
    def connect(self, src: str, dst: str) -> None:
        """Feeds `src`'s first output into the next free input port of `dst` (a merge node's inputs are ports
        0, 1, ...)."""
        for node_id in (src, dst):
            if node_id not in self.nodes:
                raise GraphError(f"cannot connect {src!r} -> {dst!r}: no node {node_id!r}")
        self.edges.append(Edge(src, dst, port=sum(e.dst == dst for e in self.edges)))

    def successors(self, node_ids: list[str]) -> list[str]:
        """The nodes `node_ids` feed, each once, in edge order."""
        return list(dict.fromkeys(e.dst for e in self.edges if e.src in node_ids))

    def leaves(self) -> list[str]:
        """The nodes that feed none."""
        return [node_id for node_id in self.nodes if not any(e.src == node_id for e in self.edges)]

    def remove_node(self, node_id: str) -> None:
        del self.nodes[node_id]
        self.edges = [e for e in self.edges if e.src != node_id and e.dst != node_id]

    def redirect(self, old: Value, new: Value) -> None:
        """Makes every reader of `old` read `new` instead."""
        self.edges = [
            Edge(new.node, e.dst, e.port, new.port) if (e.src, e.src_port) == (old.node, old.port) else e
            for e in self.edges
        ]

    def pretty(self) -> str:
        """One line per node: `%out = op(%in, ...) params`, in topological order."""
        lines = []
        for node in self.topological_order():
            args = ", ".join(_name(v) for v in self.inputs_of(node.id))
            outs = ", ".join(_name(Value(node.id, p)) for p in range(node.num_outputs))
            params = " ".join(f"{k}={_short(v)}" for k, v in node.params.items())
            lines.append(f"{outs} = {node.op}({args}) {params}".rstrip())
        return "\n".join(lines)


def _name(value: Value) -> str:
    return f"%{value.node}" if value.port == 0 else f"%{value.node}.{value.port}"


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)
