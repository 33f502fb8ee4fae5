"""The pipeline behind the gateway: runs the served graph (`served_graph`) for as long as the server lives, takes
requests in through its HTTP source, and streams each request's items back to whoever submitted it.

Every item that reaches a leaf goes to the request's stream; the executor keeps no per-request state after a request
ends. The HTTP routes and the Python client's embedded mode both use this class; the instances a request chooses from
are its `registry` (`instances.InstanceRegistry`), which the control plane attaches servers to."""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter, OrderedDict, defaultdict
from typing import Any

import msgspec
import structlog
import trio

from sagellm.common.errors import InvalidInput
from sagellm.gateway.config import FailoverPolicy
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.errors import api_error
from sagellm.gateway.serving.instances import InstanceRegistry
from sagellm.gateway.serving.kv_outbox import KVOutbox
from sagellm.gateway.serving.lora_modules import LoraModules
from sagellm.gateway.serving.prompts import RequestIds, tokenize_prompts
from sagellm.gateway.serving.request_stream import RequestStream
from sagellm.gateway.serving.served_graph import SOURCE_NODE, served_graph
from sagellm.operators.admission import Admission
from sagellm.operators.engine import ENGINE_OPERATORS
from sagellm.operators.http_source import HttpSource
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.pipeline.messages import LoraRef, Request, RequestError, TokenDelta, is_terminal
from sagellm.runtime.pipeline.served_model import ServedModel

log = structlog.get_logger("sagellm.gateway")
STALL_CHECK_S = 0.1  # how often running attempts are checked against their token deadlines
RECENT_REQUESTS = 10_000  # ended requests whose status is still kept (GET /v1/requests/{id})
HOLD_S = 30.0  # longest a request between `model_ready` and its submission keeps its model busy


