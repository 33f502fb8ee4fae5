"""The pipeline behind the gateway: runs a graph for as long as the server lives, takes requests in through its
HTTP source, and streams each request's items back to whoever submitted it.

The graph is the one the user chose (default `graphs/colocated.yaml`), served: its source nodes are replaced by the
`http_source`, its printing sinks (`stdout_sink`, `jsonl_sink`) dropped, and a `remote_engine` node added beside its
engines (fed by its route, feeding its metrics sink), so the same YAML runs as a batch job with `sagellm run` and as
a server with `sagellm serve`. Every item that reaches a leaf goes to the request's stream; the executor keeps no
per-request state after a request ends. The HTTP routes and the Python client's embedded mode both use this class.

The core is also the registry of instances every request chooses from: the graph's engine nodes, and the servers
attached at run time through the remote node (engine processes the gateway spawns, servers it only reaches). A
request names a model; the graph's own model runs on the graph's engines, any other on the attached instances that
serve it: one path, admission to metrics, for all."""

from __future__ import annotations

import itertools
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection
from typing import Any

import structlog
import trio

from sagellm.gateway.config import FailoverPolicy
from sagellm.gateway.errors import ApiError
from sagellm.gateway.request_stream import RequestStream
from sagellm.operators.admission import tokenize_request
from sagellm.operators.embedding import served_name
from sagellm.operators.http_source import HttpSource
from sagellm.operators.route import ROLES_FOR_PHASE
from sagellm.runtime.execution_graph.graph import Edge, Graph
from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.pipeline.messages import Request, RequestError, is_terminal
from sagellm.runtime.pipeline.operator import SourceOperator, get_operator

log = structlog.get_logger("sagellm.gateway")
SOURCE_NODE = "http"
REMOTE_NODE = "remote"
EMBEDDING_NODE = "embedding"
PRINTING_SINKS = ("stdout_sink", "jsonl_sink")
# Prompts longer than this are tokenized in a worker thread before they enter the graph (a short one costs less
# inline than the thread hop); a prompt longer than its context times MAX_CHARS_PER_TOKEN is refused untokenized.
OFF_LOOP_CHARS = 4096
MAX_CHARS_PER_TOKEN = 64
STALL_CHECK_S = 0.1  # how often running attempts are checked against their token deadlines
RECENT_REQUESTS = 10_000  # ended requests whose status is still kept (GET /v1/requests/{id})


def served_graph(graph: Graph, embedding_model: str | None = None) -> Graph:
    """The graph with one `http_source` in place of its sources, without its printing sinks, with the node that
    serves instances attached at run time and, given `embedding_model`, an embedding node beside its engines."""
    graph = graph.copy()
    sources = [n.id for n in graph.nodes.values() if issubclass(get_operator(n.op), SourceOperator)]
    if not sources:
        raise ValueError("the graph has no source node for the gateway to take the place of")
    targets = list(dict.fromkeys(e.dst for e in graph.edges if e.src in sources))
    for node_id in sources:
        graph.remove_node(node_id)
    for node_id in [n.id for n in graph.nodes.values() if n.op in PRINTING_SINKS]:
        graph.remove_node(node_id)
    graph.add("http_source", id=SOURCE_NODE)
    graph.edges += [Edge(SOURCE_NODE, dst, port=sum(e.dst == dst for e in graph.edges)) for dst in targets]
    _add_beside_engines(graph, "remote_engine", REMOTE_NODE)
    if embedding_model:
        name = served_name(embedding_model)
        if not _add_beside_engines(graph, "embedding", EMBEDDING_NODE, model=embedding_model, served_model_name=name):
            raise ValueError("the graph has no route in the gateway's process to send embedding requests to")
    leaves = [n for n in graph.nodes if not any(e.src == n for e in graph.edges)]
    remote = [n for n in leaves if graph.nodes[n].placement != "task"]
    if remote:
        raise ValueError(f"the gateway reads replies in its own process; place the leaf nodes {remote} as `task`")
    return graph


def _add_beside_engines(graph: Graph, op: str, node_id: str, **params: Any) -> bool:
    """Adds a node fed by every route of this process (a route in a worker process cannot see what is attached
    here) and feeding the first metrics sink; False when there is no such route."""
    routes = [n.id for n in graph.nodes.values() if n.op == "route" and n.placement == "task"]
    if not routes:
        return False
    graph.add(op, id=node_id, **params)
    graph.edges += [Edge(route, node_id, port=port) for port, route in enumerate(routes)]
    sink = next((n.id for n in graph.nodes.values() if n.op == "metrics_sink"), None)
    if sink is not None:
        graph.edges.append(Edge(node_id, sink, port=sum(e.dst == sink for e in graph.edges)))
    return True


