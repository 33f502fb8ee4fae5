"""What a pipeline operator is: five kinds of logic that the executors drive, and the registry by name.

As in SAGE, operator logic does no I/O and never waits: the executor (trio tasks in one process, or a process on a
ZeroMQ link) owns every channel, thread and socket, so the same operator runs unchanged under either placement. The
one exception is the kind whose whole job is a conversation with a server outside the graph.
- `SourceOperator`: `poll()` returns new items (or None at the end); the executor calls it off the event loop when
  the source is `blocking` (stdin), inline otherwise.
- `MapOperator`: `execute(item)` returns an item, a list of items, or None (dropped); an error item is an item too.
- `QueueOperator`: `push(item)`, `pop()`; the executor pops only when downstream has room, so a queue's order is
  exactly what reaches the engines under load.
- `StepOperator`: `add(item)`, `step() -> items`, `has_work()`; the executor runs `step()` off the event loop, in
  vLLM's busy-loop-fed-by-a-queue shape. Prefill and decode engines are Step operators.
- `StreamOperator`: `serve(item)` is an async generator of the item's outputs; the executor runs one trio task per
  item (at most `capacity()` at once) and cancels it when the request's client leaves. The engine instances reached
  over HTTP (an OpenAI-compatible server) are served by one.

An operator with several downstream nodes either returns `Emit(to=node_id, item=...)` to choose one, or plain items,
which go to every downstream node. `OperatorContext` tells an operator its downstream node ids and gives it the
shared `InstanceStats` of the engine instances, which route, pd_split and the policies read. An instance is usually an
engine node itself; instances that come and go at run time (servers the gateway reaches) are served through one node
(`InstanceStats.node`), which route emits to with the chosen instance named in the request."""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, get_type_hints

from sagellm.common.errors import InvalidInput
from sagellm.common.registry import Registry, load_entry_points
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.pipeline.health_changes import health_changed

RECENT_ENDS = 64  # served requests whose end times give the rate slots free at
RECENT_TTFTS = 256  # first-token times the graph keeps (admission judges windows of them)
HEALTH_FIELDS = frozenset({"healthy", "starting", "recovering", "failed"})  # what `state` and `on_its_way` read


class OperatorError(InvalidInput):
    """An operator that does not exist or was given parameters it does not take."""


@dataclass(frozen=True)
class Emit:
    """An item addressed to one downstream node (by node id) of an operator with several outputs."""

    to: str
    item: Any


