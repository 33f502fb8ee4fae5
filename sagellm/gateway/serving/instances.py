"""The instances every request of a gateway chooses from: the graph's engine nodes, and the servers attached at run
time through its `remote_engine` node (engine processes the gateway spawns, servers it only reaches).

A request names a model; the graph's own model runs on the graph's engines, any other on the attached instances that
serve it: one path, admission to metrics, for all. The registry itself is the executor's `instances` (`InstanceStats`
by name), which route, pd_split and the policies read; this class is the gateway's view of it and its one door for
attaching and detaching servers."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import trio

from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.served_graph import REMOTE_NODE
from sagellm.operators.admission import Admission
from sagellm.operators.embedding import EmbeddingOperator
from sagellm.operators.route import ROLES_FOR_PHASE
from sagellm.runtime.embedding.card import PoolingCard
from sagellm.runtime.pipeline.health_changes import next_health_change
from sagellm.runtime.pipeline.served_model import ServedModel


class InstanceRegistry:
    def __init__(self, own_model: str, local: Callable[[], Any], aliases: Collection[str] = ()) -> None:
        """`own_model`: the name the graph's own model is served as, `aliases` more names requests may give it (vLLM's
        `--served-model-name A B`); `local()`: the executor of the gateway's process once it runs (None before)."""
        self.own_model, self._local = own_model, local
        self.aliases = [name for name in dict.fromkeys(aliases) if name != own_model]
        self._served: dict[str, ServedModel] = {}  # other models whose instances take tokens: their front-end files
        self._cards: dict[str, PoolingCard] = {}  # pooling models engines of ours serve: what the routes know of them
        self.on_demand: list[str] = []  # models loaded when a request names them (control.model_pool), in any status
        self.on_demand_pooling: list[str] = []  # those of them that are pooling models (embedding engines)
        # LoRA adapters by name -> the model on demand each adapts, None for the graph's (serving.lora_modules)
        self.lora_parents: Mapping[str, str | None] = {}

    def instances(self) -> dict[str, Any]:
        local = self._local()
        return dict(local.instances) if local is not None else {}

    @property
    def remote(self) -> Any:
        """The node serving the instances attached at run time (None: the graph has no route in this process)."""
        local = self._local()
        return local.operators.get(REMOTE_NODE) if local is not None else None

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
        stats = self.instances().get(instance_id)
        if self.remote is not None:
            self.remote.detach(instance_id)
        model = stats.model if stats is not None else None
        if model is None or any(s.model == model for s in self.instances().values()):
            return
        self._cards.pop(model, None)
        if self._served.pop(model, None) is not None:
            for admission in self._admissions():
                admission.models.pop(model, None)

    def serve_model(self, model: str, served: ServedModel) -> None:
        """Instances of `model` take tokens (workers of the graph): admission tokenizes and checks their requests with
        the model's own files, and its sampling defaults apply, as the graph's own model's do."""
        self._served[model] = served
        for admission in self._admissions():
            admission.models[model] = served

    def files_of(self, model: str) -> ServedModel | None:
        """`model`'s front-end files, when its instances take tokens (workers of the graph); None for a model only
        servers we reach serve."""
        return self._served.get(model)

    def sampling_defaults(self, model: str) -> dict[str, Any] | None:
        """Another model's own sampling defaults, where the gateway holds its files (None: its server applies them)."""
        served = self._served.get(model)
        return served.sampling_defaults if served is not None else None

    def served_defaults(self) -> dict[str, dict[str, Any]]:
        """Every other model's sampling defaults the gateway applies, by name (what API servers are told)."""
        return {model: served.sampling_defaults or {} for model, served in self._served.items()}

    def _admissions(self) -> list[Admission]:
        local = self._local()
        operators = local.operators.values() if local is not None else ()
        return [op for op in operators if isinstance(op, Admission)]

    async def instance_ready(self, model: str | None, within_s: float, phase: str = "colocated") -> bool:
        """Waits up to `within_s` until an instance of `model` (None: the graph's) that can run a `phase` request
        whole (not a prefill worker alone) is healthy; False at once when none is healthy and none is starting or
        being restarted (an attached server that stopped answering may never do so again: its clients are not kept
        waiting on it; one just registered and not yet probed is waited for). Woken by each change of an instance's
        health, so it returns the moment one is ready, and nothing polls."""
        whole = ROLES_FOR_PHASE["embed" if phase == "embed" else "colocated"]
        with trio.move_on_after(within_s):
            while True:
                fitting = [s for s in self.instances().values() if s.model == model and s.role in whole]
                if any(s.healthy for s in fitting):
                    return True
                if not any(s.on_its_way for s in fitting):  # nothing is on its way either
                    return False
                await next_health_change()
        return False

    def own_names(self) -> list[str]:
        """The names the graph's own generation model is served as; none when the graph has no engine of its own."""
        graph_serves = any(s.model is None for s in self.instances().values())
        return [self.own_model, *self.aliases] if graph_serves else []

    def models(self) -> list[str]:
        """The model names served: the graph's own generation model (if it has engines), those loaded on demand,
        then the others (its embedding model, those of attached instances that are not all failed), each once."""
        others = [s.model for s in self.instances().values() if s.model is not None and not s.failed]
        return list(dict.fromkeys([*self.own_names(), *self.on_demand, *others]))

    def embedders(self) -> list[EmbeddingOperator]:
        """This process's embedding nodes."""
        local = self._local()
        operators = local.operators.values() if local is not None else ()
        return [op for op in operators if isinstance(op, EmbeddingOperator)]

    def embedder(self, model: str) -> EmbeddingOperator | PoolingCard | None:
        """This process's embedding node serving `model`, else the card of an engine of ours serving it (its
        `dim`, `max_length`, task, labels and activation alike), else None."""
        own = next((op for op in self.embedders() if op.served_model_name == model), None)
        return own if own is not None else self._cards.get(model)

    def serve_card(self, model: str, card: PoolingCard) -> None:
        """An engine of ours serves the pooling model `model`: the routes know it by its card."""
        self._cards[model] = card

    def cards(self) -> dict[str, PoolingCard]:
        """The card of every pooling model served here or by an engine of ours, by name."""
        return {**self._cards, **{op.served_model_name: op.card for op in self.embedders()}}

    def embedding_models(self) -> list[str]:
        """The pooling models served here or by attached instances, own first, then those loaded on demand."""
        serving = [s.model for s in self.instances().values() if s.role == "embedding" and s.model]
        return list(dict.fromkeys([*serving, *self.on_demand_pooling]))

    def embedding_model(self, name: str | None) -> str:
        """The embedding model a request asks for: the one named, else the first served (the gateway's own); a
        404 naming those served for any other."""
        return embedding_model(name, self.embedding_models())

    def instance_model(self, name: str | None) -> str | None:
        """A request's `Request.model` for the model a client named: None for the graph's own (or none named), the
        name itself for a model attached instances serve. Raises ApiError 404 for any other; 400 for none named when
        the graph serves none and models load on demand (which one was meant?)."""
        parent = self.lora_parents.get(name) if name is not None else None
        if parent is not None:  # an adapter of a model on demand: its requests are that model's
            return parent
        own = {self.own_model, *self.aliases, *(a for a, base in self.lora_parents.items() if base is None)}
        alone = self.on_demand if not self.own_names() else []
        return instance_model(name, own, self._attached_models, self.models, alone)

    def _attached_models(self) -> set[str | None]:
        """The models attached instances serve, also those whose instances all failed (a request learns why), and
        those loaded on demand."""
        return {s.model for s in self.instances().values()} | set(self.on_demand)


