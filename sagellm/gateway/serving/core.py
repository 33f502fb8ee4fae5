"""The pipeline behind the gateway: runs the served graph (`served_graph`) for as long as the server lives, takes
requests in through its HTTP source, and streams each request's items back to whoever submitted it.

Every item that reaches a leaf goes to the request's stream; the executor keeps no per-request state after a request
ends. The HTTP routes and the Python client's embedded mode both use this class; the instances a request chooses from
are its `registry` (`instances.InstanceRegistry`), which the control plane attaches servers to."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import trio

from sagellm.common.errors import InvalidInput, SageLLMError
from sagellm.gateway.config import FailoverPolicy
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.keys.tenants import Tenants
from sagellm.gateway.serving.access_log import AccessLog
from sagellm.gateway.serving.attempts import AttemptTable
from sagellm.gateway.serving.door import admit_at_door
from sagellm.gateway.serving.instances import InstanceRegistry
from sagellm.gateway.serving.kv_outbox import KVOutbox
from sagellm.gateway.serving.lora_modules import LoraModules
from sagellm.gateway.serving.prompts import RequestIds, tokenize_prompts
from sagellm.gateway.serving.readiness import ModelReadiness
from sagellm.gateway.serving.request_stream import RequestStream
from sagellm.gateway.serving.request_traces import RequestTraces
from sagellm.gateway.serving.served_graph import SOURCE_NODE, served_graph
from sagellm.operators.embedding import EmbeddingOperator
from sagellm.operators.engine import ENGINE_OPERATORS
from sagellm.operators.http_source import HttpSource
from sagellm.runtime.engine.lora_request import LoRARequest
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.local import LocalExecutor
from sagellm.runtime.executor.process import ProcessExecutor
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.served_model import ServedModel


class ServingCore:
    """The graph run for the gateway, and what the routes ask of it (`interface.ServingApi`). Its collaborators each
    keep one job: `attempts` the streams of the requests in flight, `readiness` whether a model serves now and what
    keeps it busy (the control room's gates registered there), `lora` the adapters served, `registry` the instances
    requests choose from."""

    def __init__(
        self,
        graph: Graph,
        *,
        served_model_name: str | None = None,
        model_aliases: list[str] | None = None,
        executor_args: Any = None,
        failover: FailoverPolicy | None = None,
        embedding_model: str | None = None,
        pooling_models: Sequence[str] = (),
        tenants: Tenants | None = None,
    ) -> None:
        """`embedding_model`: also serve this embedding model, on a node of the graph (sagellm.operators.embedding);
        `pooling_models`: and these (rerankers, classifiers, more embedding models), a node each; `tenants`: the
        API keys and their policies (None: none, the routes open)."""
        self.graph = served_graph(graph, embedding_model, pooling_models)
        self.failover = failover or FailoverPolicy()
        self.source = HttpSource()
        self.model_name = served_model_name or str(graph.attrs.get("model") or "default")
        self.boot_id = uuid.uuid4().hex  # this run of the gateway: a server that joined it tells a restart by it
        self.executor_args = dict(executor_args or {})
        self.local: LocalExecutor | None = None  # the executor of this process's nodes, once running
        self.executor: ProcessExecutor | None = None  # the graph's, which also hosts the managed engines of ours
        self.new_id = RequestIds()
        self.registry = InstanceRegistry(self.model_name, lambda: self.local, model_aliases or ())
        self.readiness = ModelReadiness(self.registry)
        self.lora = LoraModules(self.graph, self.registry, self.readiness, lambda: self.served)
        self.kv_outbox = KVOutbox()  # prefills run here for decode servers elsewhere (vLLM's kv_transfer_params)
        self.retries: Counter[tuple[str, bool]] = Counter()  # (failure code, resumed after tokens) -> retries
        self.tenants = tenants or Tenants([], None)
        self.attempts = AttemptTable(
            self.source, lambda: self.local, self.registry, self.readiness, self.kv_outbox, self.retries
        )
        self.traces = RequestTraces()
        self.access_log: AccessLog | None = None  # `--access-log`: a line a request
        self.attempts.on_ended = self._ended

    # -- lifecycle ------------------------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Opens every operator (engines load their models), then serves until `shutdown()` and the graph drains."""
        args = dict(operators={SOURCE_NODE: self.source}, keep_outcomes=False, **self.executor_args)
        self.executor = executor = ProcessExecutor(self.graph, **args)  # (with workers or not: it may host some)
        self.local = executor.executor
        self.local.ledger.on_leaf_item = self.attempts.deliver
        self.source.wake = self.local.wake_sources
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.attempts.expire_stalled, self.failover.queue_timeout_s)
            await executor.run(task_status=task_status)
            nursery.cancel_scope.cancel()
        self.attempts.end_all("the gateway stopped before the request finished")  # (the executor failed them)

    def shutdown(self) -> None:
        """No new requests; those in flight finish, then `run` returns."""
        self.source.finish()

    # -- requests -------------------------------------------------------------------------------------------------
    async def tokenize_prompts(self, requests: list[Request], every: bool = False) -> None:
        """Renders and tokenizes, in a worker thread, the prompts (and bad words) too long to tokenize on the event
        loop (which every stream and /health share), so admission finds their token ids ready; `every`: the short
        ones too (a reply that shows the prompt's tokens). A prompt with more characters than the context could
        hold tokens is refused at once, before any tokenizing. Raises ApiError (400)."""
        vocab_size = self.served.vocab_size if self.served is not None else None
        await tokenize_prompts(requests, self.tokenizer, vocab_size, self.max_model_len, short_too=every)

    def submit(self, request: Request) -> RequestStream:
        """A client's request of one prompt, admitted or refused on arrival (`submit_all`). Raises ApiError."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[Request]) -> list[RequestStream]:
        """A client's request, its prompts admitted or refused as a whole on arrival (`Admission.admit_group`): a
        refused one raises its 429 (or 400) before any prompt enters. Raises ApiError."""
        try:
            if self.source.finished:
                raise ApiError(503, "the gateway is shutting down", code="unavailable")
            for request in requests:
                if self.attempts.in_use(request.request_id):
                    raise InvalidInput(f"request id {request.request_id!r} is in use")
            self.tenants.admit(requests, self._asked_for(requests[0]))
            operators = self.local.operators.values() if self.local is not None else ()
            started = time.time()
            try:
                admit_at_door(requests, operators, len(self.source), lambda: self.nodes_of("metrics_sink").values())
            except SageLLMError:
                self.tenants.give_back(requests)
                raise
        except SageLLMError as refusal:
            self.readiness.not_submitting(requests[0].model)  # its model is held no longer for it
            if self.access_log is not None:
                self.access_log.refused(requests, ApiError.of(refusal), self.tenants.name_of(requests[0].owner))
            raise
        self.tenants.entered(requests)
        self.traces.open(requests)
        self.traces.admitted(requests, started)
        streams = []
        for request in requests:
            streams.append(self.attempts.open(request, self.failover))
            self.source.submit(request)
        self.readiness.entered(requests)
        return streams

    def _ended(self, stream: RequestStream) -> None:
        """A request's client got its last item, or left: what it used counts for its key, its span ends, its line
        is written."""
        request_id = stream.request.request_id
        self.tenants.ended(request_id, stream.output_tokens)
        self.traces.close(request_id, stream.outcome, stream.retries, stream.output_tokens)
        if self.access_log is not None:
            self.access_log.ended(stream, self.tenants.name_of(stream.request.owner))

    def _asked_for(self, request: Request) -> str:
        """The model name a request's client used: its adapter's, another model's, or the graph's."""
        return request.lora.lora_name if request.lora is not None else request.model or self.model_name

    def cancel(self, request_id: str) -> None:
        """Aborts a request's attempt wherever it is (`AttemptTable.cancel`)."""
        self.attempts.cancel(request_id)

    def request_status(self, request_id: str, owner: str) -> dict[str, Any] | None:
        """As `AttemptTable.request_status`."""
        return self.attempts.request_status(request_id, owner)

    @property
    def in_flight(self) -> int:
        return self.attempts.in_flight

    # -- what the routes ask of the models served (`interface.ServingApi`: an API server's RemoteCore answers too) --
    def models(self) -> list[str]:
        return self.registry.models()

    def embedder(self, model: str) -> EmbeddingOperator | None:
        return self.registry.embedder(model)

    def embedding_model(self, name: str | None) -> str:
        return self.registry.embedding_model(name)

    def embedding_models(self) -> list[str]:
        return self.registry.embedding_models()

    def instance_model(self, name: str | None) -> str | None:
        return self.registry.instance_model(name)

    def lora_of(self, name: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's `model` names (None: a model, not an adapter)."""
        return self.lora.adapters.get(name) if name is not None else None

    def engines_of_ours(self, model: str) -> bool:
        """Whether another model's instances are engines of ours (workers of the graph), not servers we only reach."""
        return self.registry.files_of(model) is not None

    @property
    def served(self) -> ServedModel | None:
        """The graph's model as its front reads it (loaded by the HTTP source when the graph opened)."""
        return self.source.model

    @property
    def tokenizer(self) -> Any:
        return self.served.tokenizer if self.served is not None else None

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

    # -- the graph's operators in this process ---------------------------------------------------------------------
    def engine_operators(self) -> list[Any]:
        """The graph's operators that run an LLMEngine in this process."""
        return [op for name in ENGINE_OPERATORS for op in self.nodes_of(name).values()]

    def nodes_of(self, op_name: str) -> dict[str, Any]:
        """This process's operators of the served graph that run `op_name`, by node id."""
        operators = self.local.operators if self.local is not None else {}
        return {node_id: op for node_id, op in operators.items() if self.graph.nodes[node_id].op == op_name}


def metrics_snapshot(core: ServingCore) -> Any:
    """The served graph's metrics (its first `metrics_sink`'s); None for a graph without one."""
    sinks = list(core.nodes_of("metrics_sink").values())
    return sinks[0].get_metrics() if sinks else None
