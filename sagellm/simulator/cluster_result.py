"""A cluster simulation's result (`SimResult`): each request's TTFT, TPOT and end to end from the stamps the
simulated clock gave it, the autoscaler's changes, and what was simulated, for reports: the configuration, the trace,
the most instances at once and pd_split's decisions."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from sagellm.simulator.cluster_config import ClusterConfig
from sagellm.simulator.result import SimResult
from sagellm.simulator.step_model import StepModel
from sagellm.simulator.traces import Trace


def cluster_result(
    config: ClusterConfig,
    trace: Trace,
    first_at: list[float],
    finish_at: list[float],
    where: list[int],
    *,
    instances_peak: int,
    pd_decisions: Mapping[str, int] | None,
    changes: list[dict[str, Any]],
    policy: Any,
    wall_s: float,
) -> SimResult:
    """`first_at` and `finish_at`: each request's first and last token on the simulated clock (NaN: it failed);
    `where`: the index of the instance that served it (-1: none); `pd_decisions`: pd_split's, when there were prefill
    workers; `changes`: the autoscaler's; `policy`: the run's policy as it ended."""
    arrivals = trace.arrivals
    first, finish = np.array(first_at), np.array(finish_at)
    gaps = trace.output_tokens - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(gaps > 0, (finish - first) / gaps, math.nan)
    ends = finish[~np.isnan(finish)]
    duration = float(ends.max() - arrivals[0]) if len(ends) else trace.duration_s
    info = {
        "trace": trace.name,
        "instances": config.instances if config.autoscale is None else None,
        "instances_peak": instances_peak,
        "policy": config.policy,
        "routing": config.routing,
        "sample": config.sample,
        "max_queue": config.max_queue,
        "instances_per_host": config.instances_per_host,
        "autoscale": vars(config.autoscale) if config.autoscale else None,
        "step_model": _model_json(config.step_model) if config.step_model else None,
        "tiers": None,  # instances are numbered tier after tier, in this order
        "pd": None,
        "seed": config.seed,
    }
    if pd_decisions is not None:
        info["pd"] = {
            "threshold_tokens": config.pd_threshold_tokens,
            "kv_transfer": vars(config.kv_transfer),
            "decisions": dict(pd_decisions),
        }
    if config.tiers:
        info["tiers"] = [
            {"name": t.name, "role": t.role, "share": t.share, "instances": n}
            | {"price_per_1k_tokens": t.price_per_1k_tokens}
            | {"step_model": _model_json(t.step_model)}
            for t, n in config.kinds()
        ]
    return SimResult(
        ttft_s=first - arrivals,
        tpot_s=tpot,
        e2e_s=finish - arrivals,
        instance=np.array(where),
        sim_duration_s=duration,
        wall_s=wall_s,
        ttft_slo_ms=trace.ttft_slo_ms,
        autoscale=changes,
        info=info,
        policy=policy,
    )


def _model_json(model: StepModel) -> dict[str, Any]:
    return {k: v for k, v in vars(model).items() if k != "source"}
