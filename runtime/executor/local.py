"""Runs a pipeline graph as trio tasks in one process: one nursery, one task and one input channel per node, except
for chained Map nodes, which run inside their upstreams' tasks.

A node's in-edges feed one memory channel; closing all of a node's senders is its end of input, so shutdown flows
down the graph as sources run dry. Channels are rendezvous (buffer 0 by default): an item waits in the operator that
holds it, so a policy queue decides the order of everything the engines have not yet taken, and an engine takes only
up to its `capacity()`. A Map node whose in-edges all come from nodes run here is chained (as Flink chains
operators): it has no task and no channel, and each upstream's send runs its `execute` on the item right in the
upstream's task, so admission, route or a metrics sink cost no task switch per item. Closing the last edge into a
chained node closes its outputs, so end of input flows through it too, and backpressure is unchanged: the upstream's
send waits for the chained node's own sends. What each node does with what arrives (one loop per operator kind) is
`node_tasks.NodeTasks`.

Every request ends with exactly one terminal item: the executor hands what reaches the graph's leaves to its
`RequestLedger` (which drops a second terminal for a request and fails, at the end, any request that never finished),
and the node loops turn an operator's exception into an `internal` RequestError. The process executor reuses this
class for the nodes each process runs, with ZeroMQ bridges for the edges that cross processes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from sagellm.common.pulse import Pulse
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.ledger import RequestLedger, RequestOutcome
from sagellm.runtime.executor.node_tasks import NodeTasks
from sagellm.runtime.executor.operator_calls import internal_error
from sagellm.runtime.pipeline.operator import (
    Emit,
    InstanceStats,
    MapOperator,
    Operator,
    OperatorContext,
    SourceOperator,
    StepOperator,
    get_operator,
)
from sagellm.runtime.pipeline.served_model import context_limit, image_limit


@dataclass
class PipelineResult:
    outcomes: dict[str, RequestOutcome]
    operators: dict[str, Operator]  # by node id, for reading their state (metrics sinks, counters)

    def metrics(self) -> Any:
        """The snapshot of the first metrics sink this process ran, or None."""
        for op in self.operators.values():
            if hasattr(op, "get_metrics"):
                return op.get_metrics()
        return None


def instances_of(graph: Graph) -> dict[str, InstanceStats]:
    """Stats for every engine node, made before any operator opens, so route sees all instances (also remote ones)
    with their roles from the start."""
    stats = {}
    for node in graph.nodes.values():
        made = get_operator(node.op).instance_stats(node.id, node.params)
        if made is not None:
            stats[node.id] = made
    return stats


class LocalExecutor:
    def __init__(
        self,
        graph: Graph,
        *,
        nodes: list[str] | None = None,
        instances: dict[str, InstanceStats] | None = None,
        graph_attrs: dict[str, Any] | None = None,
        channel_size: int = 0,
        operators: dict[str, Operator] | None = None,
        keep_outcomes: bool = True,
    ) -> None:
        """`nodes`: the ones this process runs (default all); edges to other nodes go through `remote_sender`.
        `operators`: instances built by the caller for some nodes (benchmarks hand in their prepared sources, the
        gateway its HTTP source). `keep_outcomes=False` forgets each request's outcome once it ended, as a server
        that runs for weeks must (its replies went to `on_leaf_item`)."""
        self.graph = graph
        self.local = list(nodes if nodes is not None else graph.nodes)
        self.instances = instances if instances is not None else instances_of(graph)
        # The graph's attributes for its operators, with the context its engine nodes limit requests to.
        limits = {"max_model_len": context_limit(graph), "max_images": image_limit(graph)}
        self.graph_attrs = {**limits, **graph.attrs, **(graph_attrs or {})}
        self._progress = Pulse()  # fired whenever a request ends
        self.ledger = RequestLedger(keep_outcomes=keep_outcomes)
        self.ledger.on_terminal.append(lambda _: self._progress.fire())
        self.load = self.ledger.load
        self.operators: dict[str, Operator] = {}
        self._given = dict(operators or {})
        self._inbox_send: dict[str, trio.MemorySendChannel] = {}
        self._inbox_recv: dict[str, trio.MemoryReceiveChannel] = {}
        self._outputs: dict[str, dict[str, trio.MemorySendChannel | ChainedEdge]] = {}
        # Edges from a node past the ones that pass its items on (`_shortcut`), and the nodes those are: a task's
        # node (not chained, not a leaf) that accepts only some items, with what it accepts.
        self._shortcuts: dict[str, dict[str, trio.MemorySendChannel | ChainedEdge]] = {}
        self._passes_on: dict[str, tuple[type, ...]] = {}
        self.chained: set[str] = set()  # the Map nodes run in their upstreams' tasks (see `ChainedEdge`)
        self._open_chained_edges: dict[str, int] = {}  # chained node -> its edges not yet closed
        self._channel_size = channel_size
        self.remote_sender: Callable[[str, str], trio.MemorySendChannel] | None = None  # (src, dst) -> channel
        self.on_cancel: Callable[[str], None] | None = None  # tells other processes (the process executor's)
        self._tasks = NodeTasks(self.ledger, self._inbox_recv, self._send, self._progress, self.is_leaf)

    # -- setup ----------------------------------------------------------------------------------------------------
    def out_nodes(self, node_id: str) -> list[str]:
        return [e.dst for e in self.graph.edges if e.src == node_id]

    def is_leaf(self, node_id: str) -> bool:
        return not self.out_nodes(node_id)

    async def open_operators(self) -> None:
        """Builds and opens every local operator (engines load their models here, in a worker thread). The graph's
        parameters reach the operators as written: an operator resolves the model it names itself, on the host that
        runs it, and those that read the served model's tokenizer or config load it (`served_model`)."""
        for node_id in self.local:
            node = self.graph.nodes[node_id]
            op = self._given[node_id] if node_id in self._given else get_operator(node.op)(**node.params)
            outputs = self.out_nodes(node_id)
            remote = [n for n in outputs if n not in self.local]
            ctx = OperatorContext(node_id, outputs, self.instances, self.load, self.graph_attrs, remote)
            await trio.to_thread.run_sync(op.open, ctx)
            self.operators[node_id] = op
        self.chained = {node_id for node_id in self.local if self._chainable(node_id)}
        for node_id in self.local:
            if not isinstance(self.operators[node_id], SourceOperator) and node_id not in self.chained:
                send, recv = trio.open_memory_channel(self._channel_size)
                self._inbox_send[node_id], self._inbox_recv[node_id] = send, recv

    def _chainable(self, node_id: str) -> bool:
        """A Map node fed only by nodes run here: no bridge from another process, nor the process executor's error
        injection (both go through `inbox`, only for nodes with an in-edge from another process), ever feeds it. A
        Map with no in-edge at all keeps its task (its input ends at once)."""
        upstreams = [e.src for e in self.graph.edges if e.dst == node_id]
        is_map = isinstance(self.operators[node_id], MapOperator)
        return is_map and bool(upstreams) and all(src in self.local for src in upstreams)

    def inbox(self, node_id: str) -> trio.MemorySendChannel:
        """A new sender into a local node's input (one per in-edge: the input ends when all are closed). A chained
        node has none: only nodes run here feed it."""
        if node_id in self.chained:
            raise KeyError(f"node {node_id!r} is chained into its upstreams' tasks: it has no inbox")
        return self._inbox_send[node_id].clone()

    def _wire_outputs(self) -> None:
        for node_id in self.local:
            outs = {dst: self._edge(node_id, dst) for dst in self.out_nodes(node_id)}
            self._outputs[node_id] = outs
            past = {hop for dst in outs for hop in self._first_outs(dst)}  # where an item a node passes on may land
            self._shortcuts[node_id] = {
                hop: self._edge(node_id, hop)
                for hop in past
                if hop not in outs and (hop in self.chained or hop in self._inbox_send)
            }
        for node in self.graph.nodes.values():
            op = self.operators[node.id] if node.id in self.operators else get_operator(node.op)
            if op.accepts and node.id not in self.chained and not self.is_leaf(node.id):
                self._passes_on[node.id] = op.accepts
        for send in self._inbox_send.values():
            send.close()  # only the per-edge clones remain: closing them ends the input

    def _edge(self, node_id: str, dst: str) -> trio.MemorySendChannel | ChainedEdge:
        if dst in self.chained:
            self._open_chained_edges[dst] = self._open_chained_edges.get(dst, 0) + 1
            return ChainedEdge(self, dst)
        if dst in self._inbox_send:
            return self.inbox(dst)
        if self.remote_sender is not None:
            return self.remote_sender(node_id, dst)
        raise RuntimeError(f"edge {node_id} -> {dst}: {dst!r} is not run here and there is no bridge")

    def _first_outs(self, node_id: str) -> list[str]:
        """The nodes after `node_id` along first out-edges, to a leaf: the way an item nobody accepts goes."""
        path: list[str] = []
        while (outs := self.out_nodes(node_id)) and outs[0] not in path:
            node_id = outs[0]
            path.append(node_id)
        return path

    # -- running --------------------------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> PipelineResult:
        if not self.operators:
            await self.open_operators()
        try:
            self._wire_outputs()
            async with trio.open_nursery() as nursery:
                for node_id in self.local:
                    if node_id not in self.chained:
                        await nursery.start(self._run_node, node_id)
                task_status.started()
        finally:
            for op in self.operators.values():
                op.close()
        self.ledger.fail_unfinished()
        return PipelineResult(self.outcomes, self.operators)

    @property
    def outcomes(self) -> dict[str, RequestOutcome]:
        return self.ledger.outcomes

    async def _run_node(self, node_id: str, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        op = self.operators[node_id]
        loop = self._tasks.loop_for(op)
        task_status.started()
        async with trio.open_nursery() as inner:  # closes the outputs whichever way the node ends
            try:
                await loop(node_id, op, inner)
            finally:
                self._close_outputs(node_id)

    def _close_outputs(self, node_id: str) -> None:
        """The node's end of output: its downstream nodes' input ends once all their upstreams' have."""
        for send in [*self._outputs[node_id].values(), *self._shortcuts[node_id].values()]:
            send.close()

    def _chained_edge_closed(self, node_id: str) -> None:
        self._open_chained_edges[node_id] -= 1
        if not self._open_chained_edges[node_id]:  # its last upstream ended: so does the chained node
            self._close_outputs(node_id)

    # -- items ----------------------------------------------------------------------------------------------------
    async def _send(self, node_id: str, out: Any) -> bool:
        """Sends an item on to the node's downstream. True when it went into a channel (whose send always yields to
        other tasks), False when it ended without one: at this leaf, or in chained nodes."""
        outputs = self._outputs[node_id]
        if isinstance(out, Emit):
            target, item = outputs.get(out.to), out.item
            if target is None:
                item = internal_error(getattr(item, "request_id", "?"), node_id, f"no edge to {out.to!r}")
                target = next(iter(outputs.values()), None)
        else:
            target, item = next(iter(outputs.values()), None), out
        if target is None:  # a leaf's results end here (every other node has an output for each out-edge)
            return False
        if self._passes_on and (dst := out.to if isinstance(out, Emit) else next(iter(outputs))) in self._passes_on:
            accepts = self._passes_on[dst]
            if not isinstance(item, accepts):
                target = self._shortcut(node_id, dst, item) or target
        if isinstance(target, ChainedEdge):
            return await target.send(item)
        await target.send(item)
        return True

    def _shortcut(self, node_id: str, dst: str, item: Any) -> trio.MemorySendChannel | ChainedEdge | None:
        """The edge past the nodes that would only pass `item` on (they do not accept it) to the first that takes it
        or a leaf, when that node runs here; None to send it the usual way. A refusal or a finished request's item
        then never waits in an engine's input behind requests the engine has no room for."""
        hop = dst
        while (accepts := self._passes_on.get(hop)) is not None and not isinstance(item, accepts):
            hop = self.out_nodes(hop)[0]
        return self._shortcuts[node_id].get(hop) or (self._outputs[node_id].get(hop) if hop != dst else None)

    def wake_sources(self) -> None:
        """Polls the non-blocking sources now instead of at their next idle tick (the gateway just queued a
        request into its source)."""
        self._progress.fire()

    def cancel(self, request_id: str) -> None:
        """Ends a request whose client left. The engine node here that holds it aborts it between two steps and
        sends its terminal (finish reason `abort`, as vLLM's) down the graph, so the metrics sink counts it; one
        waiting in a queue node here ends there at once (`withdraw_queued`), one still upstream where it reaches a
        queue or an engine here. Engines in other processes are told (`on_cancel`), and do the same there."""
        self.ledger.cancel(request_id, passing=True)  # (it may not have entered yet: polled, not yet sent on)
        self._tasks.stop_serving(request_id)
        self._tasks.withdraw_queued(request_id)
        if self.on_cancel is not None and self.ledger.is_cancelled(request_id):
            self.on_cancel(request_id)

    def withdraw(self, request_id: str) -> bool:
        """Ends a request still waiting in a queue node here, with an abort terminal down the graph; False (and
        nothing done) when no queue here holds it: it reached an engine."""
        return self._tasks.withdraw_queued(request_id)

    def cancel_passing(self, request_ids: list[str]) -> None:
        """Requests whose client left, told by the process that runs the graph (this is a worker's executor): an
        engine here aborts them as they are held or arrive."""
        for rid in request_ids:
            self.ledger.cancel(rid, passing=True)
            self._tasks.stop_serving(rid)

    def held_requests(self) -> list[str]:
        """Request ids held by this process's engines and stream nodes (a worker's heartbeat reports them)."""
        held = [rid for op in self.operators.values() if isinstance(op, StepOperator) for rid in op.in_flight()]
        return held + self._tasks.served_requests()


class ChainedEdge:
    """An edge into a chained Map node, where its upstream's outputs would hold a memory channel, with a channel's
    `send` and `close`. `send` runs the node on the item right in the sender's task: no channel hop, no task switch,
    and the sender still waits for whatever the node sends on (a channel's rendezvous, or another chained node).
    Closing the node's last open edge closes its outputs, as a task node's are when its input ends."""

    def __init__(self, executor: LocalExecutor, node_id: str) -> None:
        self._executor, self._node_id = executor, node_id
        self._op = executor.operators[node_id]
        self._leaf = executor.is_leaf(node_id)
        self._closed = False

    async def send(self, item: Any) -> bool:
        """True when the item (or what the node made of it) went on through a channel (as `LocalExecutor._send`)."""
        return await self._executor._tasks.map_item(self._node_id, self._op, self._leaf, item)

    def close(self) -> None:
        """Idempotent, as a channel's: only the first close of this edge counts."""
        if not self._closed:
            self._closed = True
            self._executor._chained_edge_closed(self._node_id)
