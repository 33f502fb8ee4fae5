"""What an engine of the control plane is: the start request (`EngineSpec`, the body of `POST
/v1/management/engines` and an engine of a preset), the checks any such request must pass, and the record the
management API shows (`ManagedEngine`) with its state.

Kinds: `llm` and `embedding` are engines of ours; `openai` a server that runs already, reached at its `url`;
`vllm`, `sglang` and `llamacpp` that project's own server, started here (`control.third_party`).

States: starting -> ready (its health check passes) <-> unhealthy (checks fail while it lives); draining -> stopped
when the API stops it; failed (it could not start, or died too often). Every engine is an instance in the gateway's
registry (`stats`): route chooses it only while it is ready."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from sagellm.common.errors import FieldError
from sagellm.common.pulse import Pulse
from sagellm.gateway.control import third_party
from sagellm.runtime.engine.config import ENGINE_FIELDS, EngineConfig
from sagellm.runtime.pipeline.operator import InstanceStats

STARTING, READY, UNHEALTHY = "starting", "ready", "unhealthy"
RAY_PLACEMENT = re.compile(r"ray:[A-Za-z0-9_-]+")
DRAINING, STOPPED, FAILED = "draining", "stopped", "failed"


class EngineSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The body of `POST /v1/management/engines` (and, with a `name`, an engine of a preset)."""

    # path, alias or org/name (llm, embedding); the model name the server expects (openai); what the server's command
    # line names as its model (vllm, sglang, llamacpp: an HF directory or org/name, a .gguf file)
    model: str
    kind: Literal["llm", "embedding", "openai", "vllm", "sglang", "llamacpp"] = "llm"
    tensor_parallel: int = 1
    label: str | None = None
    max_concurrent: int | None = None  # requests sent to it at once; more wait in the policy queue
    use_gpu: bool = False
    placement: str | None = None  # llm, embedding: "ray:GROUP" runs it on the gateway's Ray cluster (None: here)
    url: str | None = None  # openai: the server's base URL
    api_key: str | None = None  # openai: the key the server expects
    served_model_name: str | None = None  # the name clients send here (default: model)
    # a server's (openai, vllm, sglang, llamacpp) part: whole requests, or its half of PD across servers (vLLM's
    # kv_transfer_params: a prefill server's requests continue on a decode server of the same model)
    role: Literal["colocated", "prefill", "decode"] = "colocated"
    # llm: the engine's settings, `EngineConfig`'s fields by name (max_num_seqs, kv_cache_memory_gb, ...); vllm,
    # sglang, llamacpp: those its server has a flag for (`third_party.KINDS`)
    engine: dict[str, Any] = msgspec.field(default_factory=dict)
    # vllm, sglang, llamacpp: the program that runs it (default: $SAGELLM_VLLM, ... or PATH), and more of its own flags,
    # as given; the operator's alone (a preset served at start): a request over the API names no program and only the
    # flags `check_requested` lets through
    command: str | None = None
    args: list[str] = msgspec.field(default_factory=list)

    def check(self) -> None:
        """Raises FieldError for a bad field (`engine.NAME` for an engine setting); whether the name or GPUs are
        free is the manager's to check."""
        for name in ("model", "served_model_name", "command"):
            value = getattr(self, name)
            if value is not None and (not value.strip() or "\x00" in value):  # no path, name or argument holds these
                raise FieldError(name, f"{name} must be a non-empty name without NUL characters, got {value!r}")
        if any("\x00" in arg for arg in self.args):
            raise FieldError("args", "args must be command-line arguments without NUL characters")
        if (self.command is not None or self.args) and self.kind not in third_party.KINDS:
            raise FieldError("command", f"command and args are for vllm, sglang and llamacpp engines, not {self.kind}")
        if self.tensor_parallel < 1:
            raise FieldError("tensor_parallel", f"tensor_parallel must be >= 1, got {self.tensor_parallel}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise FieldError("max_concurrent", f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.engine:
            self._check_engine_settings()
        if "tensor_parallel_size" in self.engine:
            raise FieldError("engine.tensor_parallel_size", "set the engine's tensor parallel size as tensor_parallel")
        if self.kind == "openai":
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise FieldError("url", "an openai engine needs `url`, the server's http(s) base URL")
            if self.use_gpu or self.tensor_parallel > 1 or self.placement:
                raise FieldError("kind", "tensor_parallel, use_gpu and placement are an openai server's own "
                                         "settings; leave them out")  # fmt: skip
            return
        if self.url or self.api_key:
            raise FieldError("url", f"url and api_key are for openai engines; a {self.kind} engine is started here")
        if self.role != "colocated" and self.kind not in third_party.KINDS:
            raise FieldError("role", f"role is a server's (openai, {', '.join(third_party.KINDS)}); a {self.kind} "
                                     "engine here runs whole requests")  # fmt: skip
        if self.kind in third_party.KINDS:
            third_party.check_settings(self)
            if self.placement is not None:
                raise FieldError("placement", f"a {self.kind} server runs on the gateway's host; leave placement out")
        if self.placement is not None and not RAY_PLACEMENT.fullmatch(self.placement):
            raise FieldError("placement", f"placement must be 'ray:GROUP' or left out, got {self.placement!r}")

    def check_requested(self) -> None:
        """Raises FieldError for what a start request over the management API may not say, which only the operator
        may (presets served with `--model NAME=PRESET`, the environment): the program that runs a server (`command`:
        an admin key is no shell on the host) and its flags beyond those that only tune it (`args`:
        `third_party.check_requested_args`). `check()` comes first."""
        kind = third_party.KINDS.get(self.kind)
        if self.command is not None:
            where = f"${kind.command_env} where the gateway runs, or " if kind is not None else ""
            raise FieldError("command", f"command: a request cannot name the program an engine runs; the operator "
                                        f"names it ({where}a preset served with --model NAME=PRESET)")  # fmt: skip
        if self.args and kind is not None:
            third_party.check_requested_args(self)

    @property
    def slots(self) -> int | None:
        """Requests it runs at once, when known: `max_concurrent`, else a spawned llm engine's `max_num_seqs` (its own
        queue holds the rest), or the one a started server was given; None for a server that did not say."""
        if self.max_concurrent is not None:
            return self.max_concurrent
        if self.kind == "llm":
            return int(self.engine.get("max_num_seqs", EngineConfig.max_num_seqs))
        return self.engine.get("max_num_seqs") if self.kind in third_party.KINDS else None

    @property
    def ranks(self) -> int:
        """Its processes (one device each on GPUs): a rank per tensor parallel slice of each pipeline stage."""
        return self.tensor_parallel * (self.engine.get("pipeline_parallel_size") or 1)

    def _check_engine_settings(self) -> None:
        if self.kind not in ("llm", *third_party.KINDS):
            raise FieldError("engine", f"engine settings are for llm engines (and those a vllm, sglang or llamacpp "
                                       f"server has flags for); a {self.kind} engine takes none")  # fmt: skip
        for name in self.engine:
            if name not in ENGINE_FIELDS or name == "model":
                settings = ", ".join(n for n in ENGINE_FIELDS if n != "model")
                raise FieldError(f"engine.{name}", f"unknown engine setting {name!r}; the settings are {settings}")
        try:
            EngineConfig(**self.engine)
        except FieldError as error:
            raise FieldError(f"engine.{error.field}", str(error)) from None


@dataclass
class ManagedEngine:
    id: str
    spec: EngineSpec
    url: str  # a server's ("" for an engine of ours: a worker of the gateway's graph)
    api_key: str | None  # a server's key (one started here gets a fresh one)
    directory: Path | None = None  # an engine of ours, a server started here: its log
    gpus: list[int] = field(default_factory=list)
    _state: str = STARTING
    link: Any = None  # an engine of ours: its `EngineLink` (a worker of the gateway's graph); None for an openai server
    server: Any = None  # a vllm, sglang or llamacpp engine: its `ServerProcess` (the server started here)
    restarts: int = 0
    ever_ready: bool = False
    stopping: bool = False
    last_error: str | None = None
    created: float = field(default_factory=time.time)
    stats: InstanceStats | None = None  # its entry in the gateway's registry of instances
    _state_changed: Pulse = field(default_factory=Pulse, repr=False)  # fired by each change of `state`

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state
        if self.stats is not None:
            self.stats.healthy = state == READY
            self.stats.recovering = state == STARTING and self.ever_ready
            self.stats.starting = state == STARTING and not self.ever_ready
            self.stats.failed = state == FAILED
            self.stats.problem = None if state == READY else f"{state}: {self.last_error}" if self.last_error else state
        self._state_changed.fire()

    async def until_state(self, *states: str) -> None:
        """Returns once the engine is in one of `states`: woken by each change of its state, so a waiter learns of
        it at once and nothing polls."""
        while self._state not in states:
            await self._state_changed.wait()

    @property
    def pid(self) -> int | None:
        """The pid of its worker (an engine of ours) or server (one started here) while it runs."""
        process = self.link or self.server
        return process.pid if process is not None else None

    @property
    def in_flight(self) -> int:
        return self.stats.running if self.stats is not None else 0

    @property
    def name(self) -> str:
        """The model name clients use at the gateway."""
        return self.spec.served_model_name or self.spec.model

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.spec.kind,
            "model": self.name,
            "source": self.spec.model,
            "label": self.spec.label,
            "url": self.url,
            "state": self.state,
            "pid": self.pid,
            "placement": self.spec.placement,
            "max_concurrent": self.spec.max_concurrent,
            "in_flight": self.in_flight,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "gpus": self.gpus,
            "uptime_s": round(time.time() - self.created, 1),
        }


def pooled_spec(name: str, source: str | dict[str, Any], engine: dict[str, Any]) -> EngineSpec:
    """The engine a model on demand loads as, served as `name`: an llm engine of the model `source` with the `engine`
    settings (an embedding engine when `source` is a pooling model: an encoder, a reranker), or the engine `source`
    spells out (a preset's; the settings apply beneath an llm engine's own). Raises FieldError."""
    from sagellm.runtime.embedding.spec import is_pooling_model

    if isinstance(source, str) and is_pooling_model(source):
        spec = EngineSpec(model=source, served_model_name=name, kind="embedding")
    elif isinstance(source, str):
        spec = EngineSpec(model=source, served_model_name=name, engine=dict(engine))
    else:
        fields = {**source, "served_model_name": name}
        if fields.get("kind", "llm") == "llm":
            fields["engine"] = {**engine, **fields.get("engine", {})}
        try:
            spec = msgspec.convert(fields, EngineSpec)
        except msgspec.ValidationError as error:
            raise FieldError("models", f"the model {name!r}: {error}") from None
    spec.check()
    return spec
