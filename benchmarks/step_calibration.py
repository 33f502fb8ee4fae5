"""`sagellm bench steps`' default calibration: our engine's steps timed where it serves, inside the W4 benchmark's
colocated graph (replay_source → admission → policy_sort → route → engine → metrics_sink, in this process), whose
executor's event loop and sinks share the cores with torch's threads and make a step 10-25% slower than the same step
alone; or inside its pd graph, where each worker also shares its core with its bridge to the main process and steps
beside the other worker. A calibration trace (`calibration_trace`) drives it: a closed loop whose number of requests
in flight climbs from 1 to `max_num_seqs` (decode batches of every size, prompt chunks beside them), prompts of 16 to
2,048 tokens (chunks after up to 1,536 earlier prompt tokens) and outputs of 4 to 128 tokens, then climbs again with
prompts of 16 to 128 tokens (decode batches over short contexts). It is not a validation trace (sim-check's are
Poisson, of other shapes and seeds): nothing is fitted on what it is judged by. Every step the engine runs is timed
from the end of the step before it when the engine was busy then (the executor's turn between steps is part of a
served step), and steps of like composition (quarter-octave bins) are pooled into one sample: their median composition
and their mean time (`step_timer.pooled_sample` says why the mean).
The engines time themselves (`SAGELLM_STEP_TRACE`, `runtime.engine.step_trace`), in whichever process runs them."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sagellm.benchmarks.errors import BenchmarkError
from sagellm.benchmarks.step_bench_config import StepBenchConfig
from sagellm.benchmarks.step_timer import OtherLoad, busy_fraction, kind_of, pool, sample_of
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.step_trace import TRACE_ENV, TimedStep, read_trace
from sagellm.simulator.step_model import StepSample

LOAD_WINDOW_S = 0.5  # the rest of the machine's load is judged per window of this length


def calibration_trace(config: StepBenchConfig, tokenizer: Any) -> tuple[list[Any], list[tuple[int, int]]]:
    """The requests (seeded random prompts and lengths, no prefix-cache hits) and the closed loop's phases, (requests
    released before it, requests in flight). In-flight requests climb `limits` twice: over prompts of every length,
    then over short ones only (`trace_short_*`), since a climb of mixed lengths almost never runs a decode batch of
    only short contexts, and a model fitted without them put a W6-like batch (4 sequences of ~70 tokens) 25% slow.
    Each phase turns its batch over `trace_turnover` requests beyond its limit, a climb's last (`max_num_seqs`)
    twice, so decode batches of every size run beside fresh prompts' chunks."""
    from sagellm.benchmarks.workloads import random_token_prompts
    from sagellm.runtime.pipeline.messages import Request

    rng = np.random.default_rng((config.seed, 7))
    climbs = [(config.trace_prompt_lens, config.trace_output_lens)]
    if config.trace_short_prompt_lens:
        climbs.append((config.trace_short_prompt_lens, config.trace_short_output_lens))
    phases: list[tuple[int, int]] = []
    lengths: list[int] = []
    outputs: list[int] = []
    for prompt_lens, output_lens in climbs:
        for index, limit in enumerate(config.limits):
            phases.append((len(lengths), limit))
            count = (limit + config.trace_turnover) * (2 if index == len(config.limits) - 1 else 1)
            lengths += rng.choice(prompt_lens, size=count).tolist()
            outputs += rng.choice(output_lens, size=count).tolist()
    requests = []
    for i, (length, output) in enumerate(zip(lengths, outputs)):
        prompt = random_token_prompts(tokenizer, 1, int(length), (config.seed, 7, i))[0]
        sampling = SamplingParams(max_tokens=int(output), temperature=0.0, ignore_eos=True)
        requests.append(Request(request_id=f"cal-{i:04d}", prompt_token_ids=prompt, sampling=sampling))
    return requests, phases


def _phased_source(requests: list[Any], phases: list[tuple[int, int]]) -> Any:
    from sagellm.operators.replay_source import ReplaySource

    class PhasedSource(ReplaySource):
        """A closed loop whose requests in flight follow `phases` as requests are released."""

        def poll(self) -> list[Any] | None:
            self.max_in_flight = next(limit for first, limit in reversed(phases) if self._next >= first)
            return super().poll()

    return PhasedSource(requests, max_in_flight=phases[0][1])


@dataclass
class MeasuredSteps:
    """One engine's measurement, before the fit: its samples (pooled served steps, or the bare engine's
    compositions), each one's kind, the rest of the machine's busy cores while it was timed and how many steps it
    pools; the single steps behind the pooled samples (None: not pooled); what to say of the calibration."""

    samples: list[StepSample]
    kinds: list[str]
    other_cores: list[float]
    steps: list[int]
    extra: dict[str, Any]
    single_steps: list[StepSample] | None = None


