"""The scheduling benchmark (W6): SLO attainment per priority class under 2× overload, for every `policy_sort` policy.

Three classes arrive as one Poisson stream at `load` × capacity: 20% high (priority 0, TTFT SLO 1 s), 30% normal
(1, 5 s), 50% low (2, 20 s). A request meets its SLO when its first token comes within its class's TTFT; a shed
request misses it. Both parts run the real policy code on the same arrival trace for every policy:
- real: SmolLM2 through the local executor, replay_source → admission → policy_sort → route → engine →
  metrics_sink. Capacity is measured first in the same run (closed loop), then the Poisson trace replays.
- sim: the cluster simulator (`sagellm.simulator`) with many instances of three tiers (step models of their prefill
  and decode speeds, slots and prices) fed by the real `PolicySort` operator, whose policy reads the simulated
  `InstanceStats`, load and clock, and routed by the real `load_balanced` strategy among the instances with a free
  slot (a request its policy pinned keeps its instance, free or not). Service is modelled, the decisions are not.
  Requests arriving while slots and queue still fill are not counted.
The simulator's queue is bounded to `queue_s` seconds of capacity (`max_len`), so under sustained overload it sheds
by the policy's own order, as a deployed graph does. The real part's is unbounded by default (`--real-queue-seconds`).

With `--repeats N` each part replays N fresh traces (seed + repeat), every policy on each in turn, and reports
medians (the real part measures capacity once). The pieces: `policy_workload` (classes, tallies, medians),
`policy_sim` (the simulated part: tiers and trace), `policies_report` (tables, JSON, chart), this file (the real
engine, the command)."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sagellm.benchmarks.errors import BenchmarkError
from sagellm.benchmarks.policies_report import command, plot, print_tables, report_json
from sagellm.benchmarks.policy_sim import SimConfig, run_sim
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
from sagellm.benchmarks.report import add_repeats_argument, write_json_and_plot
from sagellm.common.errors import InvalidInput
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.pipeline.messages import Request

# -- real engine ------------------------------------------------------------------------------------------------


@dataclass
class RealConfig:
    model: str = "smollm2-135m-instruct"
    requests: int = 100  # per policy, the same trace for each
    capacity_requests: int = 24  # closed-loop requests of the capacity measurement
    prompt_len: int = 64
    output_len: int = 16  # short enough that 3 slot releases (see `_caption`) take about the high class's 1 s
    max_num_seqs: int = 4
    load: float = 2.0  # arrival rate / measured capacity
    queue_s: float = 0.0  # unbounded: a shed error waits for a free engine slot in route, stalling the source
    threads: int | None = None
    seed: int = 0  # repeat r's trace uses seed + r
    repeats: int = 1
    policies: tuple[str, ...] = POLICIES
    progress: bool = True

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise InvalidInput(f"repeats must be >= 1, got {self.repeats}")


def run_real(config: RealConfig) -> Part:
    """Capacity first (closed loop at 2 × max_num_seqs in flight), then per repeat a fresh Poisson trace (seed +
    repeat) through every policy in turn."""
    from sagellm.benchmarks.workloads import random_token_prompts
    from sagellm.operators.replay_source import poisson_offsets
    from sagellm.runtime.models.model_cache import resolve_model
    from sagellm.runtime.pipeline.served_model import served_model

    model = str(resolve_model(config.model))
    tokenizer = served_model({"model": model}).tokenizer  # loaded once: every run's admission reuses it
    warm = random_token_prompts(tokenizer, config.capacity_requests, config.prompt_len, (config.seed, 0))
    capacity = _measure_capacity(config, model, warm)
    arrival = config.load * capacity
    bound = max_queue(config.queue_s, capacity)
    part = Part("real", _real_json(config, model))
    for repeat in range(config.repeats):
        seed = config.seed + repeat
        prompts = random_token_prompts(tokenizer, config.requests, config.prompt_len, (seed, 1))
        classes = class_sequence(config.requests, np.random.default_rng(seed))
        offsets = poisson_offsets(config.requests, arrival, seed)
        part.traces.append({"seed": seed, "capacity_rps": capacity, "arrival_rps": arrival, "max_queue": bound})
        for policy in config.policies:
            requests = [_request(f"w6-{i}", p, config, c) for i, (p, c) in enumerate(zip(prompts, classes))]
            label = policy if config.repeats == 1 else f"{policy} run {repeat + 1}/{config.repeats}"
            result, started = _replay(config, model, policy, bound, requests, offsets, None, label)
            part.runs.append(_policy_run(policy, repeat, requests, classes, result, started))
    return part


def _policy_run(
    policy: str, repeat: int, requests: list[Request], classes: list[TrafficClass], result: Any, started: float
) -> PolicyRun:
    """One replay's tallies per class and what the policy, the engine and the errors report."""
    run = new_run(policy, repeat)
    engine_met = 0
    for request, cls in zip(requests, classes):
        # The replay source stamps each request with its intended arrival, so TTFT is what a client sees,
        # source backpressure included, and the engine's own slo_met agrees with it.
        outcome = result.outcomes[request.request_id]
        served = outcome.error is None and outcome.metrics is not None and outcome.metrics.ttft_s is not None
        run.record(cls, outcome.metrics.ttft_s if served else None)
        engine_met += bool(served and outcome.metrics.slo_met)
    run.stats = {"wall_s": time.time() - started, "engine_slo_met": engine_met}
    run.stats |= policy_state(result.operators["policy_sort"].policy)
    run.stats["engine_tokens_per_s_estimate"] = result.operators["engine"].stats.tokens_per_s
    codes = Counter(o.error.code for o in result.outcomes.values() if o.error is not None)
    run.stats |= {f"errors_{code}": n for code, n in sorted(codes.items())}
    return run