class ServingCore:
    def __init__(
        self,
        graph: Graph,
        *,
        served_model_name: str | None = None,
        executor_args: Any = None,
        failover: FailoverPolicy | None = None,
        embedding_model: str | None = None,
    ) -> None:
        """`embedding_model`: also serve this embedding model, on a node of the graph (sagellm.operators.embedding)."""
        self.graph = served_graph(graph, embedding_model)
        self.failover = failover or FailoverPolicy()
        self.retries: Counter[tuple[str, bool]] = Counter()  # (failure code, resumed after tokens) -> retries
        self.source = HttpSource()
        self.model_name = served_model_name or str(graph.attrs.get("model") or "default")
        self.boot_id = uuid.uuid4().hex  # this run of the gateway: a server that joined it tells a restart by it
        self.executor_args = dict(executor_args or {})
        self.local: LocalExecutor | None = None  # the executor of this process's nodes, once running
        self.executor: Any = None  # the graph's executor (a ProcessExecutor when nodes run in other processes)
        self._streams: dict[str, RequestStream] = {}  # by the id of the attempt running now
        self._live: dict[str, RequestStream] = {}  # by the client's request id, until the request ends
        self._recent: OrderedDict[str, dict[str, Any]] = OrderedDict()  # ended requests' last status, oldest first
        self.new_id = RequestIds()

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Opens every operator (engines load their models), then serves until `shutdown()` and the graph drains."""
        args = dict(operators={SOURCE_NODE: self.source}, keep_outcomes=False, **self.executor_args)
        if any(node.placement != "task" for node in self.graph.nodes.values()):
            from sagellm.runtime.executor.process import ProcessExecutor

            executor: Any = ProcessExecutor(self.graph, **args)
            self.local = executor.executor
        else:
            executor = self.local = LocalExecutor(self.graph, **args)
        self.executor = executor
        self.local.ledger.on_leaf_item = self._deliver
        self.source.wake = self.local.wake_sources
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._expire_stalled)
            await executor.run(task_status=task_status)
            nursery.cancel_scope.cancel()
        for rid in list(self._streams):  # anything still open ends now (the executor failed it)
            self._end(rid, "the gateway stopped before the request finished")

    def shutdown(self) -> None:
        """No new requests; those in flight finish, then `run` returns."""
        self.source.finish()

    # -- requests -------------------------------------------------------------------------------------------------
    async def tokenize_long_prompts(self, requests: list[Request]) -> None:
        """Renders and tokenizes, in a worker thread, the prompts too long to tokenize on the event loop (which
        every stream and /health share), so admission finds their token ids ready; a prompt with more characters than
        the context could hold tokens is refused at once, before any tokenizing. Raises ApiError (400)."""
        await tokenize_prompts(requests, self.tokenizer, self.vocab_size, self.max_model_len, short_too=False)

    def submit(self, request: Request) -> RequestStream:
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is in use")
        if self.source.finished:
            raise ApiError(503, "the gateway is shutting down", code="unavailable")
        stream = self._streams[request.request_id] = RequestStream(self, request, self.failover)
        self._live[request.request_id] = stream
        self.source.submit(request)
        return stream

    def resubmit(self, stream: RequestStream, attempt: Request) -> bool:
        """Sends a stream's next attempt into the graph; False if the gateway is shutting down."""
        if self.source.finished:
            return False
        self._streams[attempt.request_id] = stream
        self.source.submit(attempt)
        return True

    def cancel(self, request_id: str) -> None:
        if self.local is not None and request_id in self._streams:
            self.local.cancel(request_id)

    def abandon(self, request_id: str) -> None:
        """Cancels an attempt whose stream gave up on it; whatever it still sends is dropped."""
        self.cancel(request_id)
        self._streams.pop(request_id, None)

    async def instance_ready(self, model: str | None, within_s: float, phase: str = "colocated") -> bool:
        """Waits up to `within_s` until an instance of `model` (None: the graph's) that can run a `phase` request
        whole (not a prefill worker alone) is healthy; False at once when none is healthy and none is being restarted
        (an attached server that stopped answering may never do so again: its clients are not kept waiting on it)."""
        whole = ROLES_FOR_PHASE["embed" if phase == "embed" else "colocated"]
        with trio.move_on_after(within_s):
            while True:
                fitting = [s for s in self.instances().values() if s.model == model and s.role in whole]
                if any(s.healthy for s in fitting):
                    return True
                if not any(s.recovering for s in fitting):  # nothing is on its way back either
                    return False
                await trio.sleep(0.1)
        return False

    def count_retry(self, code: str, resumed: bool) -> None:
        self.retries[code, resumed] += 1

    def ended(self, stream: RequestStream) -> None:
        """A request's client got its last item (or left): its status is kept among the recent ones."""
        self._live.pop(stream.request.request_id, None)
        self._recent[stream.request.request_id] = stream.status()
        while len(self._recent) > RECENT_REQUESTS:
            self._recent.popitem(last=False)

    def request_status(self, request_id: str) -> dict[str, Any] | None:
        """A request's status while it runs and for a while after (the last RECENT_REQUESTS ended); None: unknown."""
        stream = self._live.get(request_id)
        return stream.status() if stream is not None else self._recent.get(request_id)

    async def _expire_stalled(self) -> None:
        """Times out the attempts that stopped giving items (`RequestStream.expire_if_stalled`), a few times a
        second: deadlines are minutes by default, and a timer per stream wait would cost every token a cancel
        scope."""
        while True:
            await trio.sleep(STALL_CHECK_S)
            now = trio.current_time()
            for stream in list(self._streams.values()):
                stream.expire_if_stalled(now)

    def _deliver(self, item: Any) -> None:
        rid = getattr(item, "request_id", None)
        stream = self._streams.get(rid)
        if stream is None:
            return
        stream.deliver(item)
        if is_terminal(item):
            del self._streams[rid]

    def _end(self, rid: str, message: str) -> None:
        self._deliver(RequestError(request_id=rid, code="internal", message=message))

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    # -- the instances --------------------------------------------------------------------------------------------
    @property
    def remote(self) -> Any:
        """The node serving the instances attached at run time (None: the graph has no route in this process)."""
        return self.local.operators.get(REMOTE_NODE) if self.local is not None else None

    def attach(
        self, instance_id: str, model: str, endpoint: Any, *, healthy: bool = False, role: str = "colocated"
    ) -> Any:
        """Adds a server as an instance of `model` (a `remote_engine.Endpoint`; `role="embedding"` for an embedding
        server); returns its InstanceStats."""
        if self.remote is None:
            raise ApiError(
                409, "the served graph has no route in the gateway's process to send requests to other instances"
            )
        return self.remote.attach(instance_id, model, endpoint, healthy=healthy, role=role)

    def relocate(self, instance_id: str, url: str) -> None:
        """The attached server is now reached at `url` (its process was started again elsewhere)."""
        if self.remote is not None:
            self.remote.relocate(instance_id, url)

    def detach(self, instance_id: str) -> None:
        if self.remote is not None:
            self.remote.detach(instance_id)

    def models(self) -> list[str]:
        """The model names served: the graph's own generation model (if it has engines), then the others (its
        embedding model, those of attached instances that are not all failed), each once."""
        stats = self.instances().values()
        own = [self.model_name] if any(s.model is None for s in stats) else []
        others = [s.model for s in stats if s.model is not None and not s.failed]
        return list(dict.fromkeys([*own, *others]))

    def embedder(self, model: str) -> Any:
        """This process's embedding node serving `model` (its `dim` and `max_length`), or None."""
        return next((op for op in self.operators_of("embedding") if op.served_model_name == model), None)

    def embedding_model(self, name: str | None) -> str:
        """The embedding model a request asks for: the one named, else the first served (the gateway's own); a
        404 naming those served for any other."""
        served = self.embedding_models()
        if name is None and served:
            return served[0]
        if name in served:
            return name
        have = f"the embedding models here are {', '.join(map(repr, served))}" if served else "no embedding model here"
        message = f"the embedding model {name!r} does not exist; {have}"
        raise ApiError(404, message, param="model", code="model_not_found")

    def embedding_models(self) -> list[str]:
        """The embedding models served here or by attached instances, own first."""
        return list(dict.fromkeys(s.model for s in self.instances().values() if s.role == "embedding" and s.model))

    def instance_model(self, name: str | None) -> str | None:
        """A request's `Request.model` for the model a client named: None for the graph's own (or none named), the
        name itself for a model attached instances serve. Raises ApiError 404 for any other."""
        return instance_model(name, self.model_name, self._attached_models, self.models)

    def _attached_models(self) -> set[str | None]:
        """The models attached instances serve, also those whose instances all failed (a request learns why)."""
        return {s.model for s in self.instances().values()}

    # -- what the routes read -------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.local.graph_attrs.get("tokenizer") if self.local else None

    @property
    def vocab_size(self) -> int | None:
        """The graph's model's vocabulary (token ids are checked against it)."""
        config = self.local.graph_attrs.get("model_config") if self.local else None
        return getattr(config, "vocab_size", None)

    @property
    def sampling_defaults(self) -> dict[str, Any] | None:
        """The graph's model's own sampling defaults: what a request for it leaves unset takes."""
        return self.local.graph_attrs.get("sampling_defaults") if self.local else None

    @property
    def max_model_len(self) -> int | None:
        """The context the graph's engines serve (`served_context`): what /v1/models shows and prompts must fit."""
        return self.local.graph_attrs.get("max_model_len") if self.local else None

    def nodes_of(self, op_name: str) -> dict[str, Any]:
        """This process's operators of the served graph that run `op_name`, by node id."""
        operators = self.local.operators if self.local is not None else {}
        return {node_id: op for node_id, op in operators.items() if self.graph.nodes[node_id].op == op_name}

    def operators_of(self, op_name: str) -> list[Any]:
        return list(self.nodes_of(op_name).values())

    def metrics_snapshot(self) -> Any:
        sinks = self.operators_of("metrics_sink")
        return sinks[0].get_metrics() if sinks else None

    def instances(self) -> dict[str, Any]:
        return dict(self.local.instances) if self.local else {}

    def set_policy(self, policy: str, policy_args: dict[str, float] | None = None) -> list[str]:
        """Switches every policy queue of the graph to `policy`, keeping what waits in it; returns the node ids."""
        queues = self.nodes_of("policy_sort")
        if not queues:
            raise ValueError("the served graph has no policy_sort node")
        for queue in queues.values():
            queue.switch_policy(policy, policy_args)
        log.info("policy_set", policy=policy, nodes=list(queues))
        return list(queues)


