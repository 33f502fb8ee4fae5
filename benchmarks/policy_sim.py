"""W6's simulated part: many instances of three tiers (speeds, slots and prices) in the cluster simulator
(`sagellm.simulator`), fed by the real `PolicySort` operator and routed by the real `load_balanced` strategy among the
instances with a free slot (a request its policy pinned keeps its instance), so every scheduling decision is our
code's; only the service is modelled, by each tier's step model. This file builds W6's trace and tiers and turns the
simulator's per-request times into W6's per-class tallies.

Given its seed a simulation's outcomes are deterministic (events run on the simulated clock, policies read that
clock), so repeats replay fresh traces (seed + repeat): their medians cover trace-to-trace variation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from sagellm.benchmarks.policy_workload import (
    POLICIES,
    Part,
    PolicyRun,
    TrafficClass,
    class_sequence,
    max_queue,
    new_run,
    policy_state,
)
from sagellm.common.errors import InvalidInput
from sagellm.simulator.capacity import cluster_capacity_rps
from sagellm.simulator.cluster import simulate
from sagellm.simulator.cluster_config import ClusterConfig, Tier
from sagellm.simulator.result import SimResult
from sagellm.simulator.step_model import StepModel
from sagellm.simulator.traces import Lengths, Trace, poisson

PROMPT_MAX = 2048  # the trace's longest prompt, and the tiers' max_num_batched_tokens: any prompt prefills in one step
OUTPUT_MAX = 512


def rates_tier(
    name: str, share: float, prefill_tokens_per_s: float, decode_tokens_per_s: float, max_running: int, price: float
) -> Tier:
    """A tier as W6 gives it, by per-request rates, served by the step model that runs at those rates: a decode
    step gives every running sequence a token in 1 / decode_tokens_per_s whatever the batch (`fixed_s`; no cost per
    sequence or context token), so each of the `max_running` slots still decodes at decode_tokens_per_s; a prompt
    token costs 1 / prefill_tokens_per_s (`per_prefill_token_s`), up to PROMPT_MAX a step.

    How this differs from each slot serving its request alone (the prompt at prefill_tokens_per_s, then the output at
    decode_tokens_per_s, a queue of its own per instance):
    - prefill is the instance's, not each slot's: prompts scheduled together prefill one after another in one step,
      and the decodes of that step wait for them (chunked prefill shares a step with decodes);
    - the first token is the prefill step's own, so it comes one decode step (`fixed_s`) after the prompt is computed,
      and a request routed mid-step waits for the step boundary: together up to 2 / decode_tokens_per_s more TTFT;
    - `tokens_per_s`, which slo_aware and cost_optimized read, is each instance's own measured prefill rate (as the
      engine operator measures it: prompt tokens a second in the steps that compute some), not a constant."""
    model = StepModel(
        fixed_s=1 / decode_tokens_per_s,
        per_prefill_token_s=1 / prefill_tokens_per_s,
        per_decode_seq_s=0.0,
        per_context_token_s=0.0,
        max_num_seqs=max_running,
        max_num_batched_tokens=PROMPT_MAX,
    )
    return Tier(name, share, model, price)


SIM_TIERS = (
    rates_tier("fast", 0.2, 4000.0, 12.0, 4, 2.0),
    rates_tier("standard", 0.5, 2000.0, 6.0, 4, 1.0),
    rates_tier("economy", 0.3, 1000.0, 3.0, 4, 0.5),
)


@dataclass
class SimConfig:
    instances: int = 1000
    requests: int = 16000  # per policy, the same trace for each
    tiers: tuple[Tier, ...] = SIM_TIERS
    prompt_median: int = 256  # log-normal lengths, clipped
    output_median: int = 96
    load: float = 2.0
    queue_s: float = 10.0
    seed: int = 0  # repeat r's trace uses seed + r
    repeats: int = 1
    policies: tuple[str, ...] = POLICIES
    progress: bool = True

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise InvalidInput(f"repeats must be >= 1, got {self.repeats}")

    def cluster(self, policy: str, bound: int | None, seed: int) -> ClusterConfig:
        return ClusterConfig(instances=self.instances, tiers=self.tiers, policy=policy, max_queue=bound, seed=seed)


@dataclass
class SimTrace:
    trace: Trace  # arrivals and lengths, each request's class as its priority and TTFT SLO
    classes: list[TrafficClass]
    capacity_rps: float
    max_queue: int | None  # policy_sort's bound: queue_s of capacity
    warmup_s: float  # requests arriving earlier are served but not counted: slots and queue are still filling

    @property
    def counted(self) -> np.ndarray:
        return self.trace.arrivals >= self.warmup_s


def sim_trace(config: SimConfig, seed: int) -> SimTrace:
    """The trace of `seed` at `load` × the capacity the tiers' step models give for its lengths (every slot busy)."""
    prompt = Lengths(config.prompt_median, 0.8, 16, PROMPT_MAX)
    output = Lengths(config.output_median, 0.6, 8, OUTPUT_MAX)
    base = poisson(config.requests, 1.0, prompt=prompt, output=output, seed=seed, name="w6")
    cluster = config.cluster("fifo", None, seed)
    capacity = cluster_capacity_rps(cluster, base)
    arrival = config.load * capacity
    classes = class_sequence(config.requests, np.random.default_rng([seed, 1]))
    trace = dataclasses.replace(
        base.at_rate(arrival),
        priorities=np.array([c.priority for c in classes]),
        ttft_slo_ms=np.array([c.ttft_slo_ms for c in classes]),
    )
    slots = sum(tier.step_model.max_num_seqs * n for tier, n in cluster.kinds())
    bound = max_queue(config.queue_s, capacity)
    fill = slots / arrival + ((bound or 0) / (arrival - capacity) if arrival > capacity else 0.0)
    return SimTrace(trace, classes, capacity, bound, float(min(fill, trace.duration_s / 2)))