@dataclass
class InstanceStats:
    """What the control operators know about one engine node; the executor and the engine's Step operator keep it
    current (in-process directly, across processes from heartbeats)."""

    name: str
    role: str = "colocated"  # "colocated" | "prefill" | "decode"
    node: str | None = None  # the graph node that serves this instance (None: the engine node `name` itself)
    model: str | None = None  # the model name clients ask it for (None: the graph's own model)
    healthy: bool = True
    max_running: int = EngineConfig.max_num_seqs  # requests the engine runs at once
    running: int = 0  # requests admitted and not yet finished
    queued_prefill_tokens: int = 0  # uncached prompt tokens waiting or in prefill
    queued_decode_tokens: int = 0  # output tokens still to generate for running requests
    price_per_1k_tokens: float = 0.0  # cost_optimized reads it; set per node in the graph
    tokens_per_s: float = 100.0  # prefill rate: prompt tokens a second in the steps that compute some; predicts TTFT
    kv_transfer_failures: int = 0  # consecutive failed transfers into this node; pd_split avoids unhealthy PD
    waiting: int = 0  # requests admitted to the engine and not yet scheduled (vLLM's num_requests_waiting)
    kv_cache_usage: float = 0.0  # fraction of KV cache blocks in use
    prefix_cache_queries: int = 0  # prompt blocks looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # ... and found there
    kv_offload_ram_bytes: int = 0  # the tiers under its prefix cache (kv_tiers/): bytes in RAM ...
    kv_offload_disk_bytes: int = 0  # ... and on disk
    kv_offload_stored_blocks: int = 0  # blocks put in the tiers, since start ...
    kv_offload_loaded_blocks: int = 0  # ... and loaded back
    # Where its engine publishes its KV events (kv_events_config): what `cache_aware` routing follows to know exactly
    # which blocks it holds, in its pages and the tiers under them
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None
    # Where it serves the blocks it holds to the other instances, and the token it asks for (operators/kv_block_serving)
    kv_blocks_endpoint: str | None = None
    kv_blocks_token: str | None = None
    spec_decode_num_drafts: int = 0  # speculative decoding since start: verifications of proposed tokens
    spec_decode_num_draft_tokens: int = 0  # ... tokens proposed
    spec_decode_num_accepted_tokens: int = 0  # ... and accepted
    threads: int = 0  # the threads its steps compute with now (runtime/engine/thread_governor.py); 0: not said
    recovering: bool = False  # unhealthy while its lost process is being started again
    starting: bool = False  # unhealthy until its first start is done (a server registered, not yet probed)
    problem: str | None = None  # why it is unhealthy, when its keeper knows (an attached server: "failed: ...")
    failed: bool = False  # its keeper gave up bringing it back (it could not start, or died too often)
    sleep_level: int = 0  # asleep: 1 its KV cache freed, 2 its weights too (vLLM's sleep mode); 0 awake

    def __post_init__(self) -> None:
        health_changed()  # a new instance: one waiting for an instance of its model may take it

    def __setattr__(self, name: str, value: Any) -> None:
        """Every write goes through here, so a change of health, whoever writes it, wakes its waiters."""
        changes = name in HEALTH_FIELDS and getattr(self, name) != value
        super().__setattr__(name, value)
        if changes:
            health_changed()

    def lose(self, *, recovering: bool = False) -> None:
        """The engine's process is gone: unhealthy, and nothing is running or queued on it any more (its requests
        ended with `instance_lost`), so no gauge keeps reporting a dead engine's last load. `recovering`: a new
        process is on its way (health reports it so; the next heartbeat of that process makes it healthy)."""
        self.healthy, self.recovering = False, recovering
        self.running = self.waiting = self.queued_prefill_tokens = self.queued_decode_tokens = 0
        self.kv_cache_usage = 0.0

    @property
    def state(self) -> str:
        """ready | starting (not yet up the first time) | recovering (its process is being started again) | lost
        (unhealthy, nothing on its way)."""
        if self.healthy:
            return "ready"
        return "starting" if self.starting else "recovering" if self.recovering else "lost"

    @property
    def on_its_way(self) -> bool:
        """Unhealthy, but starting or being restarted: a request may wait for it."""
        return not self.healthy and (self.starting or self.recovering)

    @property
    def target(self) -> str:
        """The node a request for this instance is sent to."""
        return self.node or self.name

    @property
    def predicted_work(self) -> int:
        """Load in one unit, tokens: what a new request would wait behind (cache_aware adds its own prefill)."""
        return self.queued_prefill_tokens + self.queued_decode_tokens

    @property
    def saturated(self) -> bool:
        return self.running >= self.max_running

    @property
    def scheduled(self) -> int:
        """Requests the engine is computing now: `running` counts every request given to it, `waiting` too."""
        return max(self.running - self.waiting, 0)


@dataclass
class PipelineLoad:
    """Counters of the whole graph the executor keeps from what enters and what ends: admission bounds `in_flight`
    (and adapts the bound to the recent TTFTs), the adaptive policy reads the SLO-violation rate."""

    in_flight: int = 0  # requests past the source that have not reached a terminal item
    # Tokens admission let in (prompt plus completion bound) by request id, until the request ends; and their sum.
    admitted_tokens: dict[str, int] = field(default_factory=dict)
    tokens_in_flight: int = 0
    completed: int = 0
    failed: int = 0
    slo_checked: int = 0  # finished requests that had an SLO
    slo_violations: int = 0
    # Time to first token of the latest requests that got one (seconds, recorded as the token reaches a leaf), how
    # many ever did, and the arrival time of the oldest request still waiting for its first: admission adapts its
    # bound to them. Measured, not judged against any request's own target, so no client can tighten the bound.
    recent_ttfts: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_TTFTS))
    ttfts_seen: int = 0
    oldest_waiting: float | None = None
    # When the latest requests that were served (not refused) ended, on the wall clock: how fast slots free.
    recent_ends: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_ENDS))

    @property
    def slo_violation_rate(self) -> float:
        return self.slo_violations / self.slo_checked if self.slo_checked else 0.0

    def admit_tokens(self, request_id: str, tokens: int) -> None:
        self.tokens_in_flight += tokens - self.admitted_tokens.get(request_id, 0)
        self.admitted_tokens[request_id] = tokens

    def release_tokens(self, request_id: str) -> None:
        self.tokens_in_flight -= self.admitted_tokens.pop(request_id, 0)

    def drain_s(self, count: int, now: float) -> float | None:
        """Seconds until `count` more requests end at the rate the latest ones did (None: too few ended to say).
        The rate is the latest ends over the time since the first of them, so a pause in ending slows it."""
        ends = self.recent_ends
        if len(ends) < 2 or now <= ends[0]:
            return None
        return count * (now - ends[0]) / len(ends)