def instance_model(
    name: str | None,
    own: Collection[str],
    attached: Callable[[], Collection[str | None]],
    served: Callable[[], list[str]],
    on_demand_alone: Collection[str] = (),
) -> str | None:
    """A request's `Request.model` for the model a client named: None for the graph's own (any of its names `own`,
    or none named), the name itself for a model attached instances serve. Raises ApiError 404, naming the `served`
    ones, for any other; 400 for none named (or the graph's) when the graph serves no model of its own and
    `on_demand_alone` load on demand. `attached` and `served` are asked only for another model's name: most
    requests name the graph's own."""
    if name is not None and name not in own:
        name = untagged(name, [*own, *attached()])
    if name is None or name in own:
        if on_demand_alone:
            names = ", ".join(map(repr, on_demand_alone))
            raise ApiError(400, f"model: name the model to use; this server loads {names}", param="model")
        return None
    if name in attached():
        return name
    served_names = ", ".join(repr(m) for m in served())
    raise ApiError(
        404, f"the model {name!r} does not exist here; this server has {served_names}", param="model",
        code="model_not_found",
    )  # fmt: skip


LATEST = ":latest"  # Ollama's tag of a model's only version


def untagged(name: str, known: Collection[str | None]) -> str:
    """`name` as the model it means among `known`: Ollama's clients name a model `NAME:latest` as Ollama's
    `/api/tags` lists it (and send that name to the OpenAI routes too), which is the model NAME where no model is
    served under the tagged name itself."""
    if name in known or not name.endswith(LATEST):
        return name
    bare = name.removesuffix(LATEST)
    return bare if bare in known else name


def embedding_model(name: str | None, served: list[str]) -> str:
    """The embedding model a request asks for among those `served` (own first): the one named (`untagged`), else the
    first; a 404 naming those served for any other."""
    if name is not None:
        name = untagged(name, served)
    if name is None and served:
        return served[0]
    if name in served:
        return name
    have = f"the embedding models here are {', '.join(map(repr, served))}" if served else "no embedding model here"
    message = f"the embedding model {name!r} does not exist; {have}"
    raise ApiError(404, message, param="model", code="model_not_found")
