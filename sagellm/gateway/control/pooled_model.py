"""One model loaded on demand as the pool keeps it (`control.model_pool`): its status, its engine, its place in line
for room (`control.model_turns`), and the estimate of what it takes loaded.

Statuses, as llama.cpp's router names them: loaded, loading (shown with `queued` while it waits its turn for room),
unloaded, failed (its last load failed, or its engine died too often; the next request or `load` tries again); and
restarting, ours, shown for a loaded model whose worker died and is being started again (its requests resume there)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from sagellm.gateway.control.autoscaler import Autoscaler
from sagellm.gateway.control.engine_spec import EngineSpec

LOADED, LOADING, UNLOADED, FAILED, RESTARTING = "loaded", "loading", "unloaded", "failed", "restarting"
WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt")
GIB = 2**30


@dataclass
class PooledModel:
    name: str  # what clients send as `model`
    spec: EngineSpec  # the engine it loads as
    status: str = UNLOADED
    engine_id: str | None = None
    queued: bool = False  # waiting its turn for room (`Turns`); its status is still unloaded or failed meanwhile
    turn: trio.CancelScope = field(default_factory=trio.CancelScope)  # that wait: cancelled when it is given up
    asked: bool = False  # the admin API asked for its load: its turn is kept with no request waiting
    draining: bool = False  # being unloaded: no new request goes to it
    stopping: bool = False  # its engine is being stopped (it drained)
    last_used: float = field(default_factory=time.monotonic)  # a request's arrival, or its last moment busy
    loaded_at: float | None = None  # time.monotonic() when it became loaded
    estimate: int | None = None  # bytes it is expected to take loaded (weights and a KV cache of fixed size)
    error: str | None = None  # why its last load failed
    making_room: str | None = None  # the model its load waits for to finish its requests and leave
    scaler: Autoscaler | None = None  # its replicas' autoscaler, while it is loaded
    keep_alive_s: float | None = None  # idle time before it is unloaded, as a request asked (None: the pool's)

    @property
    def serving(self) -> bool:
        return self.status == LOADED and not self.draining


def load_estimate(spec: EngineSpec) -> int:
    """Bytes a model takes loaded, as far as known before: its weight files, and a KV cache whose size its settings
    fix (`kv_cache_memory_gb`); a cache the engine sizes itself takes a share of what is free when it starts (and
    another project's server, its own)."""
    from sagellm.runtime.models.model_cache import resolve_model

    if spec.kind != "llm":  # another project's server: its files where given as a path (it fetches the others)
        path = Path(spec.model)
        if not path.exists():
            return 0
    else:
        path = resolve_model(spec.model)
    files = [path] if path.is_file() else [p for p in Path(path).rglob("*") if p.suffix in WEIGHT_SUFFIXES]
    weights = sum(p.stat().st_size for p in files)
    kv_gb = spec.engine.get("kv_cache_memory_gb")
    return weights + (math.ceil(kv_gb * GIB) if kv_gb else 0)


def gib(value: int | None) -> float | None:
    return round(value / GIB, 2) if value is not None else None
