"""The LoRA adapters a gateway serves on its graph's model, or on a model loaded on demand (vLLM's `--lora-modules
NAME=PATH`, or its JSON form naming a `base_model_name`, and its `/v1/load_lora_adapter`): a request names one as its
`model` and carries it (`Request.lora`, vLLM's `LoRARequest`) to whichever engine of its base runs it, which reads the
adapter's directory on first use; requests of different adapters and of the base share its batches.

An adapter is checked when it is added, as the engines would check it, so a client learns at once what is wrong
with it (a 400 or a 404): a PEFT directory of plain LoRA, its rank within the engines' `max_lora_rank`, made for this
base (its weights' shapes against the model's config, for a dense decoder; the engines check any other, and an
adapter of a model on demand not loaded yet, against their weights). The gateway reads the weights too, once as it
adds an adapter, for their digest (`lora_digest.adapter_digest`): a request carries it (`LoRARequest.lora_digest`) so
the router hashes the request's prompt blocks as the engines will (by the weights, which the path alone does not
name). That is one read of the adapter per add (made on the event loop by `/v1/load_lora_adapter`, as the header's
was: megabytes for a usual rank). Each engine still reads and digests it itself, trusting no request's digest."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from sagellm.common.errors import InvalidInput, NotFound
from sagellm.gateway.http.errors import ApiError
from sagellm.gateway.serving.instances import InstanceRegistry
from sagellm.gateway.serving.readiness import ModelReadiness
from sagellm.operators.engine import ENGINE_OPERATORS
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.engine.lora_request import LoRARequest
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.pipeline.served_model import ServedModel


class LoraModules:
    def __init__(
        self,
        graph: Graph,
        registry: InstanceRegistry,
        readiness: ModelReadiness,
        served: Callable[[], ServedModel | None],
    ) -> None:
        """`graph`: the served graph, whose engine nodes say whether they serve adapters, and up to which rank;
        `registry`: the models served (an adapter's name must be new, its base one of them); `readiness`: its models
        loaded on demand, bases too; `served`: the graph's model's front-end files, once read."""
        self.registry, self.readiness, self._served = registry, readiness, served
        engines = [node.params for node in graph.nodes.values() if node.op in ENGINE_OPERATORS]
        self.enabled = bool(engines) and all(params.get("enable_lora") for params in engines)
        self.max_rank = min((p.get("max_lora_rank", EngineConfig.max_lora_rank) for p in engines), default=0)
        self.adapters: dict[str, LoRARequest] = {}
        self.parents: dict[str, str | None] = {}  # adapter -> the model on demand it adapts (None: the graph's)
        self._ids = itertools.count(1)
        registry.lora_parents = self.parents

    def add(self, name: str, path: str, base: str | None = None) -> LoRARequest:
        """Serves the adapter in `path` as `name`, checked against its base model and the names served: `base` names
        a model loaded on demand (None, or the graph's model's name: the graph's). Raises ApiError 400 for a base not
        served here, or served by another project's server (and `_check`'s errors)."""
        pool, own = self.readiness.models_on_demand, self.registry.own_names()
        if base is None and pool is not None and not own:
            raise ApiError(400, f"base_model_name: name the model the adapter {name!r} is of; this server loads "
                                f"{', '.join(map(repr, pool.names()))}", param="base_model_name")  # fmt: skip
        taken = set(self.registry.models())
        if base is None or base in own:
            return self._add(name, path, self._served(), taken)
        if pool is None or base not in pool.models:
            raise ApiError(400, f"base_model_name: {base!r} is not the graph's model nor one loaded on demand here",
                           param="base_model_name")  # fmt: skip
        spec = pool.models[base].spec
        if spec.kind != "llm":
            raise ApiError(400, f"base_model_name: the model {base!r} is served by a {spec.kind} server, which takes "
                                "its own adapters", param="base_model_name")  # fmt: skip
        return self._add(name, path, self.registry.files_of(base), taken, parent=base, engine=spec.engine)

    def listed(self) -> list[tuple[LoRARequest, str]]:
        """Every adapter served, with the name of the model it adapts."""
        return [(ref, self.parents.get(ref.lora_name) or self.registry.own_model) for ref in self.adapters.values()]

    def _add(
        self, name: str, path: str, served: Any, taken: set[str], parent: str | None = None, engine: Any = None
    ) -> LoRARequest:
        """Serves the adapter in `path` as `name` (`served`: the base model's front-end files, None where not read
        yet; `taken`: the names the gateway serves already; `parent`: the model on demand it adapts, whose engine
        settings are `engine`, or None for the graph's model). Raises ApiError: 400 for an adapter the engines cannot
        serve, naming why; 404 for a directory that is not there."""
        from sagellm.runtime.engine.lora_digest import adapter_digest
        from sagellm.runtime.models.lora_adapter import check_adapter_fits, lora_target_shapes, read_lora_adapter

        enabled, max_rank = self.enabled, self.max_rank
        if parent is not None:
            enabled, max_rank = bool(engine.get("enable_lora")), engine.get("max_lora_rank", EngineConfig.max_lora_rank)
        if not enabled:
            whose = f"the model {parent!r}'s engine takes" if parent is not None else "the served graph's engines take"
            raise ApiError(400, f"LoRA adapters: {whose} none (serve with --enable-lora)", param="lora_name")
        if name in self.adapters or name in taken:
            raise ApiError(400, f"the LoRA adapter {name!r} has already been loaded (or the name is a model's)",
                           param="lora_name")  # fmt: skip
        try:
            adapter = read_lora_adapter(path, name, max_rank=max_rank)
            shapes = lora_target_shapes(served.config) if served is not None and served.config is not None else None
            if shapes is not None:
                check_adapter_fits(adapter, shapes)
        except NotFound as error:
            raise ApiError(404, str(error), param="lora_path", code="not_found") from None
        except InvalidInput as error:  # (a FieldError on max_lora_rank too)
            raise ApiError(400, str(error), param="lora_path") from None
        ref = self.adapters[name] = LoRARequest(name, next(self._ids), str(adapter.path), adapter_digest(adapter))
        self.parents[name] = parent
        return ref

    def remove(self, name: str) -> None:
        """Stops serving `name` (requests already running finish with it). Raises ApiError 404 for another name."""
        self.parents.pop(name, None)
        if self.adapters.pop(name, None) is None:
            raise ApiError(404, f"the LoRA adapter {name!r} cannot be found", param="lora_name", code="not_found")
