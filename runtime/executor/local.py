"""Runs a pipeline graph as trio tasks in one process: one nursery, one task per node, one channel per node input.

Every node's in-edges feed one memory channel; closing all of a node's senders is its end of input, so shutdown
flows down the graph as sources run dry. Channels are rendezvous (buffer 0 by default): an item waits in the
operator that holds it, so a policy queue decides the order of everything the engines have not yet taken, and an
engine takes only up to its `capacity()`. Step operators' `step()` runs in a worker thread; `add()` runs between
steps on the event loop, so an engine never sees two threads.

Every request ends with exactly one terminal item: the executor watches the graph's leaves, drops a second terminal
for a request (and logs it), turns an operator's exception into an `internal` RequestError for the item (or, for a
Step operator, for everything it held), and at the end fails any request that never finished. The process executor
reuses this class for the nodes each process runs, with ZeroMQ bridges for the edges that cross processes."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from sagellm.runtime.engine.outputs import RequestMetrics
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.models.model_cache import resolve_model
from sagellm.runtime.pipeline.messages import Request, RequestError, TokenDelta, is_terminal
from sagellm.runtime.pipeline.operator import (
    Emit,
    InstanceStats,
    MapOperator,
    Operator,
    OperatorContext,
    PipelineLoad,
    QueueOperator,
    SourceOperator,
    StepOperator,
    get_operator,
)

log = structlog.get_logger("sagellm.executor")
IDLE_POLL_S = 0.005  # a non-blocking source that had nothing is polled again after this, or when a request ends
ENDED_REMEMBERED = 100_000  # ids of ended requests kept to drop duplicates when outcomes are not kept


@dataclass
class RequestOutcome:
    """What one request produced, as the graph's leaves saw it."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: RequestError | None = None
    metrics: RequestMetrics | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


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
        role = getattr(get_operator(node.op), "role", None)
        if role is not None:
            stats[node.id] = InstanceStats(
                node.id,
                role=role,
                max_running=node.params.get("max_num_seqs", 16),
                price_per_1k_tokens=node.params.get("price_per_1k_tokens", 0.0),
            )
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
        self.graph_attrs = {**graph.attrs, **(graph_attrs or {})}
        self.load = PipelineLoad()
        self.outcomes: dict[str, RequestOutcome] = {}
        self.operators: dict[str, Operator] = {}
        self._given = dict(operators or {})
        self._progress = _Signal()  # fired whenever a request ends
        self._counted: set[str] = set()  # requests that entered from a source here and count in load.in_flight
        self._inbox_send: dict[str, trio.MemorySendChannel] = {}
        self._inbox_recv: dict[str, trio.MemoryReceiveChannel] = {}
        self._outputs: dict[str, dict[str, trio.MemorySendChannel]] = {}
        self._channel_size = channel_size
        self.remote_sender: Callable[[str, str], trio.MemorySendChannel] | None = None  # (src, dst) -> channel
        self.on_terminal: Callable[[Any], None] | None = None  # extra observer (the process executor's bookkeeping)
        self.on_leaf_item: Callable[[Any], None] | None = None  # every item that reaches a leaf (the gateway's replies)
        self.keep_outcomes = keep_outcomes
        self._ended: deque[str] = deque()  # with keep_outcomes off: recently ended ids, to still drop duplicates
        self._ended_ids: set[str] = set()
        self._cancelled: set[str] = set()  # requests whose client left (see `cancel`)
        # The code and message of requests still unfinished when the graph ends (the process executor names a
        # lost worker here); anything else left unfinished is a bug, reported as `internal`.
        self.unfinished_error: tuple[str, str] = ("internal", "the pipeline ended without finishing it")

    # -- setup ----------------------------------------------------------------------------------------------------
    def out_nodes(self, node_id: str) -> list[str]:
        return [e.dst for e in self.graph.edges if e.src == node_id]

    def is_leaf(self, node_id: str) -> bool:
        return not self.out_nodes(node_id)

    async def open_operators(self) -> None:
        """Builds and opens every local operator (engines load their models here, in a worker thread).

        Model names (the graph's `model`, a node's `model`) are resolved here, once per process, into paths: an alias
        is downloaded on the host that runs the node, and operators only ever see a path."""
        params = await trio.to_thread.run_sync(self._resolve_models)
        if self.graph_attrs.get("model") and "tokenizer" not in self.graph_attrs:
            self.graph_attrs.update(await trio.to_thread.run_sync(model_attrs, self.graph_attrs["model"]))
        for node_id in self.local:
            node = self.graph.nodes[node_id]
            op = self._given.get(node_id) or get_operator(node.op)(**params[node_id])
            ctx = OperatorContext(node_id, self.out_nodes(node_id), self.instances, self.load, self.graph_attrs)
            await trio.to_thread.run_sync(op.open, ctx)
            self.operators[node_id] = op
        for node_id in self.local:
            if not isinstance(self.operators[node_id], SourceOperator):
                send, recv = trio.open_memory_channel(self._channel_size)
                self._inbox_send[node_id], self._inbox_recv[node_id] = send, recv

    def _resolve_models(self) -> dict[str, dict[str, Any]]:
        """The local nodes' parameters with model names resolved to paths (the graph itself is left as written: the
        process executor sends it to workers on other hosts, which resolve the names there)."""
        if self.graph_attrs.get("model"):
            self.graph_attrs["model"] = str(resolve_model(self.graph_attrs["model"]))
        params = {}
        for node_id in self.local:
            node_params = dict(self.graph.nodes[node_id].params)
            if node_params.get("model"):
                node_params["model"] = str(resolve_model(node_params["model"]))
            params[node_id] = node_params
        return params

    def inbox(self, node_id: str) -> trio.MemorySendChannel:
        """A new sender into a local node's input (one per in-edge: the input ends when all are closed)."""
        return self._inbox_send[node_id].clone()

    def _wire_outputs(self) -> None:
        for node_id in self.local:
            outs = {}
            for dst in self.out_nodes(node_id):
                if dst in self._inbox_send:
                    outs[dst] = self.inbox(dst)
                elif self.remote_sender is not None:
                    outs[dst] = self.remote_sender(node_id, dst)
                else:
                    raise RuntimeError(f"edge {node_id} -> {dst}: {dst!r} is not run here and there is no bridge")
            self._outputs[node_id] = outs
        for send in self._inbox_send.values():
            send.close()  # only the per-edge clones remain: closing them ends the input

    # -- running --------------------------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> PipelineResult:
        if not self.operators:
            await self.open_operators()
        try:
            self._wire_outputs()
            async with trio.open_nursery() as nursery:
                for node_id in self.local:
                    await nursery.start(self._run_node, node_id)
                task_status.started()
        finally:
            for op in self.operators.values():
                op.close()
        self._fail_unfinished()
        return PipelineResult(self.outcomes, self.operators)

    async def _run_node(self, node_id: str, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        op = self.operators[node_id]
        runner = {
            SourceOperator: self._run_source,
            MapOperator: self._run_map,
            QueueOperator: self._run_queue,
            StepOperator: self._run_step,
        }
        kind = next(k for k in runner if isinstance(op, k))
        task_status.started()
        async with trio.open_nursery() as inner:  # closes the outputs whichever way the node ends
            try:
                await runner[kind](node_id, op, inner)
            finally:
                for send in self._outputs[node_id].values():
                    send.close()

    async def _run_source(self, node_id: str, op: SourceOperator, _: trio.Nursery) -> None:
        while True:
            if op.blocking:
                items = await trio.to_thread.run_sync(op.poll, abandon_on_cancel=True)
            else:
                items = op.poll()
            if items is None:
                return
            if not items and not op.blocking:
                idle_s = float("inf") if op.wakes else IDLE_POLL_S
                with trio.move_on_after(idle_s):  # or sooner: a request ended, or `wake_sources()`
                    await self._progress.wait()
            for item in items:
                if isinstance(item, Request):
                    self._counted.add(item.request_id)
                    self.load.in_flight += 1
                await self._send(node_id, item)

    async def _run_map(self, node_id: str, op: MapOperator, _: trio.Nursery) -> None:
        leaf = self.is_leaf(node_id)
        async for item in self._inbox_recv[node_id]:
            if leaf and not self._observe(item):
                continue
            for out in self._apply(node_id, op, op.execute, item):
                await self._send(node_id, out)

    async def _run_queue(self, node_id: str, op: QueueOperator, nursery: trio.Nursery) -> None:
        changed = trio.Event()
        input_done = False

        async def receive() -> None:
            nonlocal changed, input_done
            async for item in self._inbox_recv[node_id]:
                for out in self._apply(node_id, op, op.push, item):
                    await self._send(node_id, out)
                changed.set()
            input_done = True
            changed.set()

        nursery.start_soon(receive)
        while True:
            item = op.pop()
            if item is not None:
                await self._send(node_id, item)
                continue
            if input_done and not len(op):
                return
            await changed.wait()
            changed = trio.Event()

    async def _run_step(self, node_id: str, op: StepOperator, nursery: trio.Nursery) -> None:
        """A feeder task takes items while `step()` runs, up to the operator's `capacity()`, so an engine admits a
        whole batch's worth between two steps (not one item per step), and whatever it has no room for stays
        upstream, where a policy queue orders it."""
        buffer: deque[Any] = deque()
        arrived, room = _Signal(), _Signal()
        closed = False

        async def feed() -> None:
            nonlocal closed
            inbox = self._inbox_recv[node_id]
            while True:
                while len(buffer) >= op.capacity():
                    await room.wait()
                try:
                    item = await inbox.receive()
                except trio.EndOfChannel:
                    closed = True
                    arrived.fire()
                    return
                buffer.append(item)
                arrived.fire()

        nursery.start_soon(feed)
        while True:
            if buffer:
                while buffer:
                    await self._feed(node_id, op, buffer.popleft())
                room.fire()  # the buffer is empty again (and what passed through took no capacity)
            if self._cancelled:
                await self._end_cancelled(node_id, op)
            if op.has_work():
                try:
                    outs = op.step() if op.inline else await trio.to_thread.run_sync(op.step)
                except Exception as exc:  # the engine failed: its requests end, the node keeps serving
                    held = op.in_flight()
                    log.exception("step_failed", node=node_id, requests=len(held))
                    op.abort(held)
                    outs = [_internal(rid, node_id, exc) for rid in held]
                room.fire()
                for out in outs:
                    await self._send(node_id, out)
                if op.inline:
                    await trio.lowlevel.checkpoint()
                continue
            if closed:
                return
            await arrived.wait()

    async def _feed(self, node_id: str, op: StepOperator, item: Any) -> None:
        rid = getattr(item, "request_id", None)
        if rid in self._cancelled:  # its client left while it waited upstream
            await self._send(node_id, TokenDelta(request_id=rid, token_ids=[], finish_reason="abort"))
            return
        for out in self._apply(node_id, op, op.add, item):
            await self._send(node_id, out)

    # -- items ----------------------------------------------------------------------------------------------------
    def _apply(self, node_id: str, op: Operator, fn: Callable[[Any], Any], item: Any) -> list[Any]:
        """Runs operator logic on one item; items it does not accept pass through; an exception becomes the
        item's `internal` error."""
        if op.accepts and not isinstance(item, op.accepts):
            return [item]
        try:
            result = fn(item)
        except Exception as exc:
            log.exception("operator_failed", node=node_id, request_id=getattr(item, "request_id", None))
            rid = getattr(item, "request_id", None)
            return [_internal(rid, node_id, exc)] if rid is not None else []
        if result is None:
            return []
        return result if isinstance(result, list) else [result]

    async def _send(self, node_id: str, out: Any) -> None:
        outputs = self._outputs[node_id]
        if isinstance(out, Emit):
            target, item = outputs.get(out.to), out.item
            if target is None:
                item = _internal(getattr(item, "request_id", "?"), node_id, f"no edge to {out.to!r}")
                target = next(iter(outputs.values()), None)
        else:
            target, item = next(iter(outputs.values()), None), out
        if target is None:  # a leaf's results end here
            if not self.is_leaf(node_id):
                raise RuntimeError(f"node {node_id!r} emitted with no output")
            return
        await target.send(item)

    def _observe(self, item: Any) -> bool:
        """Bookkeeping of what reaches a leaf; False drops a second terminal item for a request."""
        rid = getattr(item, "request_id", None)
        if rid is None:
            return True
        outcome = self.outcomes.get(rid)
        if outcome.finished if outcome is not None else rid in self._ended_ids:
            log.error("duplicate_terminal_dropped", request_id=rid, item=type(item).__name__)
            return False
        if outcome is None:
            outcome = self.outcomes[rid] = RequestOutcome(rid)
        if isinstance(item, TokenDelta):
            outcome.token_ids.extend(item.token_ids)
            outcome.text += item.text
            outcome.finish_reason, outcome.metrics = item.finish_reason, item.metrics
        elif isinstance(item, RequestError):
            outcome.error, outcome.metrics = item, item.metrics
        if is_terminal(item):
            self._terminal(item, outcome)
        if self.on_leaf_item is not None:
            self.on_leaf_item(item)
        if outcome.finished and not self.keep_outcomes:
            self._forget_outcome(rid)
        return True

    def _forget_outcome(self, rid: str) -> None:
        """Drops an ended request's outcome but remembers its id a while, so a stray second terminal is still seen
        as one (an outcome is created anew for an id not remembered)."""
        del self.outcomes[rid]
        self._ended.append(rid)
        self._ended_ids.add(rid)
        if len(self._ended) > ENDED_REMEMBERED:
            self._ended_ids.discard(self._ended.popleft())

    def wake_sources(self) -> None:
        """Polls the non-blocking sources now instead of at their next idle tick (the gateway just queued a
        request into its source)."""
        self._progress.fire()

    def cancel(self, request_id: str) -> None:
        """Ends a request whose client left. The engine node here that holds it aborts it between two steps and
        sends its terminal (finish reason `abort`, as vLLM's) down the graph, so the metrics sink counts it; one
        still upstream is ended the same way where it reaches an engine here. An engine in another process
        finishes it unseen (its replies are dropped by the gateway)."""
        if request_id in self._counted:
            self._cancelled.add(request_id)

    async def _end_cancelled(self, node_id: str, op: StepOperator) -> None:
        held = [rid for rid in op.in_flight() if rid in self._cancelled]
        if held:
            op.abort(held)
            for rid in held:
                await self._send(node_id, TokenDelta(request_id=rid, token_ids=[], finish_reason="abort"))

    def deliver_terminal(self, item: Any) -> None:
        """Records a terminal item that cannot travel through the graph any more (its path is gone)."""
        self._observe(item)

    def _terminal(self, item: Any, outcome: RequestOutcome) -> None:
        self._cancelled.discard(outcome.request_id)
        if outcome.request_id in self._counted:
            self._counted.discard(outcome.request_id)
            self.load.in_flight -= 1
        if isinstance(item, RequestError):
            self.load.failed += 1
        else:
            self.load.completed += 1
        if item.metrics is not None and item.metrics.slo_met is not None:
            self.load.slo_checked += 1
            self.load.slo_violations += not item.metrics.slo_met
        self._progress.fire()
        if self.on_terminal is not None:
            self.on_terminal(item)

    def _fail_unfinished(self) -> None:
        """Requests that entered and never ended are a bug somewhere: they still get their one terminal item."""
        for rid in sorted(self._counted):
            log.error("request_lost", request_id=rid)
            outcome = self.outcomes.setdefault(rid, RequestOutcome(rid))
            code, message = self.unfinished_error
            error = RequestError(request_id=rid, code=code, message=message, retryable=code != "internal")
            outcome.error = error
            self._terminal(error, outcome)
            if self.on_leaf_item is not None:
                self.on_leaf_item(error)


class _Signal:
    """Wakes whoever waits now; a fire with no waiter is not kept (waiters re-check their condition first)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


def model_attrs(model: str) -> dict[str, Any]:
    """What admission needs of the served model (a path), without its weights: the tokenizer and the config."""
    from sagellm.runtime.models.loader import load_model  # here: importing the executor must not load torch

    loaded = load_model(model, load_weights=False)
    return {"tokenizer": loaded.tokenizer, "model_config": loaded.config}


def _internal(request_id: str, node_id: str, problem: object) -> RequestError:
    return RequestError(request_id=request_id, code="internal", message=f"{node_id}: {problem}")