async def tokenize_prompts(
    requests: list[Request], tokenizer: Any, vocab: int | None, max_model_len: int | None, *, short_too: bool
) -> None:
    """Fills the token ids of the requests for the graph's own model: those longer than OFF_LOOP_CHARS in a worker
    thread, the short ones (`short_too`) inline, where a thread hop would cost more than the tokenizing. A prompt
    with more characters than the context could hold tokens is refused before any tokenizing. Raises ApiError (400)
    for a prompt that cannot be tokenized or is too long."""
    ours = [r for r in requests if r.model is None and r.prompt_token_ids is None]  # others' servers tokenize theirs
    long = [r for r in ours if _characters(r) > OFF_LOOP_CHARS]
    short = [r for r in ours if _characters(r) <= OFF_LOOP_CHARS] if short_too else []
    limit = (max_model_len or 0) * MAX_CHARS_PER_TOKEN
    for request in long:
        if limit and _characters(request) > limit:
            raise ApiError(
                400,
                f"the prompt has {_characters(request)} characters; this model's context of {max_model_len} "
                f"tokens holds at most about {limit}",
                code="context_length_exceeded",
            )
    problems = [tokenize_request(r, tokenizer, vocab) for r in short]
    if long:
        problems += await trio.to_thread.run_sync(lambda: [tokenize_request(r, tokenizer, vocab) for r in long])
    for problem in problems:
        if problem is not None:
            raise ApiError(400, problem, code="invalid_request")