def calibrate_in_pipeline(config: StepBenchConfig, kind: str = "colocated") -> dict[str, MeasuredSteps]:
    """Serves `calibration_trace` through the W4 benchmark's `kind` graph: the colocated one (in this process), or
    the pd one (prefill and decode workers in two processes, a core and a torch thread each, prompts of 512 tokens or
    more prefilled apart), whose workers' steps are timed where they serve: beside each other, each behind its
    process's bridge to the main one. Every engine writes its steps (`SAGELLM_STEP_TRACE`); the rest of the
    machine's load is read every `LOAD_WINDOW_S` (the workers' own CPU not counted) and steps in busy windows
    dropped. Each step's time runs from the end of the step before it when the engine was busy then, else from its
    start, and in the pd graph each records the fraction of that time the other worker computed (the step model's
    neighbour slowdown is fitted on it). Steps of like composition are pooled (`pool`). -> by engine node."""
    import trio

    from sagellm.benchmarks.pd_split import PDBenchConfig, build_graph
    from sagellm.runtime.executor.local import LocalExecutor
    from sagellm.runtime.executor.process import ProcessExecutor
    from sagellm.runtime.models.loader import load_model

    tokenizer = load_model(config.model, load_weights=False).tokenizer
    requests, phases = calibration_trace(config, tokenizer)
    pd = PDBenchConfig(
        model=config.model,
        configs=(kind,),
        colocated_threads=config.threads or os.cpu_count() or 1,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
    )
    graph = build_graph(kind, pd)
    source = _phased_source(requests, phases)
    if kind == "colocated":
        executor: Any = LocalExecutor(graph, operators={"source": source})
        load, pids = executor.load, {}
    else:
        executor = ProcessExecutor(graph, operators={"source": source})
        load, pids = executor.executor.load, executor.pids
    windows: list[tuple[float, float]] = []  # (end, other cores since the previous end)

    async def main() -> None:
        async def watch(bar: tqdm) -> None:
            while True:
                other = OtherLoad(pids=list(pids.values()))
                await trio.sleep(LOAD_WINDOW_S)
                windows.append((time.perf_counter(), other.cores()))
                bar.update(load.completed + load.failed - bar.n)

        desc = f"calibration trace ({kind})"
        with tqdm(total=len(requests), desc=desc, unit="req", disable=not config.progress) as bar:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, bar)
                result = await executor.run()
                nursery.cancel_scope.cancel()
        failed = [o.error.message for o in result.outcomes.values() if o.error is not None]
        if failed or len(result.outcomes) < len(requests):
            raise BenchmarkError(f"the calibration trace did not complete: {len(failed)} failed, e.g. {failed[:1]}")

    with step_tracing() as trace_dir:
        trio.run(main)
        served = served_steps(trace_dir)
    ends = np.array([end for end, _ in windows])
    calibrated = f"in the serving pipeline: the {kind} graph serving the calibration trace"
    by_engine = {}
    for engine, cycles in served.items():
        quiet = [
            cycle
            for t, cycle in cycles
            if not windows
            or windows[min(int(np.searchsorted(ends, t.ended)), len(windows) - 1)][1] <= config.quiet_cores
        ]
        samples, steps = pool(quiet)
        extra = {
            "calibrated": calibrated + (f", the {engine} worker's steps (a core each)" if kind == "pd" else ""),
            "trace": {"requests": len(requests), "phases": phases, "seed": config.seed},
            "steps_timed": len(cycles),
            "steps_busy": len(cycles) - len(quiet),
            "step_within_cycle_p50": float(np.median([t.seconds / c.seconds for t, c in cycles])) if cycles else None,
        }
        kinds = [kind_of(s) for s in samples]
        by_engine[engine] = MeasuredSteps(samples, kinds, [0.0] * len(samples), steps, extra, quiet)
    return by_engine


@contextlib.contextmanager
def step_tracing() -> Iterator[Path]:
    """Every engine started inside the block, in this process or its workers, writes its steps into the directory
    it yields (`SAGELLM_STEP_TRACE`): read them with `served_steps` before it ends."""
    with tempfile.TemporaryDirectory(prefix="sagellm-steps-") as trace_dir, _environ(TRACE_ENV, trace_dir):
        yield Path(trace_dir)


def served_steps(trace_dir: Path) -> dict[str, list[tuple[TimedStep, StepSample]]]:
    """The steps each engine node wrote into `trace_dir`, each with its sample: timed from the end of the step
    before it when the engine was busy then (the executor's turn between steps is part of a served step), else from
    its start, and with the fraction of that time another engine computed (`busy_fraction`)."""
    traces = {path.stem: read_trace(path) for path in sorted(trace_dir.glob("*.jsonl"))}
    by_engine = {}
    for name, timed in traces.items():  # perf_counter is the machine's monotonic clock: one across processes
        others = [(steps, np.array([t.started for t in steps])) for other, steps in traces.items() if other != name]
        cycles = []
        for before, t in zip([None, *timed[:-1]], timed):
            begin = before.ended if before and before.busy_after else t.started
            busy = max((busy_fraction(begin, t.ended, *other) for other in others), default=0.0)
            cycles.append((t, sample_of(t, t.ended - begin, busy)))
        by_engine[name.rsplit("-", 1)[0]] = cycles
    return by_engine


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """`name=value` in this process's environment (and its workers') while the block runs."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before