def run_sim(config: SimConfig) -> Part:
    """Per repeat a fresh trace (seed + repeat), every policy over it, each in a fresh simulation."""
    part = Part("sim", _sim_json(config))
    for repeat in range(config.repeats):
        seed = config.seed + repeat
        w6 = sim_trace(config, seed)
        part.traces.append(_trace_json(config, seed, w6))
        for policy in config.policies:
            desc = f"sim {policy}" if config.repeats == 1 else f"sim {policy} run {repeat + 1}/{config.repeats}"
            with tqdm(total=config.requests, desc=desc, unit="req", disable=not config.progress) as bar:
                result = simulate(config.cluster(policy, w6.max_queue, seed), w6.trace, bar.update)
            part.runs.append(policy_run(policy, repeat, w6, result))
    return part


def policy_run(policy: str, repeat: int, w6: SimTrace, result: SimResult) -> PolicyRun:
    """The counted requests' tallies per class (a failed request, shed by the queue, has no TTFT), the simulation's
    wall time and what the policy itself counted."""
    run = new_run(policy, repeat)
    for cls, ttft_s, counted in zip(w6.classes, result.ttft_s.tolist(), w6.counted.tolist()):
        if counted:
            run.record(cls, None if math.isnan(ttft_s) else ttft_s)
    run.stats = {"wall_s": result.wall_s} | policy_state(result.policy)
    return run


def _sim_json(config: SimConfig) -> dict[str, Any]:
    keys = ("instances", "requests", "prompt_median", "output_median", "load", "queue_s", "seed", "repeats")
    tiers = [
        dict(name=tier.name, share=tier.share, instances=n, price_per_1k_tokens=tier.price_per_1k_tokens)
        | dict(step_model=dataclasses.asdict(tier.step_model))
        for tier, n in config.cluster("fifo", None, config.seed).kinds()
    ]
    return {k: getattr(config, k) for k in keys} | {
        "tiers": tiers,
        "routing": "load_balanced among instances with a free slot; a request its policy pinned keeps its instance",
    }


def _trace_json(config: SimConfig, seed: int, w6: SimTrace) -> dict[str, Any]:
    return {
        "seed": seed,
        "capacity_rps": w6.capacity_rps,
        "arrival_rps": config.load * w6.capacity_rps,
        "max_queue": w6.max_queue,
        "warmup_s": w6.warmup_s,
        "counted_requests": int(w6.counted.sum()),
        "duration_s": w6.trace.duration_s,
    }
