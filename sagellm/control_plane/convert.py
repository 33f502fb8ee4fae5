"""The seed API's records as the pipeline's: a `RequestMetadata` as the `Request` it enters the pipeline as, an
`ExecutionInstance` as the `InstanceStats` route and pd_split read. The seed-named router, PD strategy and
load balancer convert through these and then ask the gateway's own operators, so they answer as the gateway would."""

from __future__ import annotations

import time

from sagellm.control_plane.types import DEFAULT_MAX_TOKENS, ExecutionInstance, RequestMetadata
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.pipeline.messages import Request
from sagellm.runtime.pipeline.operator import InstanceStats


def pipeline_request(request: RequestMetadata, model: str | None = None, now: float | None = None) -> Request:
    """`request` entering the pipeline at `now` (default: this moment) for `model` (the model name of the instances
    that serve it; None: the graph's own engines): a chat's messages instead of its prompt, 512 tokens when it sets
    no `max_tokens` (what the seed's executors send), its SLO deadline counted from `now`."""
    now = time.time() if now is None else now
    max_tokens = request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS
    return Request(
        request_id=request.request_id,
        prompt=request.prompt if request.messages is None else None,
        messages=request.messages,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p),
        priority=int(request.priority),
        user=request.user_id,
        ttft_slo_ms=request.ttft_slo_ms,
        tpot_slo_ms=request.tbt_slo_ms,
        deadline=now + request.slo_deadline_ms / 1000 if request.slo_deadline_ms is not None else None,
        cost_budget=request.cost_budget,
        model=model,
        arrival_time=now,
    )


SERVERS_NODE = "servers"  # the graph node the instances are reached through (the gateway's for attached servers)


def instance_stats(instance: ExecutionInstance) -> InstanceStats:
    """What route knows of `instance`, a server reached through `SERVERS_NODE`: its role, model, health (a draining
    instance, `is_available` False, takes no new request) and requests running of the most it takes at once. An
    `ExecutionInstance` carries no queued tokens, so the token load the gateway's own accounting adds
    (`predicted_work`) is 0 here."""
    return InstanceStats(
        name=instance.instance_id,
        role=instance.pd_role,
        node=SERVERS_NODE,
        model=instance.model_name or None,
        healthy=instance.is_healthy and instance.is_available,
        max_running=instance.max_concurrent_requests,
        running=instance.active_requests,
    )
