"""Whether a request's model serves now, and the requests that keep each model busy: `ModelReadiness`, the
serving core's `readiness` (the routes ask it as `interface.Readiness`).

Two gates of the control room decide whether a model serves: sleep mode for the graph's own engines
(`control.sleep_mode.SleepMode`) and the pool of models loaded on demand (`control.model_pool.ModelPool`). The
control room registers them here (`add_sleep_mode`, `add_models_on_demand`) as the small protocols below, so this
room, which is below it, knows what it may ask of them and nothing else. The control room in turn asks how busy a
model is (`requests_of`, `until_idle`) before it puts it to sleep or unloads it: a request past `model_ready` holds
its model (`hold`) until it is submitted, so no other model's load evicts it in between."""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any, Protocol

import trio

from sagellm.common.pulse import Pulse
from sagellm.gateway.serving.instances import InstanceRegistry
from sagellm.runtime.pipeline.messages import Request

HOLD_S = 30.0  # longest a request between `model_ready` and its submission keeps its model busy


class SleepGate(Protocol):
    """The graph's engines asleep and woken (`control.sleep_mode.SleepMode`)."""

    @property
    def serving(self) -> bool:
        """Awake, and not about to sleep: a request needs no wait."""
        ...

    async def awake(self) -> None:
        """Returns once the engines serve, waking them if they sleep. Raises ApiError 503 when that takes too long."""
        ...


class EngineKind(Protocol):
    """What the gateway reads of a model on demand's engine (`control.engine_spec.EngineSpec`)."""

    @property
    def kind(self) -> str: ...

    @property
    def engine(self) -> dict[str, Any]: ...


class OnDemandModel(Protocol):
    """One model loaded on demand (`control.pooled_model.PooledModel`)."""

    @property
    def serving(self) -> bool: ...

    @property
    def spec(self) -> EngineKind: ...


class ModelsOnDemand(Protocol):
    """The models loaded on demand (`control.model_pool.ModelPool`)."""

    @property
    def models(self) -> Mapping[str, OnDemandModel]: ...

    def names(self) -> list[str]: ...

    async def ready(self, name: str, hold: bool = True) -> None:
        """Returns once `name` serves (loading it if need be); `hold`: a request of it follows (`hold`). Raises
        ApiError 503 when that cannot be in time."""
        ...

    def status(self, name: str) -> dict[str, Any]:
        """Its load status as `/v1/models` shows it."""
        ...

    def keep_alive(self, name: str, seconds: float) -> None:
        """How long `name` stays loaded once idle, from now on (Ollama's `keep_alive`; 0: unloaded once idle)."""
        ...


class ModelReadiness:
    def __init__(self, registry: InstanceRegistry) -> None:
        self.registry = registry
        self.sleep_mode: SleepGate | None = None
        self.models_on_demand: ModelsOnDemand | None = None
        self._live_of_model: Counter[str | None] = Counter()  # requests live, by `Request.model`
        # Requests between `model_ready` and their submission, by `Request.model`: the deadlines of their holds.
        self._arriving: defaultdict[str | None, list[float]] = defaultdict(list)
        self._fewer = Pulse()  # fired as a request ends: whoever waits for a model's requests to end looks again

    def add_sleep_mode(self, gate: SleepGate) -> None:
        """The graph's requests wait for `gate` while its engines sleep."""
        self.sleep_mode = gate

    def add_models_on_demand(self, pool: ModelsOnDemand) -> None:
        """Requests of `pool`'s models wait for them to load; the names are the registry's too."""
        self.models_on_demand = pool
        self.registry.on_demand = pool.names()
        self.registry.on_demand_pooling = [name for name, m in pool.models.items() if m.spec.kind == "embedding"]

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

    def ready_now(self, model: str | None) -> bool:
        """Whether a request of `model` may enter at once, with no wait in `model_ready`: not while the graph's
        engines sleep (or fall asleep), nor while a model on demand does not serve, unless a request of it is held on
        its way in (its API server's `ModelReady` was answered; the model's drain, if one began since, waits for it)."""
        if model is None:
            return self.sleep_mode is None or self.sleep_mode.serving
        pool = self.models_on_demand
        return pool is None or model not in pool.models or pool.models[model].serving or self._holds(model) > 0

    def hold(self, model: str | None) -> None:
        """A request of `model` is on its way in (past `model_ready`): the model counts as busy (`requests_of`) until
        the request is submitted, or HOLD_S."""
        self._holds(model)  # the expired holds go
        self._arriving[model].append(time.monotonic() + HOLD_S)

    def entered(self, requests: list[Request]) -> None:
        """A client request's prompts were submitted: they count as live, and the hold of their way in ends."""
        for request in requests:
            self._live_of_model[request.model] += 1
        if requests and self._arriving[requests[0].model]:
            self._arriving[requests[0].model].pop(0)

    def not_submitting(self, model: str | None) -> None:
        """A request of `model` past `model_ready` will not be submitted (refused, or its client left, on its way
        in): the hold of its way in ends now, not HOLD_S later."""
        if self._holds(model):
            self._arriving[model].pop(0)
            self._fewer.fire()

    def left(self, model: str | None) -> None:
        """A request of `model` ended."""
        self._live_of_model[model] -= 1
        self._fewer.fire()

    def requests_of(self, model: str | None) -> int:
        """Requests of `model` (a `Request.model`) the gateway answers now, or that are on their way in."""
        return self._live_of_model[model] + self._holds(model)

    async def until_idle(self, model: str | None) -> None:
        """Returns once `model` has no request (`requests_of` is 0): woken as requests end, and as holds expire."""
        while self.requests_of(model):
            holds = self._arriving[model]
            # (the earliest hold may have expired since `requests_of` looked: then look again at once)
            with trio.move_on_after(max(0.0, min(holds) - time.monotonic()) if holds else math.inf):
                await self._fewer.wait()

    def _holds(self, model: str | None) -> int:
        """Requests of `model` past `model_ready` and not yet submitted (the expired holds go)."""
        now = time.monotonic()
        holds = self._arriving[model] = [deadline for deadline in self._arriving[model] if deadline > now]
        return len(holds)