@dataclass
class OperatorContext:
    """Given to `Operator.open`: the node's id, its downstream node ids, and the engines' shared stats."""

    node_id: str
    outputs: list[str] = field(default_factory=list)
    instances: dict[str, InstanceStats] = field(default_factory=dict)
    load: PipelineLoad = field(default_factory=PipelineLoad)
    graph_attrs: dict[str, Any] = field(default_factory=dict)  # the graph's, as written: its `model`, ...
    remote_outputs: list[str] = field(default_factory=list)  # the downstream nodes another process runs

    def instances_among(self, nodes: list[str]) -> list[InstanceStats]:
        """The instances served by the given downstream nodes (route's candidates): the nodes' own, in the given
        order, then the ones that came at run time, in the order they came."""
        own = [self.instances[n] for n in nodes if n in self.instances and self.instances[n].node is None]
        came = [s for s in list(self.instances.values()) if s.node is not None and s.node in nodes]
        return own + came


class Operator:
    """Base of the four kinds. Parameters are keyword arguments of `__init__` with type hints: the YAML loader and the
    DSL check values against them (`parameters`), then build the operator once, so the range checks its constructor
    makes (raising `FieldError` naming the parameter) also fail at load time, at the parameter's line. Constructors
    must therefore be cheap and touch nothing outside the object: models load and files open in `open`."""

    name: ClassVar[str] = ""  # registry name, as written in YAML `op:`
    kind: ClassVar[str] = ""
    # Item types the logic handles; any other item passes through unchanged (to the first output). Empty: all.
    accepts: ClassVar[tuple[type, ...]] = ()
    # Whether the node may have several downstream nodes; it must then address what it returns with `Emit`.
    multi_output: ClassVar[bool] = False
    # Whether the node writes replies out of the process itself (stdout, a file): a server drops such sinks, since
    # its clients get the replies.
    writes_replies: ClassVar[bool] = False
    # The parameter that sets the torch threads the node computes with ("": none): engines in processes of their own
    # on one host get a share of its cores each through it (`runtime.executor.core_shares`).
    threads_param: ClassVar[str] = ""
    # Whether what the node does with a traced request is a span of its trace (`operator_calls.apply_operator`)
    traced: ClassVar[bool] = True

    @classmethod
    def parameters(cls) -> dict[str, tuple[Any, bool]]:
        """name -> (type hint, required), read from `__init__`'s signature."""
        signature = inspect.signature(cls.__init__)
        hints = get_type_hints(cls.__init__)
        params: dict[str, tuple[Any, bool]] = {}
        for pname, p in signature.parameters.items():
            if pname == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            params[pname] = (hints.get(pname, Any), p.default is inspect.Parameter.empty)
        return params

    @classmethod
    def instance_stats(cls, node_id: str, params: dict[str, Any]) -> InstanceStats | None:
        """The stats of the engine instance a node of this operator is (None: not an engine), made before any
        operator opens so route sees every instance, remote ones too, with its role and size from the start."""
        return None

    def open(self, ctx: OperatorContext) -> None:
        """Called once before the first item, in the process that runs the node."""
        self.ctx = ctx

    def close(self) -> None:
        """Called once after the last item (also after an error); release engines, files, threads."""


