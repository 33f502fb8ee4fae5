"""`sagellm bench steps`: how long one step of our engine takes for what it computes, fitted into the `StepModel` the
cluster simulator (`sagellm simulate`) times its instances with.

By default the steps are timed where the engine serves, in the colocated graph on a calibration trace
(`step_calibration`).

With `bare`, the engine (`LLMEngine`, loaded as an engine node loads it) is driven directly with batches built to a
known composition, each `engine.step()` timed whole (schedule, model, sampling, detokenizing) on the wall clock:
- prefill: one fresh prompt per step, of each chunk size up to `max_num_batched_tokens`, nothing else running;
- chunked: long prompts (`long_prompt_lens`) chunk by chunk, each chunk after all earlier chunks of its prompt;
- decode: for each context length, requests join one at a time until `max_num_seqs` run; at every batch size the
  steps that only decode are timed;
- mixed: at some of those batch sizes, a fresh prompt chunk beside the running decodes, and (at the first context
  length) a `mixed_long_len` prompt's chunks beside them.
Each composition is timed `repeats` times after `warmup` untimed steps; a sample is the median.

Either way what a step computed is read from the scheduler's own batch (`StepTimer` wraps `Scheduler.schedule`),
never assumed, and steps timed while other processes kept the cores busy are left out. The fit (`StepModel.fit`) is
written with the samples, the machine, the engine settings and how it was calibrated (`source["calibrated"]`)."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from tqdm import tqdm

from sagellm.benchmarks.step_bench_config import StepBenchConfig
from sagellm.benchmarks.step_calibration import MeasuredSteps, calibrate_in_pipeline
from sagellm.benchmarks.step_timer import OtherLoad, median_sample, sample_of
from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.step_trace import StepTimer
from sagellm.simulator.step_model import COEFFICIENTS, StepModel, StepSample

KINDS = ("prefill", "chunked", "decode", "mixed")
MIN_QUIET_SAMPLES = 8  # fewer samples timed while the machine was quiet: fit them all
log = structlog.get_logger("sagellm.bench.steps")


@dataclass
class Calibration:
    """What `calibrate` measured and fitted."""

    model: StepModel
    samples: list[StepSample]
    kinds: list[str]  # of each sample: prefill, chunked, decode or mixed
    other_cores: list[float]  # of each sample: the rest of the machine's busy cores while it was timed
    wall_s: float
    settings: dict[str, Any] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)  # of each sample: the engine steps pooled into it

    def busy(self, index: int) -> bool:
        """Sample `index` was timed while the rest of the machine was busy (left out of the fit)."""
        return self.other_cores[index] > self.settings["quiet_cores"]

    def errors(self, kind: str | None = None) -> np.ndarray:
        """The fit's relative error on the samples (of `kind`) it was fitted on."""
        chosen = [s for i, (s, k) in enumerate(zip(self.samples, self.kinds)) if kind in (None, k) and not self.busy(i)]
        return self.model.relative_errors(chosen) if chosen else np.array([])


