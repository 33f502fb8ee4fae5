"""The prefill/decode split benchmark (W4): one Poisson trace of mixed prompt lengths served by a colocated engine
and by prefill and decode engines in two worker processes, on the same cores, in one run.

The trace: 80% prompts of 64 random tokens, 20% of 1,024; 64 output tokens each (greedy, EOS ignored); Poisson
arrivals at `rate` requests/s, by default `load_factor` × the colocated engine's capacity, measured first in the
same run (a closed loop of `max_num_seqs` requests in flight). Every configuration replays the identical trace
through the real executors (`LocalExecutor`, `ProcessExecutor`), so the graph's queueing, routing and KV transfer
are all inside the numbers. Configurations:
- colocated: one `engine` in this process with every core's torch threads;
- pd: `prefill` and `decode` in two worker processes, each pinned to its own half of the cores (`device_ids`: one
  core each on a 2-core machine, a thread per core), pd_split sending
  prompts of at least `threshold_tokens` uncached tokens the PD path and keeping short ones colocated on decode;
- 2x-colocated: two `engine`s in two worker processes behind route, the same core split as pd.
Per request (from `RequestMetrics`, wall clock from its release by the source): TTFT, TPOT; goodput counts the
requests meeting both SLOs per second of the run. With `repeats` > 1 every repeat replays a fresh trace (seed +
repeat) through every configuration in turn, so slow drift of a shared machine hits each alike; the report shows
medians. This file runs the benchmark; `pd_split_report` summarizes it, draws it and holds the command line."""

from __future__ import annotations

import gc
import math
import random
from dataclasses import dataclass, field
from typing import Any

import trio
from tqdm import tqdm

from sagellm.common.affinity import usable_cores
from sagellm.common.errors import InvalidInput
from sagellm.operators.replay_source import ReplaySource, poisson_offsets
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.execution_graph.graph import Graph
from sagellm.runtime.executor.local import LocalExecutor, PipelineResult
from sagellm.runtime.pipeline.messages import Request

CONFIGS = ("colocated", "pd", "2x-colocated")
DESCRIPTIONS = {
    "colocated": "one engine in the main process",
    "pd": "prefill and decode engines in two worker processes, KV over ZeroMQ ipc://",
    "2x-colocated": "two engines in two worker processes behind route (load_balanced)",
}
SOURCE_OP = "replay_source"
PROGRESS_POLL_S = 0.2


@dataclass
class PDBenchConfig:
    model: str  # a path (or alias) every process can resolve
    num_requests: int = 60
    rate: float | None = None  # requests/s; None: load_factor × the measured colocated capacity
    load_factor: float = 0.7
    capacity_requests: int = 24  # closed-loop requests of the capacity measurement
    short_len: int = 64
    long_len: int = 1024
    long_fraction: float = 0.2
    output_len: int = 64
    threshold_tokens: int = 512  # pd_split: prompts with at least this many uncached tokens take the PD path
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.2
    configs: tuple[str, ...] = ("colocated", "pd")
    colocated_threads: int = 2  # torch threads of the single colocated engine
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    seed: int = 0  # repeat r's trace uses seed + r
    repeats: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.configs) - set(CONFIGS)
        if unknown or not self.configs:
            raise InvalidInput(f"configs must be among {', '.join(CONFIGS)}, got {sorted(unknown) or 'none'}")
        if min(self.num_requests, self.capacity_requests, self.repeats) < 1 or not 0 <= self.long_fraction <= 1:
            raise InvalidInput("num_requests, capacity_requests and repeats must be >= 1, long_fraction in [0, 1]")
        if (self.rate is not None and not self.rate > 0) or not self.load_factor > 0:
            raise InvalidInput(f"rate and load_factor must be > 0, got {self.rate} and {self.load_factor}")


