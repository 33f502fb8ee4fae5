"""`sagellm bench steps`' default calibration: our engine's steps timed where it serves, inside the W4 benchmark's
colocated graph (replay_source → admission → policy_sort → route → engine → metrics_sink, in this process), whose
executor's event loop and sinks share the cores with torch's threads and make a step 10-25% slower than the same step
alone. A calibration trace (`calibration_trace`) drives it: a closed loop whose number of requests in flight climbs
from 1 to `max_num_seqs` (decode batches of every size, prompt chunks beside them), prompts of 16 to 2,048 tokens
(chunks after up to 1,536 earlier prompt tokens) and outputs of 4 to 128 tokens. It is not a validation trace
(sim-check's are Poisson, of other shapes and seeds): nothing is fitted on what it is judged by. Every step the engine
runs is timed from the end of the step before it when the engine was busy then (the executor's turn between steps is
part of a served step), and steps of like composition (quarter-octave bins) are pooled into one sample, their medians.

Given `cores`, the engine is pinned there as an engine given `device_ids` pins its process (a prefill or decode
worker's one core, its event loop beside its torch thread), and this process's affinity is put back after;
`serving_beside` keeps another engine busy on the other worker's cores meanwhile."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
from tqdm import tqdm

from sagellm.benchmarks.step_bench_config import StepBenchConfig
from sagellm.benchmarks.step_timer import OtherLoad, StepTimer, kind_of, pool
from sagellm.common.affinity import pin_process, usable_cores
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.simulator.step_model import StepSample

LOAD_WINDOW_S = 0.5  # the rest of the machine's load is judged per window of this length


def calibration_trace(config: StepBenchConfig, tokenizer: Any) -> tuple[list[Any], list[tuple[int, int]]]:
    """The requests (seeded random prompts and lengths, no prefix-cache hits) and the closed loop's phases, (requests
    released before it, requests in flight): each phase turns its batch over `trace_turnover` requests beyond its
    limit, the last (`max_num_seqs`) twice, so decode batches of every size run beside fresh prompts' chunks."""
    from sagellm.benchmarks.workloads import random_token_prompts
    from sagellm.runtime.pipeline.messages import Request

    rng = np.random.default_rng((config.seed, 7))
    phases, total = [], 0
    for index, limit in enumerate(config.limits):
        phases.append((total, limit))
        total += (limit + config.trace_turnover) * (2 if index == len(config.limits) - 1 else 1)
    lengths = rng.choice(config.trace_prompt_lens, size=total)
    outputs = rng.choice(config.trace_output_lens, size=total)
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


def calibrate_in_pipeline(
    config: StepBenchConfig,
) -> tuple[list[StepSample], list[str], list[float], list[int], dict[str, Any]]:
    """Serves `calibration_trace` through the W4 benchmark's colocated graph, in this process, with a `StepTimer` on
    its engine; the rest of the machine's load is read every `LOAD_WINDOW_S` and steps in busy windows dropped.
    Each step's time runs from the end of the step before it when the engine was busy then, else from its start.
    Steps of like composition are pooled (`pool`)."""
    import trio

    from sagellm.benchmarks.pd_split import PDBenchConfig, build_graph
    from sagellm.operators.engine import EngineOperator
    from sagellm.runtime.executor.local import LocalExecutor
    from sagellm.runtime.models.loader import load_model

    tokenizer = load_model(config.model, load_weights=False).tokenizer
    requests, phases = calibration_trace(config, tokenizer)
    pd = PDBenchConfig(
        model=config.model,
        configs=("colocated",),
        colocated_threads=config.threads or os.cpu_count() or 1,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
    )
    graph = build_graph("colocated", pd)
    engine_id = next(node.id for node in graph.nodes.values() if node.op == "engine")
    if config.cores:
        graph.nodes[engine_id].params["device_ids"] = list(config.cores)
    timers: list[StepTimer] = []

    class TimedEngine(EngineOperator):
        def open(self, ctx: Any) -> None:
            super().open(ctx)
            timers.append(StepTimer(self.engine))
            timers[-1].log = []

    engine_op = TimedEngine(**graph.nodes[engine_id].params)
    executor = LocalExecutor(graph, operators={"source": _phased_source(requests, phases), engine_id: engine_op})
    windows: list[tuple[float, float]] = []  # (end, other cores since the previous end)

    async def main() -> None:
        async def watch(bar: tqdm) -> None:
            while True:
                load = OtherLoad()
                await trio.sleep(LOAD_WINDOW_S)
                windows.append((time.perf_counter(), load.cores()))
                bar.update(executor.load.completed + executor.load.failed - bar.n)

        with tqdm(total=len(requests), desc="calibration trace", unit="req", disable=not config.progress) as bar:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, bar)
                await executor.run()
                nursery.cancel_scope.cancel()

    affinity = usable_cores()
    try:
        trio.run(main)
    finally:
        pin_process(affinity)  # an engine given device_ids pinned this whole process
    failed = [o.error.message for o in executor.outcomes.values() if o.error is not None]
    if failed or len(executor.outcomes) < len(requests):
        raise RuntimeError(f"the calibration trace did not complete: {len(failed)} failed, e.g. {failed[:1]}")
    timed = timers[0].log or []
    ends = np.array([end for end, _ in windows])
    window_load = [
        windows[min(int(np.searchsorted(ends, t.ended)), len(windows) - 1)][1] if windows else 0.0 for t in timed
    ]
    cycles = [
        replace(t.sample, seconds=t.ended - (before.ended if before and before.busy_after else t.started))
        for before, t in zip([None, *timed[:-1]], timed)
    ]
    quiet = [s for s, load in zip(cycles, window_load) if load <= config.quiet_cores]
    samples, steps = pool(quiet)
    turn = [t.started - before.ended for before, t in zip(timed[:-1], timed[1:]) if before.busy_after]
    extra = {
        "calibrated": "in the serving pipeline: the colocated graph serving the calibration trace"
        + (f", the engine pinned to cores {list(config.cores)}" if config.cores else ""),
        "trace": {"requests": len(requests), "phases": phases, "seed": config.seed},
        "steps_timed": len(timed),
        "steps_busy": len(timed) - len(quiet),
        "turn_between_steps_ms_p50": 1e3 * float(np.median(turn)) if turn else None,
        "step_within_cycle_p50": float(np.median([t.sample.seconds / c.seconds for t, c in zip(timed, cycles)])),
    }
    return samples, [kind_of(s) for s in samples], [0.0] * len(samples), steps, extra


@contextlib.contextmanager
def serving_beside(config: StepBenchConfig) -> Iterator[None]:
    """Another engine, in a process of its own on `config.cores`, serving the calibration trace (of `config`'s seed)
    over and over while the block runs: a PD worker is timed with the other worker busy beside it, as they serve,
    since two engines side by side share the caches and memory bandwidth and each steps slower than alone."""
    process = multiprocessing.get_context("spawn").Process(target=_serve_forever, args=(config,), daemon=True)
    process.start()
    try:
        yield
    finally:
        process.kill()
        process.join()


def _serve_forever(config: StepBenchConfig) -> None:
    while True:
        calibrate_in_pipeline(config)