class _Sweep:
    """One bare-engine calibration run: fresh random prompts (no prefix-cache hits), samples as they come."""

    def __init__(self, engine: LLMEngine, config: StepBenchConfig, bar: tqdm) -> None:
        from sagellm.benchmarks.workloads import random_token_prompts

        self.engine, self.config, self.bar = engine, config, bar
        self.timer = StepTimer(engine)
        self.samples: list[StepSample] = []
        self.kinds: list[str] = []
        self.other_cores: list[float] = []
        self._count = 0
        self._prompt = lambda length: random_token_prompts(engine.tokenizer, 1, length, (config.seed, self._count))[0]

    def step(self) -> StepSample:
        return sample_of(self.timer.step())

    def add(self, length: int, max_tokens: int | None) -> str:
        self._count += 1
        rid = f"step-{self._count}"
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.engine.add_request(rid, self._prompt(length), params)
        return rid

    def record(self, kind: str, measured: list[tuple[StepSample, float]]) -> None:
        for sample, load in measured:
            self.samples.append(sample)
            self.kinds.append(kind)
            self.other_cores.append(load)
            self.bar.update(1)

    def timed(self, run: Callable[[], list[StepSample]]) -> list[tuple[StepSample, float]]:
        """Each position's median over `run()`s (a step, or a prompt's chunks) repeated at least `repeats` times and
        `window_s`, with the rest of the machine's load meanwhile; retried while that load was not quiet, the
        quietest try kept."""
        c = self.config
        tries = []
        for _ in range(1 + c.retries):
            load, started, runs = OtherLoad(), time.perf_counter(), []
            while len(runs) < c.repeats or time.perf_counter() - started < c.window_s:
                runs.append(run())
            tries.append(([median_sample(list(steps)) for steps in zip(*runs)], load.cores()))
            if tries[-1][1] <= c.quiet_cores:
                break
        samples, load = min(tries, key=lambda t: t[1])
        return [(s, load) for s in samples]

    def chunk(self, length: int) -> list[tuple[StepSample, float]]:
        """A fresh prompt of `length` tokens beside whatever runs, once per step: it ends after that step."""

        def step() -> list[StepSample]:
            self.add(length, max_tokens=1)
            return [self.step()]

        return self.timed(step)

    def prompt_chunks(self, length: int) -> list[tuple[StepSample, float]]:
        """A fresh prompt of `length` tokens beside whatever runs, timed chunk by chunk until its prompt is done (the
        step of its last chunk ends it): each chunk after the earlier ones."""

        def chunks() -> list[StepSample]:
            self.add(length, max_tokens=1)
            steps = [self.step()]
            while steps[-1].prefill_tokens and sum(s.prefill_tokens for s in steps) < length:
                steps.append(self.step())
            return steps

        return self.timed(chunks)

    def decodes(self) -> list[tuple[StepSample, float]]:
        for _ in range(self.config.warmup):
            self.step()
        return self.timed(lambda: [self.step()])

    def decode_sweep(self, context_len: int, long_mixed: bool) -> None:
        """Requests of `context_len` prompt tokens join one by one; at each batch size its decode steps (and at the
        mixed sizes, chunks beside them; with `long_mixed`, a long prompt's chunks too) are timed. All are aborted
        at the end."""
        c, engine = self.config, self.engine
        room = engine.max_model_len - context_len
        ids = []
        for size in range(1, c.max_num_seqs + 1):
            ids.append(self.add(context_len, max_tokens=room))
            while self.step().prefill_tokens:  # its prompt, chunk by chunk beside the others' decodes
                pass
            if size in c.mixed_batch_sizes and size < c.max_num_seqs:  # a full batch admits no prompt
                for length in sorted({min(n, c.max_num_batched_tokens - size) for n in c.mixed_chunk_sizes}):
                    if length >= 2:
                        self.record("mixed", self.chunk(length))
                if long_mixed:
                    self.record("mixed", self.prompt_chunks(c.mixed_long_len))
            self.record("decode", self.decodes())
        for rid in ids:
            engine.abort_request(rid)

    def run(self) -> None:
        c = self.config
        self.add(c.max_num_batched_tokens, max_tokens=8)  # warm-up: first calls of each kernel, page faults
        while self.engine.has_unfinished_requests():
            self.step()
        for length in sorted({min(n, c.max_num_batched_tokens) for n in c.chunk_sizes}):
            self.record("prefill", self.chunk(length))
        for length in c.long_prompt_lens:
            self.record("chunked", self.prompt_chunks(length))
        for index, context_len in enumerate(c.context_lens):
            self.decode_sweep(context_len, long_mixed=index == 0)


def planned_samples(config: StepBenchConfig) -> int:
    """How many samples the bare calibration takes: the progress bar's total."""
    budget = config.max_num_batched_tokens
    chunks = len({min(n, budget) for n in config.chunk_sizes})
    chunks += sum(math.ceil(n / budget) for n in config.long_prompt_lens)
    sizes = [size for size in config.mixed_batch_sizes if size < config.max_num_seqs]
    mixed = sum(len({m for n in config.mixed_chunk_sizes if (m := min(n, budget - size)) >= 2}) for size in sizes)
    long_mixed = sum(math.ceil(config.mixed_long_len / (budget - size)) for size in sizes)  # first context length
    return chunks + len(config.context_lens) * (config.max_num_seqs + mixed) + long_mixed