@dataclass
class Trace:
    prompts: list[list[int]]
    offsets_s: list[float]  # arrival offsets from the first release

    def requests(self, config: PDBenchConfig) -> list[Request]:
        """Fresh requests (operators stamp them as they pass) carrying the SLOs, so engines fill `slo_met`."""
        sampling = dict(max_tokens=config.output_len, temperature=0.0, ignore_eos=True)
        return [
            Request(
                request_id=f"w4-{i:04d}",
                prompt_token_ids=list(prompt),
                sampling=SamplingParams(**sampling),
                ttft_slo_ms=1000 * config.ttft_slo_s,
                tpot_slo_ms=1000 * config.tpot_slo_s,
            )
            for i, prompt in enumerate(self.prompts)
        ]


@dataclass
class ConfigResult:
    """One configuration on one repeat's trace."""

    name: str
    repeat: int
    seed: int  # of the trace
    started: float  # unix time of the first release, to place the run among the others (drift, other load)
    wall_s: float  # first release to last finish
    requests: list[dict[str, Any]]  # per request: prompt_tokens, output_tokens, ttft_s, tpot_s, e2e_s, slo_met, error
    decisions: dict[str, int] = field(default_factory=dict)  # pd_split's, for the pd configuration


@dataclass
class PDBenchReport:
    config: PDBenchConfig
    capacity_req_s: float | None  # None when the rate was given
    rate: float
    machine: dict[str, object]
    results: list[ConfigResult]  # in run order: every configuration of repeat 0, then of repeat 1, ...

    def runs(self, name: str) -> list[ConfigResult]:
        return [r for r in self.results if r.name == name]


def make_trace(tokenizer: Any, config: PDBenchConfig, count: int, rate: float | None, *, seed: int) -> Trace:
    """Exactly round(long_fraction × count) long prompts at seeded random positions; Poisson offsets at `rate`
    (all at 0 without a rate). Prompts, positions and arrivals all come from `seed`."""
    from sagellm.benchmarks.workloads import random_token_prompts

    num_long = round(config.long_fraction * count)
    long = random_token_prompts(tokenizer, num_long, config.long_len, (seed, 1))
    short = random_token_prompts(tokenizer, count - num_long, config.short_len, (seed, 0))
    is_long = [True] * num_long + [False] * (count - num_long)
    random.Random(seed).shuffle(is_long)
    prompts = [long.pop() if flag else short.pop() for flag in is_long]
    offsets = poisson_offsets(count, rate, seed) if rate else [0.0] * count
    return Trace(prompts, offsets)


def build_graph(kind: str, config: PDBenchConfig) -> Graph:
    """source → admission → policy_sort(fifo) → [pd_split →] route → engine(s) → metrics_sink."""
    from sagellm.dsl import Pipeline

    p = Pipeline(f"w4-{kind}", model=config.model, transport="ipc")
    head = [p.add(SOURCE_OP, "source"), p.add("admission"), p.add("policy_sort", policy="fifo")]
    if kind == "pd":
        head.append(p.add("pd_split", threshold_tokens=config.threshold_tokens))
    route = p.add("route")
    p.chain(*head, route)
    engine = dict(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens)
    if kind == "colocated":
        ends = [p.add("engine", num_threads=config.colocated_threads, **engine)]
        p.connect(route, *ends)
    elif kind == "pd":  # each role on its own half of the cores
        first, second = halves(usable_cores())
        prefill = p.add("prefill", placement="process:prefill", device_ids=first, **engine)
        transfer = p.add("kv_transfer", placement="process:decode")
        ends = [p.add("decode", placement="process:decode", device_ids=second, **engine)]
        p.connect(route, prefill, ends[0])
        p.chain(prefill, transfer, ends[0])
    else:
        ends = [
            p.add("engine", f"engine_{i}", placement=f"process:engine_{i}", device_ids=cores, **engine)
            for i, cores in enumerate(halves(usable_cores()), 1)
        ]
        p.connect(route, *ends)
    metrics = p.add("metrics_sink", "metrics")
    for end in ends:
        p.connect(end, metrics)
    return p.graph()


