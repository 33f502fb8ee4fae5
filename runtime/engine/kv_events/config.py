"""The KV events settings: vLLM's `--kv-events-config` JSON (`KVEventsConfig`, same keys and defaults), checked once
at engine start so a bad one is a clear error naming its key (`kv_events_config.<key>`) before any request."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from sagellm.common.errors import FieldError, check_known

FIELD = "kv_events_config"
PUBLISHERS = ("null", "zmq")


@dataclass(frozen=True)
class KvEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str = "null"  # "zmq" when events are enabled and no publisher is named, as vLLM's
    endpoint: str = "tcp://*:5557"  # PUB: bound when it has *, ::, ipc:// or inproc:// (or port 0), else connected
    replay_endpoint: str | None = None  # ROUTER, always bound; None: no replay (a subscriber that misses one is stale)
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # the PUB socket's high-water mark: a subscriber this far behind misses batches (and replays)
    max_queue_size: int = 100_000  # batches waiting for the publisher thread; beyond it one is dropped (and replayed)
    topic: str = ""

    @property
    def publishes(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"


KEYS = tuple(f.name for f in fields(KvEventsConfig))
COUNTS = ("buffer_steps", "hwm", "max_queue_size")


def parse_kv_events_config(raw: str | dict[str, Any] | None) -> KvEventsConfig:
    """vLLM's JSON, `{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557", ...}`, or the
    same as a dict (a graph file's params); None: events off."""
    if raw is None:
        return KvEventsConfig()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise FieldError(FIELD, f"{FIELD}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(raw, dict):
        raise FieldError(FIELD, f"{FIELD}: must be a JSON object of {', '.join(KEYS)}; got {raw!r}")
    check_known(raw, KEYS, "key", at=f"{FIELD}.")
    enabled = _typed(raw, "enable_kv_cache_events", bool, "true or false")
    publisher = raw.get("publisher", "zmq" if enabled else "null")
    if publisher not in PUBLISHERS:
        raise FieldError(f"{FIELD}.publisher", f"{FIELD}.publisher must be one of {', '.join(PUBLISHERS)}; "
                                               f"got {publisher!r}")  # fmt: skip
    for key in ("endpoint", "topic"):
        _typed(raw, key, str, "a string")
    if raw.get("replay_endpoint") is not None:
        _typed(raw, "replay_endpoint", str, "a string or null")
    for key in ("endpoint", "replay_endpoint"):
        if raw.get(key) is not None and "://" not in raw[key]:
            raise FieldError(f"{FIELD}.{key}", f"{FIELD}.{key} must be a ZeroMQ endpoint like tcp://*:5557; "
                                               f"got {raw[key]!r}")  # fmt: skip
    for key in COUNTS:
        if _typed(raw, key, int, "an int >= 1") < 1:
            raise FieldError(f"{FIELD}.{key}", f"{FIELD}.{key} must be an int >= 1; got {raw[key]!r}")
    return KvEventsConfig(**{**raw, "enable_kv_cache_events": enabled, "publisher": publisher})


def offset_endpoint(endpoint: str, index: int) -> str:
    """The endpoint of engine instance (vLLM: data-parallel rank) `index`, as vLLM's `offset_endpoint_port`: the tcp
    port plus `index` (port 0 stays 0: the OS picks), an inproc (or, unlike vLLM, ipc) path with `_dp{index}` added."""
    if index == 0:
        return endpoint
    if endpoint.startswith(("inproc://", "ipc://")):
        return f"{endpoint}_dp{index}"
    base, _, port = endpoint.rpartition(":")
    if not endpoint.startswith("tcp://") or not port.isdigit():
        raise FieldError(f"{FIELD}.endpoint", f"{FIELD}.endpoint {endpoint!r} has no tcp port to offset for "
                                              f"instance {index}")  # fmt: skip
    return endpoint if int(port) == 0 else f"{base}:{int(port) + index}"


def _typed(raw: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = raw.get(key, getattr(KvEventsConfig, key))
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FieldError(f"{FIELD}.{key}", f"{FIELD}.{key} must be {what}; got {value!r}")
    return value
