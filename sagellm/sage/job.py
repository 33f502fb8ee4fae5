"""A sageLLM pipeline graph run as one SAGE job: `from_graph("graphs/pd.yaml").run()` gives what `sagellm run` gives
(a `PipelineResult`: each request's tokens, text, metrics), with SAGE's `LocalEnvironment` moving every item.

How each operator kind maps onto SAGE (its local runtime dispatches every item synchronously, depth first, from a
loop that polls the sources in turn, and a DataStream sends everything to every downstream transformation):
- Source -> a SAGE source function (a blocking one, stdin, is polled on a thread of its own: `SourcePump`).
- Map -> a SAGE flatmap function.
- Queue (policy_sort) -> a sink that pushes, and a SAGE source that pops: SAGE has no "downstream has room", so the
  pop source pops only while the engines below the queue have room (`StepHost.room`) and no routed request waits
  for one, as the executor's rendezvous channels pop it; meanwhile requests wait in the policy's order.
- Step (an engine) -> a sink that hands requests to the engine's own thread (`StepHost`), and a SAGE source that
  emits what its steps made, so SAGE's loop keeps moving while the engine computes and requests batch as they do
  under the executor.
- Several outputs (route, or any node with several downstream nodes): each output item travels as `Addressed(to,
  item)` (an operator's `Emit(to=...)`, else the node's first downstream node, as the executor sends it), and
  every node's input is a SAGE filter keeping what is addressed to it; a node fed by several nodes reads their
  filtered streams connected (`connect(...).map(...)`).
- Stream (an OpenAI-compatible server reached over HTTP: `serve(item)` is an async generator) -> the same sink and
  source, around a trio loop on a thread of its own (`StreamHost`) that serves each item in a task.

Every node is opened with one shared `OperatorContext`, exactly as `sagellm run` opens it (the local executor's
`open_operators`: model names resolved, the tokenizer read once, one `PipelineLoad`, one `InstanceStats` per engine),
so admission and the policies see the real load and route the engines' real state, and one `RequestLedger` keeps
the rule that every request ends with exactly one result or error. Placements (`process:`, `ray:`) are not used: a
SAGE local job runs in one process. SAGE's batch mode ends a job after ~10 s in which no source emitted anything;
no engine step here comes near that, and any request a stopped job left unfinished ends with an error."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from sagellm.common.logging import default_logging
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.local import LocalExecutor, PipelineResult
from sagellm.runtime.executor.operator_calls import apply_operator, internal_error
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.operator import (
    Emit,
    MapOperator,
    Operator,
    OperatorError,
    QueueOperator,
    SourceOperator,
    StepOperator,
    StreamOperator,
)
from sagellm.sage.functions import sage_modules
from sagellm.sage.hosts import SourcePump, StepHost, StreamHost

log = structlog.get_logger("sagellm.sage")
# An engine's output source, finding nothing while its engine works and nothing else moved since its last call (SAGE
# would sleep 10 ms), waits this long for the engine's step instead, so outputs and freed room are seen at once.
IDLE_WAIT_S = 0.01


@dataclass(frozen=True)
class Addressed:
    """An item on its way along one edge: to the downstream node `to`."""

    to: str
    item: Any


def from_graph(graph: Graph | str | Path, *, operators: dict[str, Operator] | None = None) -> SageJob:
    """A SAGE job for a pipeline graph: a `Graph` (the DSL's `Pipeline.graph()`), or a YAML file or shipped graph's
    name as `sagellm run` takes it. `operators`: instances built by the caller for some nodes (a prepared source)."""
    if not isinstance(graph, Graph):
        from sagellm import graphs
        from sagellm.runtime.pipeline.yaml_io import load_pipeline

        graph = load_pipeline(graphs.find(str(graph)))
    return SageJob(graph, operators=operators)


class SageJob:
    """One run of a graph in a SAGE `LocalEnvironment`; `run()` returns when every request has ended."""

    def __init__(self, graph: Graph, *, operators: dict[str, Operator] | None = None) -> None:
        self.graph = graph
        self.executor = LocalExecutor(graph, operators=operators)  # opens the operators, keeps the shared context
        self.ledger = self.executor.ledger
        self.order = [node.id for node in graph.topological_order()]
        self.downstream = {n: [e.dst for e in graph.edges if e.src == n] for n in self.order}
        self.upstream = {n: [e.src for e in graph.edges if e.dst == n] for n in self.order}
        self.lock = threading.RLock()  # operator logic run from SAGE's threads (and the ledger), one at a time
        self.ended: set[str] = set()  # source, queue and engine nodes whose SAGE source has stopped
        self.emitted = 0  # items the job's SAGE sources handed on so far
        self.engines: dict[str, StepHost | StreamHost] = {}  # Step and Stream nodes, each on its own thread
        self.pumps: dict[str, SourcePump] = {}
        # per queue node, what its push sends on at once (a shed request's error): its pop source sends it first
        self.pending: dict[str, deque[Addressed]] = {n: deque() for n in self.order}

    @property
    def operators(self) -> dict[str, Operator]:
        return self.executor.operators

    def run(self, *, on_ready: Callable[[], None] | None = None) -> PipelineResult:
        """Opens every operator (engines load their models), then hands the pipeline to SAGE; `on_ready` is called
        in between, as requests start to flow."""
        _, runtime = sage_modules()
        default_logging()  # as `run_pipeline`: our events to stderr unless the app set up structlog itself
        trio.run(self.executor.open_operators)
        env = runtime.LocalEnvironment(f"sagellm-{self.graph.attrs.get('name', 'graph')}")
        try:
            self._check_kinds()
            self._start_threads()
            if on_ready is not None:
                on_ready()
            self._build(env)
            env.submit(autostop=True)  # returns when every SAGE source has stopped
        finally:
            for engine in self.engines.values():
                engine.stop()
            for op in self.operators.values():
                op.close()
            if getattr(env, "env_uuid", None):
                env.jobmanager.delete_job(env.env_uuid, force=True)  # SAGE's job table would keep this job alive
        with self.lock:
            self.ledger.fail_unfinished()
        return PipelineResult(self.ledger.outcomes, self.operators)

    # -- building the SAGE pipeline --------------------------------------------------------------------------------
    def _check_kinds(self) -> None:
        for node_id, op in self.operators.items():
            if not isinstance(op, SourceOperator | MapOperator | QueueOperator | StepOperator | StreamOperator):
                raise OperatorError(f"node {node_id!r}: a {op.kind} operator ({op.name!r}) cannot run in a SAGE job")

    def _start_threads(self) -> None:
        for node_id, op in self.operators.items():
            if isinstance(op, StepOperator | StreamOperator):
                host = StepHost(node_id, op) if isinstance(op, StepOperator) else StreamHost(node_id, op)
                self.engines[node_id] = host
                host.start()
            elif isinstance(op, SourceOperator) and op.blocking:
                self.pumps[node_id] = SourcePump(node_id, op)
                self.pumps[node_id].start()

    def _build(self, env: Any) -> None:
        """Every node, in topological order, as SAGE transformations: its outputs are one DataStream of
        `Addressed` items, which each downstream node filters for its own."""
        streams: dict[str, Any] = {}
        for node_id in self.order:
            op = self.operators[node_id]
            if isinstance(op, SourceOperator):
                streams[node_id] = env.from_source(self._function(_NodeSource, node_id))
                continue
            inputs = [streams[src].filter(self._function(_ForNode, node_id)) for src in self.upstream[node_id]]
            stream = inputs[0]
            if len(inputs) > 1:
                connected = inputs[0].connect(inputs[1])
                for more in inputs[2:]:
                    connected = connected.connect(more)
                stream = connected.map(self._function(_Merge, node_id))
            if isinstance(op, MapOperator):
                streams[node_id] = stream.flatmap(self._function(_NodeMap, node_id))
            elif isinstance(op, QueueOperator):
                stream.sink(self._function(_QueuePush, node_id))
                streams[node_id] = env.from_source(self._function(_QueuePop, node_id))
            else:
                stream.sink(self._function(_EngineSubmit, node_id))
                streams[node_id] = env.from_source(self._function(_EngineOutputs, node_id))

    def _function(self, kind: type, node_id: str) -> type:
        """A SAGE function class for one node (SAGE builds function classes itself, with no arguments here)."""
        foundation, _ = sage_modules()
        base = {
            _NodeSource: foundation.SourceFunction,
            _QueuePop: foundation.SourceFunction,
            _EngineOutputs: foundation.SourceFunction,
            _ForNode: foundation.FilterFunction,
            _Merge: foundation.MapFunction,
            _NodeMap: foundation.FlatMapFunction,
            _QueuePush: foundation.SinkFunction,
            _EngineSubmit: foundation.SinkFunction,
        }[kind]
        attrs = {"job": self, "node_id": node_id, "__module__": __name__, "__doc__": kind.__doc__}
        return type(f"{kind.__name__.strip('_')}_{node_id}", (kind, base), attrs)

    # -- what the functions share ----------------------------------------------------------------------------------
    def address(self, node_id: str, outputs: list[Any], *, observe_at_leaf: bool = True) -> list[Addressed]:
        """Where a node's outputs go: an `Emit` to its node, anything else to the first downstream node (as the
        executor sends them); at a leaf they have ended, and the ledger records them. Caller holds `lock`."""
        targets = self.downstream[node_id]
        if not targets:
            if observe_at_leaf:
                for out in outputs:
                    self.ledger.observe(out.item if isinstance(out, Emit) else out)
            return []
        addressed = []
        for out in outputs:
            if not isinstance(out, Emit):
                addressed.append(Addressed(targets[0], out))
            elif out.to in targets:
                addressed.append(Addressed(out.to, out.item))
            else:
                rid = getattr(out.item, "request_id", "?")
                addressed.append(Addressed(targets[0], internal_error(rid, node_id, f"no edge to {out.to!r}")))
        return addressed

    def inputs_ended(self, node_id: str) -> bool:
        """Everything upstream has stopped: no item will reach this node any more (SAGE dispatches synchronously,
        so a stopped source's last items were handed on before it stopped)."""
        return all(self._ended(src) for src in self.upstream[node_id])

    def _ended(self, node_id: str) -> bool:
        if isinstance(self.operators[node_id], MapOperator):
            return self.inputs_ended(node_id)
        return node_id in self.ended

    def room_below(self, node_id: str) -> bool:
        """Whether a queue may pop: the engines its items reach through Map nodes only (route, pd_split) have room
        for one more, and none has a request already routed to it waiting (it would pop past that one)."""
        engines = [self.engines[n] for n in self._engines_below(node_id)]
        rooms = [engine.room() for engine in engines]
        return not engines or (min(rooms) >= 0 and max(rooms) > 0)

    def _engines_below(self, node_id: str) -> list[str]:
        found, frontier, seen = [], list(self.downstream[node_id]), set()
        while frontier:
            nxt = frontier.pop()
            if nxt in seen:
                continue
            seen.add(nxt)
            if nxt in self.engines:
                found.append(nxt)
            elif isinstance(self.operators[nxt], MapOperator):
                frontier.extend(self.downstream[nxt])
        return found


class _NodeFunction:
    """What every generated SAGE function class carries (class attributes set by `SageJob._function`)."""

    job: SageJob
    node_id: str

    @property
    def op(self) -> Any:
        return self.job.operators[self.node_id]


class _Buffered(_NodeFunction):
    """A SAGE source hands on one item per call: what a poll brought beyond that waits here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ready: deque[Addressed] = deque()

    def stop(self) -> Any:
        self.job.ended.add(self.node_id)
        return sage_modules()[1].StopSignal(self.node_id)

    def next_ready(self) -> Addressed | None:
        if not self.ready:
            return None
        self.job.emitted += 1
        return self.ready.popleft()


class _NodeSource(_Buffered):
    """A source node. Each request enters the ledger as it is handed on, one at a time, as in the executor: the
    in-flight count admission reads then says what is really in the graph."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.polled: deque[Any] = deque()

    def execute(self) -> Any:
        job = self.job
        with job.lock:
            if not self.polled:
                pump = job.pumps.get(self.node_id)
                polled = pump.take() if pump is not None else self.op.poll()
                if polled is None:
                    return self.stop()
                self.polled.extend(polled)
            while self.polled and not self.ready:
                item = self.polled.popleft()
                if isinstance(item, Request):  # a failover attempt's first token says nothing of the queue
                    job.ledger.entered(item.request_id, None if item.retry else item.arrival_time)
                self.ready.extend(job.address(self.node_id, [item]))
            return self.next_ready()


class _ForNode(_NodeFunction):
    """Keeps the items addressed to this node."""

    def execute(self, data: Addressed) -> bool:
        return data.to == self.node_id


class _Merge(_NodeFunction):
    """A node fed by several nodes: their filtered streams, connected, pass through here into one."""

    def execute(self, data: Addressed) -> Addressed:
        return data


class _NodeMap(_NodeFunction):
    """A Map node; at a leaf, what reaches it has ended (recorded before the operator sees it, as the executor
    does), and what it returns goes nowhere."""

    def execute(self, data: Addressed) -> list[Addressed]:
        job = self.job
        with job.lock:
            leaf = not job.downstream[self.node_id]
            if leaf and not job.ledger.observe(data.item):
                return []  # a second terminal for a request: dropped
            outputs = apply_operator(self.node_id, self.op, self.op.execute, data.item)
            return job.address(self.node_id, outputs, observe_at_leaf=False)


class _QueuePush(_NodeFunction):
    """A queue node's input: pushes; what the push sends on at once leaves through the pop side, first."""

    def execute(self, data: Addressed) -> None:
        job = self.job
        with job.lock:
            immediate = apply_operator(self.node_id, self.op, self.op.push, data.item)
            job.pending[self.node_id].extend(job.address(self.node_id, immediate))


class _QueuePop(_Buffered):
    """A queue node's output: pops while the engines below have room and no routed request waits for one; until
    then requests stay in the queue, in its policy's order."""

    def execute(self) -> Any:
        job = self.job
        with job.lock:
            self.ready.extend(job.pending[self.node_id])
            job.pending[self.node_id].clear()
            if self.ready:
                return self.next_ready()
            if len(self.op) and job.room_below(self.node_id):
                item = self.op.pop()
                if item is not None:
                    self.ready.extend(job.address(self.node_id, [item]))
                    return self.next_ready()
            if not len(self.op) and job.inputs_ended(self.node_id):
                return self.stop()
            return None


class _EngineSubmit(_NodeFunction):
    """An engine node's input: hands the request to the engine's thread."""

    def execute(self, data: Addressed) -> None:
        self.job.engines[self.node_id].submit(data.item)


class _EngineOutputs(_Buffered):
    """An engine node's output: what its steps made, addressed on; stops once its inputs have and it is idle."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.emitted_before = -1  # the job's count of emitted items at this source's last call

    def execute(self) -> Any:
        job = self.job
        engine = job.engines[self.node_id]
        with job.lock:
            if not self.ready:
                self.ready.extend(job.address(self.node_id, engine.take_outputs()))
            if self.ready:
                return self.next_ready()
            if job.inputs_ended(self.node_id) and engine.idle():
                return self.stop()
            quiet, self.emitted_before = job.emitted == self.emitted_before, job.emitted
        if quiet:
            engine.wait(IDLE_WAIT_S)
        return None


__all__ = ["Addressed", "SageJob", "from_graph"]