def run_config(
    graph: Graph, requests: list[Request], offsets_s: list[float] | None, bar: tqdm, **source: Any
) -> tuple[PipelineResult, float, float]:
    """Replays `requests` through `graph` (worker processes where it places nodes); -> (result, unix time of the
    first release, wall seconds from it to the last finish)."""
    replay = ReplaySource(requests, offsets_s, **source)
    if any(node.placement != "task" for node in graph.nodes.values()):
        from sagellm.runtime.executor.process import ProcessExecutor

        executor: Any = ProcessExecutor(graph, operators={"source": replay})
        load = executor.executor.load
    else:
        executor = LocalExecutor(graph, operators={"source": replay})
        load = executor.load

    async def main() -> PipelineResult:
        async def progress() -> None:
            while True:
                bar.update(load.completed + load.failed - bar.n)
                await trio.sleep(PROGRESS_POLL_S)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress)
            result = await executor.run()
            nursery.cancel_scope.cancel()
        bar.update(load.completed + load.failed - bar.n)
        return result

    result = trio.run(main)
    first = min(r.arrival_time for r in requests)
    ends = [r.arrival_time + o.metrics.e2e_s for r in requests if (o := result.outcomes.get(r.request_id)) and _e2e(o)]
    return result, first, (max(ends) - first) if ends else math.nan


def run_pd_bench(config: PDBenchConfig) -> PDBenchReport:
    """Capacity first (unless `rate` is given), then per repeat a fresh trace through every configuration in turn."""
    from sagellm.benchmarks.offline import machine_info
    from sagellm.runtime.models.loader import load_model

    tokenizer = load_model(config.model, load_weights=False).tokenizer
    capacity, rate = None, config.rate
    if rate is None:
        probe = make_trace(tokenizer, config, config.capacity_requests, None, seed=config.seed).requests(config)
        with tqdm(total=len(probe), desc="capacity", unit="req", disable=not config.progress) as bar:
            graph = build_graph("colocated", config)
            _, _, wall = run_config(graph, probe, None, bar, max_in_flight=config.max_num_seqs)
        capacity = len(probe) / wall
        rate = config.load_factor * capacity
        gc.collect()
    results = []
    for repeat in range(config.repeats):
        seed = config.seed + repeat
        trace = make_trace(tokenizer, config, config.num_requests, rate, seed=seed)
        for kind in config.configs:
            requests = trace.requests(config)
            desc = kind if config.repeats == 1 else f"{kind} run {repeat + 1}/{config.repeats}"
            with tqdm(total=len(requests), desc=desc, unit="req", disable=not config.progress) as bar:
                result, started, wall = run_config(build_graph(kind, config), requests, trace.offsets_s, bar)
            split = result.operators.get("pd_split")
            decisions = dict(split.decisions) if split is not None else {}
            rows = [_request_row(r, result) for r in requests]
            results.append(ConfigResult(kind, repeat, seed, started, wall, rows, decisions))
            del result
            gc.collect()
    return PDBenchReport(config, capacity, rate, machine_info(config.colocated_threads), results)


def _request_row(request: Request, result: PipelineResult) -> dict[str, Any]:
    outcome = result.outcomes.get(request.request_id)
    m = outcome.metrics if outcome is not None else None
    error = outcome.error if outcome is not None else None
    return {
        "id": request.request_id,
        "prompt_tokens": request.num_prompt_tokens,
        "output_tokens": len(outcome.token_ids) if outcome is not None else 0,
        "ttft_s": m.ttft_s if m else None,
        "tpot_s": m.tpot_s if m else None,
        "e2e_s": m.e2e_s if m else None,
        "slo_met": m.slo_met if m else False,
        "error": f"{error.code}: {error.message}" if error else (None if outcome else "never finished"),
    }


def _e2e(outcome: Any) -> bool:
    return outcome.metrics is not None and outcome.metrics.e2e_s is not None


def halves(cores: list[int]) -> tuple[list[int], list[int]]:
    """Two engines' cores: the first and second half (one each on a 2-core machine; both all of one core on one)."""
    if len(cores) == 1:
        return cores, cores
    return cores[: len(cores) // 2], cores[len(cores) // 2 :]