def _request(rid: str, prompt: list[int], config: RealConfig, cls: TrafficClass | None) -> Request:
    sampling = SamplingParams(max_tokens=config.output_len, ignore_eos=True, temperature=0.0)
    if cls is None:
        return Request(request_id=rid, prompt_token_ids=list(prompt), sampling=sampling, priority=1)
    return Request(
        request_id=rid,
        prompt_token_ids=list(prompt),
        sampling=sampling,
        priority=cls.priority,
        ttft_slo_ms=cls.ttft_slo_ms,
    )


def _measure_capacity(config: RealConfig, model: str, prompts: list[list[int]]) -> float:
    """Completed requests/s in steady state: from the `max_num_seqs`-th finish to the last."""
    requests = [_request(f"cap-{i}", p, config, None) for i, p in enumerate(prompts)]
    result, _ = _replay(config, model, "fifo", None, requests, None, 2 * config.max_num_seqs, "capacity")
    finishes = sorted(r.arrival_time + result.outcomes[r.request_id].metrics.e2e_s for r in requests)
    first = min(config.max_num_seqs, len(finishes) - 1) - 1
    if first < 0 or finishes[-1] <= finishes[first]:
        raise BenchmarkError(f"capacity: need more than {config.max_num_seqs} requests to measure steady throughput")
    return (len(finishes) - 1 - first) / (finishes[-1] - finishes[first])


def _replay(
    config: RealConfig,
    model: str,
    policy: str,
    bound: int | None,
    requests: list[Request],
    offsets: list[float] | None,
    max_in_flight: int | None,
    label: str,
) -> tuple[Any, float]:
    """One pass of the graph over `requests`; returns the result and when the replay started (after loading)."""
    import trio

    from sagellm.dsl import Pipeline
    from sagellm.operators.replay_source import ReplaySource
    from sagellm.runtime.executor.local import LocalExecutor

    p = Pipeline("w6", model=model)
    engine = dict(max_num_seqs=config.max_num_seqs, num_threads=config.threads)
    nodes = [
        p.add("replay_source", id="source"),
        p.add("admission"),
        p.add("policy_sort", policy=policy, max_len=bound),
        p.add("route"),
        p.add("engine", **engine),
        p.add("metrics_sink"),
    ]
    p.chain(*nodes)
    source = ReplaySource(requests, offsets_s=offsets, max_in_flight=max_in_flight)
    executor = LocalExecutor(p.graph(), operators={"source": source})

    async def main() -> tuple[Any, float]:
        await executor.open_operators()  # the engine loads here, outside the timed replay
        with tqdm(total=len(requests), desc=f"real {label}", unit="req", disable=not config.progress) as bar:
            executor.ledger.on_terminal.append(lambda _: bar.update(1))
            started = time.time()
            return await executor.run(), started

    return trio.run(main)


