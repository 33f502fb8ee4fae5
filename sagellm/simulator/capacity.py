"""How many requests per second a simulated cluster can serve: the unit of `--load`, estimated from the step model and
the trace's lengths rather than measured, so a sweep's loads are fixed before it runs."""

from __future__ import annotations

import numpy as np

from sagellm.simulator.cluster_config import ClusterConfig
from sagellm.simulator.step_model import StepModel
from sagellm.simulator.traces import Trace, from_rows


def capacity_rps(model: StepModel, trace: Trace, instances: int) -> float:
    """Requests/s of `instances` instances with every slot busy, for the trace's mix of lengths.

    A request costs its prompt's tokens (and, in chunks of `max_num_batched_tokens`, the earlier prompt tokens each
    chunk attends over), a decode slot in `output - 1` steps and the context those steps attend over (its prompt plus
    1, 2, ... generated tokens), and the cost of a step with prompt chunks once per chunk; the fixed cost of a step
    is shared by the batch, and a full instance runs at least enough steps for its decode tokens (`max_num_seqs` a
    step) and its prompt tokens (`max_num_batched_tokens` a step), whichever needs more."""
    prompts = trace.prompt_tokens.astype(np.float64)
    decodes = trace.output_tokens.astype(np.float64) - 1
    chunk = float(model.max_num_batched_tokens)
    whole = np.floor(prompts / chunk)  # full chunks; chunk k attends over k * chunk earlier tokens
    earlier = chunk * chunk * whole * (whole - 1) / 2 + (prompts - whole * chunk) * whole * chunk
    per_request = (
        model.per_prefill_token_s * prompts
        + model.per_prefill_context_s * earlier
        + model.per_prefill_step_s * np.ceil(prompts / chunk)  # as if no two prompts shared a step: a bound
        + model.per_decode_seq_s * decodes
        + model.per_context_token_s * (decodes * prompts + decodes * (decodes + 1) / 2)
    ).mean()
    steps = max(decodes.mean() / model.max_num_seqs, prompts.mean() / model.max_num_batched_tokens)
    return instances / float(per_request + model.fixed_s * steps)


def cluster_capacity_rps(config: ClusterConfig, trace: Trace) -> float:
    """`capacity_rps` of the cluster's instances at the start, summed over its kinds (tiers); with prefill workers,
    `pd_capacity_rps`."""
    kinds = [(tier, count) for tier, count in config.kinds() if count]
    if any(tier.role == "prefill" for tier, _ in kinds):
        return pd_capacity_rps(config, trace)
    return sum(capacity_rps(tier.step_model, trace, count) for tier, count in kinds)


def pd_capacity_rps(config: ClusterConfig, trace: Trace) -> float:
    """Requests/s of prefill and decode workers, whichever side saturates first: the prefill workers compute the
    prompts of at least `pd_threshold_tokens` (each a request of one output token there); the decode workers are
    counted as serving every request whole, a bound below (they do not compute the long prompts)."""
    long = trace.prompt_tokens >= config.pd_threshold_tokens
    prompts = trace.prompt_tokens[long]
    prefills = from_rows(np.zeros(len(prompts)), prompts, np.ones(len(prompts), dtype=np.int64))
    prefill = decode = 0.0
    for tier, count in config.kinds():
        if tier.role == "prefill" and long.any():
            prefill += capacity_rps(tier.step_model, prefills, count) / float(long.mean())
        elif tier.role != "prefill":
            decode += capacity_rps(tier.step_model, trace, count)
    return min(prefill, decode) if long.any() else decode