def calibrate(config: StepBenchConfig, engine: LLMEngine | None = None) -> Calibration:
    """Calibrates in the colocated graph (`calibrate_in_pipeline`), or with `config.bare` on the bare engine (loaded
    here unless given one built with `config`'s settings): measures, fits, says how in `source["calibrated"]`."""
    started = time.perf_counter()
    if config.bare:
        measured = _calibrate_bare(config, engine)
    else:
        (measured,) = calibrate_in_pipeline(config).values()
    return _fit(config, measured, time.perf_counter() - started)


def calibrate_pd_workers(config: StepBenchConfig) -> dict[str, Calibration]:
    """The PD graph's workers calibrated where they serve (`calibrate_in_pipeline(config, "pd")`): a model each,
    for "prefill" and "decode", since the two serve unlike steps (long prompts' chunks on one, the short prompts
    and every decode on the other) on cores that are not alike."""
    started = time.perf_counter()
    measured = calibrate_in_pipeline(config, "pd")
    wall = time.perf_counter() - started
    return {engine: _fit(config, m, wall) for engine, m in measured.items()}


def _calibrate_bare(config: StepBenchConfig, engine: LLMEngine | None) -> MeasuredSteps:
    from sagellm.runtime.engine.config import EngineConfig
    from sagellm.runtime.parallel.engine import start_engine

    # The sweep sets each step's composition itself: the long prompts' shares (a scheduling policy, not a step's
    # cost) would cut the chunks it times.
    settings = {"max_num_seqs": config.max_num_seqs, "max_num_batched_tokens": config.max_num_batched_tokens,
                "long_prefill_token_threshold": 0}  # fmt: skip
    own = engine is None
    if engine is None:
        engine = start_engine(
            EngineConfig(model=config.model, num_threads=config.threads, seed=config.seed, **settings)
        )
    try:
        with tqdm(total=planned_samples(config), desc="step times", unit="sample", disable=not config.progress) as bar:
            sweep = _Sweep(engine, config, bar)
            sweep.run()
    finally:
        if own:
            engine.close()
    extra = {"calibrated": "bare engine: a grid of compositions, each timed alone"}
    return MeasuredSteps(sweep.samples, sweep.kinds, sweep.other_cores, [config.repeats] * len(sweep.samples), extra)


def _fit(config: StepBenchConfig, measured: MeasuredSteps, wall: float) -> Calibration:
    from sagellm.benchmarks.vllm_results import cpu_description

    settings = {"max_num_seqs": config.max_num_seqs, "max_num_batched_tokens": config.max_num_batched_tokens}
    source = {
        "cpu": cpu_description(),
        "cores": os.cpu_count(),
        "threads": config.threads,
        "model": config.model,
        "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "samples": len(measured.samples),
    } | measured.extra
    samples, loads = measured.samples, measured.other_cores
    quiet = [s for s, load in zip(samples, loads) if load <= config.quiet_cores]
    if len(quiet) < MIN_QUIET_SAMPLES:  # a machine never quiet: fit what there is, and say so
        log.warning("step_times_machine_busy", quiet=len(quiet), samples=len(samples))
        quiet = samples
    fitted = StepModel.fit(quiet, measured.single_steps, **settings, source=source)
    errors = fitted.relative_errors(quiet)
    source |= {"fitted_samples": len(quiet), "quiet_cores": config.quiet_cores}
    source |= {"fit_error_p50": float(np.median(errors)), "fit_error_p90": float(np.percentile(errors, 90))}
    return Calibration(fitted, samples, measured.kinds, loads, wall, asdict(config), measured.steps)


def write_results(calibration: Calibration, model_path: Path, samples_path: Path) -> None:
    calibration.model.save(model_path)
    rows = [
        asdict(s) | {"kind": k, "other_cores": round(load, 3), "steps": n}
        for s, k, load, n in zip(calibration.samples, calibration.kinds, calibration.other_cores, calibration.steps)
    ]
    payload = {"settings": calibration.settings, "wall_s": calibration.wall_s, "samples": rows}
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    samples_path.write_text(json.dumps(payload, indent=2) + "\n")