class ServingCore:
    def __init__(
        self,
        graph: Graph,
        *,
        served_model_name: str | None = None,
        model_aliases: list[str] | None = None,
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
        # ended requests' owner and last status, oldest first
        self._recent: OrderedDict[str, tuple[str, dict[str, Any]]] = OrderedDict()
        self._live_of_model: Counter[str | None] = Counter()  # requests live, by `Request.model`
        # Requests between `model_ready` and their submission, by `Request.model`: the deadlines of their holds.
        self._arriving: defaultdict[str | None, list[float]] = defaultdict(list)
        self._fewer = trio.Event()  # set as a request ends: whoever waits for a model's requests to end looks again
        # The models loaded on demand (`control.model_pool.ModelPool`), when the gateway has any.
        self.models_on_demand: Any = None
        self.sleep_mode: Any = None  # `control.sleep_mode.SleepMode`: the graph's engines asleep and woken
        self.new_id = RequestIds()
        self.registry = InstanceRegistry(self.model_name, lambda: self.local, model_aliases or ())
        self.lora = LoraModules(self.graph)  # LoRA adapters of the graph's model, requests' `model` names
        self.registry.lora_parents = self.lora.parents
        self.kv_outbox = KVOutbox()  # prefills run here for decode servers elsewhere (vLLM's kv_transfer_params)

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
    async def tokenize_prompts(self, requests: list[Request], every: bool = False) -> None:
        """Renders and tokenizes, in a worker thread, the prompts (and bad words) too long to tokenize on the event
        loop (which every stream and /health share), so admission finds their token ids ready; `every`: the short
        ones too (a reply that shows the prompt's tokens). A prompt with more characters than the context could
        hold tokens is refused at once, before any tokenizing. Raises ApiError (400)."""
        await tokenize_prompts(requests, self.tokenizer, self.vocab_size, self.max_model_len, short_too=every)

    def submit(self, request: Request) -> RequestStream:
        """A client's request of one prompt, admitted or refused on arrival (`submit_all`). Raises ApiError."""
        return self.submit_all([request])[0]

    def resubmit(self, stream: RequestStream, attempt: Request) -> bool:
        """Sends a stream's next attempt into the graph; False if the gateway is shutting down."""
        if self.source.finished:
            return False
        self._streams[attempt.request_id] = stream
        self.source.submit(attempt)
        return True

    def submit_all(self, requests: list[Request]) -> list[RequestStream]:
        """A client's request, its prompts admitted or refused as a whole on arrival (`Admission.admit_group`): a
        refused one raises its 429 (or 400) before any prompt enters, counted in the graph's metrics as the
        admission node would have. Raises ApiError."""
        if self.source.finished:
            raise ApiError(503, "the gateway is shutting down", code="unavailable")
        for request in requests:
            if request.request_id in self._streams:
                raise InvalidInput(f"request id {request.request_id!r} is in use")
        for admission in self._admissions():
            refusal = admission.admit_group(requests, waiting=len(self.source))
            if refusal is not None:
                self._count_refusal(refusal, requests)
                raise api_error(refusal, param="prompt" if refusal.code == "invalid_request" else None)
        streams = []
        for request in requests:
            stream = self._streams[request.request_id] = RequestStream(self, request, self.failover)
            self._live[request.request_id] = stream
            self._live_of_model[request.model] += 1
            self.source.submit(request)
            streams.append(stream)
        if requests and self._arriving[requests[0].model]:
            self._arriving[requests[0].model].pop(0)  # it is live now
        return streams

    def cancel(self, request_id: str) -> None:
        """Aborts an attempt wherever it is: taken back while it waits for an engine, else aborted where it runs."""
        if not self.take_back(request_id) and self.local is not None and request_id in self._streams:
            self.local.cancel(request_id)

    def take_back(self, request_id: str) -> bool:
        """Ends an attempt still waiting for an engine (not yet polled from the source, or in a policy queue here);
        False, and nothing done, when it reached one. What it still sends is dropped."""
        if request_id not in self._streams:
            return False
        taken = self.source.withdraw(request_id) or (self.local is not None and self.local.withdraw(request_id))
        if taken:
            del self._streams[request_id]
        return taken

    def _admissions(self) -> list[Admission]:
        operators = self.local.operators.values() if self.local is not None else ()
        return [op for op in operators if isinstance(op, Admission)]

    def _count_refusal(self, refusal: RequestError, requests: list[Request]) -> None:
        """A refusal at the door, one for each of its prompts, in the metrics of the graph's sinks here."""
        for sink in self.nodes_of("metrics_sink").values():
            for request in requests:
                sink.execute(msgspec.structs.replace(refusal, request_id=request.request_id))

    def abandon(self, request_id: str) -> None:
        """Cancels an attempt whose stream gave up on it; whatever it still sends is dropped."""
        self.cancel(request_id)
        self._streams.pop(request_id, None)

    def count_retry(self, code: str, resumed: bool) -> None:
        self.retries[code, resumed] += 1

    def ended(self, stream: RequestStream) -> None:
        """A request's client got its last item (or left): its status is kept among the recent ones."""
        if self._live.pop(stream.request.request_id, None) is not None:
            self._live_of_model[stream.request.model] -= 1
            self._fewer.set()
            self._fewer = trio.Event()
        self._recent[stream.request.request_id] = (stream.request.owner, stream.status())
        while len(self._recent) > RECENT_REQUESTS:
            self._recent.popitem(last=False)

    def request_status(self, request_id: str, owner: str) -> dict[str, Any] | None:
        """A request's status while it runs and for a while after (the last RECENT_REQUESTS ended), for its `owner`
        alone; None: unknown, or another's."""
        stream = self._live.get(request_id)
        if stream is not None:
            return stream.status() if stream.request.owner == owner else None
        recent_owner, status = self._recent.get(request_id, ("", None))
        return status if recent_owner == owner else None

    async def _expire_stalled(self) -> None:
        """Times out the attempts that stopped giving items (`RequestStream.expire_if_stalled`), a few times a
        second: deadlines are minutes by default, and a timer per stream wait would cost every token a cancel
        scope."""
        queue_timeout_s = self.failover.queue_timeout_s
        while True:
            await trio.sleep(STALL_CHECK_S)
            now, wall = trio.current_time(), time.time()
            for stream in list(self._streams.values()):
                stream.expire_if_stalled(now)
                if queue_timeout_s is not None:
                    stream.expire_if_queued_too_long(wall, queue_timeout_s)

    def _deliver(self, item: Any) -> None:
        rid = getattr(item, "request_id", None)
        stream = self._streams.get(rid)
        if stream is None:
            return
        if isinstance(item, TokenDelta) and item.kv is not None:  # a prefill for a decode server: its KV waits here
            prompt = stream.attempt.prompt_token_ids or []
            self.kv_outbox.put(stream.request.request_id, prompt, item.token_ids[0], item.kv.data, item.kv.states)
            item = msgspec.structs.replace(item, kv=None)
        stream.deliver(item)
        if is_terminal(item):
            del self._streams[rid]

    def _end(self, rid: str, message: str) -> None:
        self._deliver(RequestError(request_id=rid, code="internal", message=message))

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    # -- what the OpenAI routes ask of the instances (an API server's RemoteCore answers the same) --------------
    def models(self) -> list[str]:
        return self.registry.models()

    def embedder(self, model: str) -> Any:
        return self.registry.embedder(model)

    def embedding_model(self, name: str | None) -> str:
        return self.registry.embedding_model(name)

    def instance_model(self, name: str | None) -> str | None:
        return self.registry.instance_model(name)

    async def model_ready(self, model: str | None, submits: bool = True) -> None:
        """Waits until `model` (a request's `Request.model`) can serve: the graph's woken when it sleeps, one loaded
        on demand loaded (raises ApiError 503 when that cannot be in time); returns at once for any other.
        `submits`: a request of it follows, which keeps the model busy (not unloaded, not put to sleep) until it is
        submitted, or HOLD_S (a tokenizer route's call submits none)."""
        pool = self.models_on_demand
        if model is None and self.sleep_mode is not None:
            await self.sleep_mode.awake()
            if submits:
                self.hold(model)
        elif pool is not None and model is not None and model in pool.models:
            await pool.ready(model, hold=submits)  # held the moment it serves, before another model's load may evict it

    def hold(self, model: str | None) -> None:
        """A request of `model` is on its way in (past `model_ready`): the model counts as busy (`requests_of`) until
        the request is submitted, or HOLD_S."""
        self._holds(model)  # the expired holds go
        self._arriving[model].append(time.monotonic() + HOLD_S)

    def ready_now(self, model: str | None) -> bool:
        """Whether a request of `model` may enter at once, with no wait in `model_ready`: not while the graph's
        engines sleep (or fall asleep), nor while a model on demand does not serve, unless a request of it is held on
        its way in (its API server's `ModelReady` was answered; the model's drain, if one began since, waits for it)."""
        if model is None:
            return self.sleep_mode is None or self.sleep_mode.serving
        pool = self.models_on_demand
        return pool is None or model not in pool.models or pool.models[model].serving or self._holds(model) > 0

    def engine_operators(self) -> list[Any]:
        """The graph's operators that run an LLMEngine in this process."""
        return [op for name in ENGINE_OPERATORS for op in self.nodes_of(name).values()]

    def lora_of(self, name: str | None) -> LoraRef | None:
        """The LoRA adapter a request's `model` names (None: a model, not an adapter)."""
        return self.lora.adapters.get(name) if name is not None else None

    def add_lora(self, name: str, path: str, base: str | None = None) -> LoraRef:
        """Serves the adapter in `path` as `name`, checked against its base model and the names served
        (`LoraModules.add`): `base` names a model loaded on demand (None, or the graph's model's name: the graph's).
        Raises ApiError 400 for a base not served here, or served by another project's server."""
        pool = self.models_on_demand
        if base is None and pool is not None and not self.registry.own_names():
            raise ApiError(400, f"base_model_name: name the model the adapter {name!r} is of; this server loads "
                                f"{', '.join(map(repr, pool.names()))}", param="base_model_name")  # fmt: skip
        if base is None or base in self.registry.own_names():
            return self.lora.add(name, path, self.served, set(self.models()))
        if pool is None or base not in pool.models:
            raise ApiError(400, f"base_model_name: {base!r} is not the graph's model nor one loaded on demand here",
                           param="base_model_name")  # fmt: skip
        spec = pool.models[base].spec
        if spec.kind != "llm":
            raise ApiError(400, f"base_model_name: the model {base!r} is served by a {spec.kind} server, which takes "
                                "its own adapters", param="base_model_name")  # fmt: skip
        served = self.registry.files_of(base)
        return self.lora.add(name, path, served, set(self.models()), parent=base, engine=spec.engine)

    def lora_adapters(self) -> list[tuple[LoraRef, str]]:
        """Every adapter served, with the name of the model it adapts."""
        parents = self.lora.parents
        return [(ref, parents.get(ref.name) or self.model_name) for ref in self.lora.adapters.values()]

    def requests_of(self, model: str | None) -> int:
        """Requests of `model` (a `Request.model`) the gateway answers now, or that are on their way in."""
        return self._live_of_model[model] + self._holds(model)

    def _holds(self, model: str | None) -> int:
        """Requests of `model` past `model_ready` and not yet submitted (the expired holds go)."""
        now = time.monotonic()
        holds = self._arriving[model] = [deadline for deadline in self._arriving[model] if deadline > now]
        return len(holds)

    async def until_idle(self, model: str | None) -> None:
        """Returns once `model` has no request (`requests_of` is 0): woken as requests end, and as holds expire."""
        while self.requests_of(model):
            holds = self._arriving[model]
            with trio.move_on_after(min(holds) - time.monotonic() if holds else math.inf):
                await self._fewer.wait()

    def engines_of_ours(self, model: str) -> bool:
        """Whether another model's instances are engines of ours (workers of the graph), not servers we only reach."""
        return self.registry.files_of(model) is not None

    # -- what the routes read -------------------------------------------------------------------------------------
    @property
    def served(self) -> ServedModel | None:
        """The graph's model as its front reads it (loaded by the HTTP source when the graph opened)."""
        return self.source.model

    @property
    def tokenizer(self) -> Any:
        return self.served.tokenizer if self.served is not None else None

    @property
    def vocab_size(self) -> int | None:
        """The graph's model's vocabulary (token ids are checked against it)."""
        return self.served.vocab_size if self.served is not None else None

    def sampling_defaults(self, model: str | None = None) -> dict[str, Any] | None:
        """A model's own sampling defaults (None: the graph's): what a request for it leaves unset takes; None for a
        model whose server applies its own."""
        if model is not None:
            return self.registry.sampling_defaults(model)
        return self.served.sampling_defaults if self.served is not None else None

    @property
    def max_model_len(self) -> int | None:
        """The context the graph's engines serve (`served_context`): what /v1/models shows and prompts must fit."""
        return self.served.max_model_len if self.served is not None else None

    def nodes_of(self, op_name: str) -> dict[str, Any]:
        """This process's operators of the served graph that run `op_name`, by node id."""
        operators = self.local.operators if self.local is not None else {}
        return {node_id: op for node_id, op in operators.items() if self.graph.nodes[node_id].op == op_name}


def metrics_snapshot(core: ServingCore) -> Any:
    """The served graph's metrics (its first `metrics_sink`'s); None for a graph without one."""
    sinks = list(core.nodes_of("metrics_sink").values())
    return sinks[0].get_metrics() if sinks else None