def _real_json(config: RealConfig, model: str) -> dict[str, Any]:
    keys = ("requests", "capacity_requests", "prompt_len", "output_len", "max_num_seqs", "load", "queue_s", "seed")
    keys += ("repeats",)
    return {"model": model, "weights": "float32 (a GGUF is dequantized)"} | {k: getattr(config, k) for k in keys}


# -- command line -------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n", 1)[0]
    parser.add_argument("--parts", default="real,sim", help="comma list of real,sim (default: %(default)s)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma list of %(default)s")
    parser.add_argument("--model", "-m", default=RealConfig.model, help="real: model path or alias (%(default)s)")
    parser.add_argument("--requests", type=int, default=RealConfig.requests, help="real: requests per policy")
    parser.add_argument(
        "--capacity-requests",
        type=int,
        default=RealConfig.capacity_requests,
        help="real: closed-loop requests measuring capacity (default: %(default)s)",
    )
    parser.add_argument("--prompt-len", type=int, default=RealConfig.prompt_len, help="real: prompt tokens")
    parser.add_argument("--output-len", type=int, default=RealConfig.output_len, help="real: output tokens")
    parser.add_argument("--max-num-seqs", type=int, default=RealConfig.max_num_seqs, help="real: engine slots")
    parser.add_argument("--threads", type=int, default=None, help="real: torch threads (default: all cores)")
    parser.add_argument("--sim-instances", type=int, default=SimConfig.instances, help="sim: instances")
    parser.add_argument("--sim-requests", type=int, default=SimConfig.requests, help="sim: requests per policy")
    parser.add_argument("--load", type=float, default=2.0, help="arrival rate / capacity (default: %(default)s)")
    parser.add_argument(
        "--queue-seconds",
        type=float,
        default=SimConfig.queue_s,
        help="sim: queue bound in seconds of capacity; 0: unbounded (default: %(default)s)",
    )
    parser.add_argument(
        "--real-queue-seconds",
        type=float,
        default=RealConfig.queue_s,
        help="real: queue bound in seconds of capacity; 0: unbounded (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts, classes and arrivals (+ repeat)")
    add_repeats_argument(parser, "policies")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/policies"),
        help="writes OUT.json and OUT.png (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning or error (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    import torch

    from sagellm.benchmarks.offline import machine_info

    started = time.perf_counter()
    parts_wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    unknown = sorted(set(parts_wanted) - {"real", "sim"}) + sorted(set(policies) - set(POLICIES))
    if unknown or not parts_wanted or not policies:
        print(f"error: unknown or no parts/policies {unknown}; parts: real, sim; policies: {POLICIES}", file=sys.stderr)
        return 2
    common = dict(
        load=args.load, seed=args.seed, repeats=args.repeats, policies=policies, progress=not args.no_progress
    )
    parts: list[Part] = []
    if "real" in parts_wanted:
        real = RealConfig(
            model=args.model,
            requests=args.requests,
            capacity_requests=args.capacity_requests,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            max_num_seqs=args.max_num_seqs,
            threads=args.threads,
            queue_s=args.real_queue_seconds,
            **common,
        )
        parts.append(run_real(real))
    if "sim" in parts_wanted:
        parts.append(
            run_sim(
                SimConfig(
                    instances=args.sim_instances, requests=args.sim_requests, queue_s=args.queue_seconds, **common
                )
            )
        )
    machine = machine_info(args.threads or torch.get_num_threads())
    print_tables(parts, machine)
    results = report_json(parts, machine, command(args), time.perf_counter() - started)
    json_path, png_path = write_json_and_plot(args.out, results, lambda png: plot(parts, png))
    print(f"results: {json_path}\nchart: {png_path}", file=sys.stderr)
    return 0