def print_table(calibration: Calibration) -> None:
    from rich.console import Console
    from rich.table import Table

    m = calibration.model
    units = {"fixed_s": ("ms per step", 1e3), "per_prefill_token_s": ("µs per prompt token", 1e6)}
    units |= {"per_decode_seq_s": ("µs per decode sequence", 1e6), "per_context_token_s": ("ns per context token", 1e9)}
    units |= {"per_prefill_context_s": ("ns per prompt token × earlier prompt token", 1e9)}
    units |= {"per_prefill_step_s": ("ms per step that computes prompt tokens", 1e3)}
    coefficients = Table("coefficient", "value", "unit", title=f"step model: {Path(str(m.source['model'])).name}")
    for name in COEFFICIENTS:
        unit, scale = units[name]
        coefficients.add_row(name, f"{scale * getattr(m, name):.2f}", unit)
    for name, steps in (
        ("neighbour_prompt_slowdown", "a step with prompt chunks"),
        ("neighbour_decode_slowdown", "a decode step"),
    ):
        if getattr(m, name):
            coefficients.add_row(
                name, f"{100 * getattr(m, name):.1f}", f"% longer {steps} takes beside a busy neighbour"
            )
    errors = Table(
        "steps", "fitted", "busy", "fit error p50", "fit error p90", "measured ms min–max", title="fit error"
    )
    errors.title = f"fit error; calibrated {m.source.get('calibrated', 'bare engine')}"
    coefficients.caption = m.source.get("calibrated")
    for kind in (*KINDS, None):
        e = calibration.errors(kind)
        ours = [i for i, k in enumerate(calibration.kinds) if kind in (None, k)]
        busy = sum(calibration.busy(i) for i in ours)
        if e.size:
            seconds = [calibration.samples[i].seconds for i in ours]
            spread = f"{1e3 * min(seconds):.1f}–{1e3 * max(seconds):.1f}"
            p50, p90 = f"{np.median(e):.1%}", f"{np.percentile(e, 90):.1%}"
            errors.add_row(kind or "all", str(e.size), str(busy), p50, p90, spread)
    threads = m.source["threads"] or "all"
    caption = f"{m.source['cpu']}; {m.source['cores']} cores, {threads} torch threads; max_num_seqs {m.max_num_seqs}, "
    caption += f"max_num_batched_tokens {m.max_num_batched_tokens}; {calibration.wall_s:.0f} s; busy: timed while "
    caption += f"other processes kept > {calibration.settings['quiet_cores']:g} cores busy despite retries, not fitted"
    if "steps_timed" in m.source:
        caption += f"; {m.source['steps_timed']} steps pooled into {len(calibration.samples)} samples, "
        caption += f"{m.source['steps_busy']} dropped (busy)"
    errors.caption = caption
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(coefficients)
    console.print(errors)


# -- command line (`sagellm bench steps`, wired by the CLI) --------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = StepBenchConfig(model="")
    parser.add_argument(
        "--model", "-m", default=None, help="path, .gguf or cache alias (default: smollm2-135m-instruct)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="engine setting (%(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens, help="per step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="--bare: timed steps per composition")
    parser.add_argument(
        "--bare", action="store_true", help="time the bare engine on a grid of compositions, not the serving pipeline"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the random prompts")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/step_model.json"), help="the model")
    parser.add_argument(
        "--samples-out", type=Path, default=Path("benchmarks/results/step_samples.json"), help="the measured steps"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning or error (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> StepBenchConfig:
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

    return StepBenchConfig(
        model=str(resolve_model(args.model or DEFAULT_MODEL)),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        threads=args.threads or os.cpu_count() or 1,
        bare=args.bare,
        mixed_batch_sizes=tuple(sorted({1, args.max_num_seqs // 4, args.max_num_seqs // 2, args.max_num_seqs - 1})),
        repeats=args.repeats,
        seed=args.seed,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    calibration = calibrate(config_from_args(args))
    print_table(calibration)
    write_results(calibration, args.out, args.samples_out)
    print(f"results: {args.out}, {args.samples_out}", file=sys.stderr)
    return 0