class SourceOperator(Operator):
    kind = "source"
    blocking: ClassVar[bool] = False  # True: poll() may block (stdin), so the executor runs it in a thread
    # True: whoever feeds the source calls the executor's `wake_sources()`, so an idle source needs no polling tick
    # (a gateway that waits for clients for hours should not wake 200 times a second).
    wakes: ClassVar[bool] = False

    def poll(self) -> list[Any] | None:
        """New items (possibly none yet), or None when the source is exhausted."""
        raise NotImplementedError


class MapOperator(Operator):
    kind = "map"

    def execute(self, item: Any) -> Any | list[Any] | None:
        raise NotImplementedError


class QueueOperator(Operator):
    kind = "queue"

    def push(self, item: Any) -> list[Any]:
        """Enqueues; returns items to send on at once (e.g. errors for requests the queue sheds)."""
        raise NotImplementedError

    def pop(self) -> Any | None:
        raise NotImplementedError

    def withdraw(self, request_ids: set[str]) -> list[Any]:
        """Removes and returns the waiting items of these requests (their clients left), so they end at once
        instead of when they reach an engine; a queue that cannot returns none."""
        return []

    def __len__(self) -> int:
        raise NotImplementedError


class StepOperator(Operator):
    kind = "step"
    inline: ClassVar[bool] = False  # True: step() is cheap (no model), run it on the event loop, not in a thread
    sleeps: ClassVar[bool] = False  # True: it gives its memory back while idle (`sleep`, `wake_up`)
    sleep_level = 0  # how deep it sleeps: 0 awake, 1 its KV cache freed, 2 its weights too

    def add(self, item: Any) -> list[Any]:
        """Takes an item in; returns items to send on at once (errors, pass-through of items it does not handle)."""
        raise NotImplementedError

    def step(self) -> list[Any]:
        """One unit of work (an engine step); blocking, so the executor runs it off the event loop."""
        raise NotImplementedError

    def has_work(self) -> bool:
        raise NotImplementedError

    def capacity(self) -> int:
        """How many more items it wants now; the executor leaves the rest upstream (in a policy queue)."""
        return 1 << 30

    def in_flight(self) -> list[str]:
        """Request ids this operator holds: the executor fails them if `step()` raises."""
        return []

    def abort(self, request_ids: list[str]) -> None:
        """Forgets the given requests (they failed or their client left); frees what they hold."""

    def sleep(self, level: int) -> None:
        """Frees its memory while it holds no request (vLLM's sleep mode: level 1 its KV cache, 2 its weights too),
        for an operator that `sleeps`; blocking, so its host calls it off the event loop."""
        raise NotImplementedError

    def wake_up(self, level: int = 0) -> None:
        """Serves again after `sleep` (`level` 0), or holds its weights alone (1, from level 2); blocking, as
        `sleep`."""
        raise NotImplementedError


class StreamOperator(Operator):
    kind = "stream"

    def capacity(self) -> int:
        """How many items it serves at once; the executor leaves the rest upstream."""
        return 1 << 30

    def serve(self, item: Any) -> AsyncIterator[Any]:
        """An async generator of `item`'s outputs (for a request: its deltas, then exactly one terminal). Cancelled
        when the request's client leaves: its `finally` closes what it opened; the executor sends the terminal."""
        raise NotImplementedError

    async def drained(self) -> None:
        """Called once after the last item was served: close connections (`close()` cannot await)."""


OPERATORS: Registry[type[Operator]] = Registry(
    "operator", discover=load_entry_points("sagellm.operators"), error=OperatorError
)
register_operator = OPERATORS.register
get_operator = OPERATORS.get


def list_operators() -> dict[str, type[Operator]]:
    return dict(sorted(OPERATORS.items().items()))


def parameter_types(cls: type[Operator]) -> dict[str, tuple[Any, bool]]:
    """The operator's parameters: name -> (type hint, required)."""
    return cls.parameters()


def nodes_running(graph: Graph, kind: type[Operator]) -> list[str]:
    """The ids of `graph`'s nodes whose operator is a `kind` (a base class such as SourceOperator, or one operator's
    class), in node order: what a pass that edits a pipeline graph selects by, rather than operator names."""
    return [node.id for node in graph.nodes.values() if issubclass(get_operator(node.op), kind)]
