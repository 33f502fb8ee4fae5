"""A registered `ExecutionInstance` joined to the running gateway as one of its engines.

A server that runs already becomes an `openai` engine of the gateway (probed once before the call returns); an
instance with an `engine_kind` is an engine the gateway starts here, with the settings its seed configs name. Either
way route, failover and metrics then treat it as any engine of the gateway."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from sagellm.common.errors import InvalidInput
from sagellm.control_plane.gpus import GpuReader
from sagellm.control_plane.types import ExecutionInstance

PROBE_TIMEOUT_S = 10.0  # start() and register_instance() wait this long for a server to answer its first probe


def attach_instance(gateway: Any, instance: ExecutionInstance, gpu_reader: GpuReader) -> None:
    """Starts `instance` as an engine of the running `gateway` (a `GatewayThread`); returns once a server has
    answered its first probe or been found unreachable, or an engine started here has loaded its model."""
    from sagellm.gateway.control.engine_spec import DRAINING, FAILED, READY, STOPPED, UNHEALTHY, EngineSpec

    label = (
        f"tp{instance.tensor_parallel_size} pp{instance.pipeline_parallel_size} dp{instance.data_parallel_size} "
        f"ep{instance.expert_parallel_size} gpus{instance.gpu_count}"
    )
    common = dict(model=instance.model_name, max_concurrent=instance.max_concurrent_requests, label=label)
    engines = gateway.gateway.engines
    if instance.engine_kind is None:  # a server that runs already
        role = instance.pd_role
        spec = EngineSpec(kind="openai", url=instance.url, api_key=instance.api_key, role=role, **common)
        gateway.wait(engines.start, spec, instance.instance_id)
        gateway.wait(engines.health_check, instance.instance_id)  # its first probe: ready, or unreachable
        return
    gpus = instance.gpu_count > 0 and bool(gpu_reader.gpus())
    spec = EngineSpec(
        kind=instance.engine_kind, tensor_parallel=instance.tensor_parallel_size, use_gpu=gpus,
        engine=engine_settings(instance), role=instance.pd_role if instance.engine_kind != "llm" else "colocated",
        **common,
    )  # fmt: skip
    gateway.wait(engines.start, spec, instance.instance_id)
    engine = gateway.call(engines.get, instance.instance_id)
    # any state but starting: its model loaded (minutes, for some), or it failed or was stopped meanwhile
    gateway.wait(engine.until_state, READY, UNHEALTHY, DRAINING, STOPPED, FAILED)
    address = urlsplit(engine.url)
    instance.host, instance.port = address.hostname or instance.host, address.port or instance.port


def engine_settings(instance: ExecutionInstance) -> dict[str, Any]:
    """The settings an engine started for `instance` runs with, from its configs: a prefill instance's batch size and
    chunk are its `max_num_seqs` and `max_num_batched_tokens`, a decode instance's parallel requests its
    `max_num_seqs` and its prefix caching its own; only those its kind of engine has a setting for."""
    from sagellm.gateway.control import third_party
    from sagellm.runtime.engine.config import ENGINE_FIELDS

    wanted: dict[str, Any] = {}
    if instance.pipeline_parallel_size > 1:
        wanted["pipeline_parallel_size"] = instance.pipeline_parallel_size
    if (prefill := instance.prefilling_config) is not None:
        wanted |= {"max_num_seqs": prefill.target_batch_size, "max_num_batched_tokens": prefill.max_chunk_size_tokens}
    if (decode := instance.decoding_config) is not None:
        wanted |= {"max_num_seqs": decode.max_parallel_requests, "enable_prefix_caching": decode.enable_prefix_caching}
    known = ENGINE_FIELDS if instance.engine_kind == "llm" else third_party.KINDS[instance.engine_kind].settings
    return {name: value for name, value in wanted.items() if name in known}


def served_model(instance: ExecutionInstance) -> str:
    """The model a server lists first (`GET /v1/models`): an instance registered without its model's name."""
    headers = {"authorization": f"Bearer {instance.api_key}"} if instance.api_key else {}
    try:
        reply = httpx.get(f"{instance.url}/v1/models", headers=headers, timeout=PROBE_TIMEOUT_S)
        reply.raise_for_status()
        return reply.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as error:
        raise InvalidInput(
            f"{instance.instance_id}: model_name is empty and {instance.url}/v1/models did not name one ({error}); "
            "give model_name"
        ) from None