class RequestIds:
    """Request ids, unique across processes and runs: `prefix-<this generator's random part>-<serial>`."""

    def __init__(self) -> None:
        self._serial = itertools.count()
        self._part = uuid.uuid4().hex[:8]

    def __call__(self, prefix: str = "req") -> str:
        return f"{prefix}-{self._part}-{next(self._serial)}"


def instance_model(
    name: str | None, own: str, attached: Callable[[], Collection[str | None]], served: Callable[[], list[str]]
) -> str | None:
    """A request's `Request.model` for the model a client named: None for the graph's own (`own`, or none named),
    the name itself for a model attached instances serve. Raises ApiError 404, naming the `served` ones, for any
    other. `attached` and `served` are asked only for another model's name: most requests name the graph's own."""
    if name is None or name == own:
        return None
    if name in attached():
        return name
    served_names = ", ".join(repr(m) for m in served())
    raise ApiError(
        404, f"the model {name!r} does not exist here; this server has {served_names}", param="model",
        code="model_not_found",
    )  # fmt: skip


def _characters(request: Request) -> int:
    """A prompt's length in characters: its text, or the text of its chat messages."""
    if request.prompt is not None:
        return len(request.prompt)
    return sum(len(m.get("content") or "") for m in request.messages or () if isinstance(m.get("content"), str))
