"""`sagellm bench steps`: how long one step of our engine takes for what it computes, fitted into the `StepModel` the
cluster simulator (`sagellm simulate`) times its instances with.

The engine (`LLMEngine`, loaded as an engine node loads it) is driven directly with batches built to a known
composition, and each `engine.step()` is timed whole (schedule, model, sampling, detokenizing) on the wall clock:
- prefill: one fresh prompt per step, of each chunk size up to `max_num_batched_tokens`, nothing else running;
- decode: for each context length, requests join one at a time until `max_num_seqs` run; at every batch size the
  steps that only decode are timed;
- mixed: at some of those batch sizes, a fresh prompt chunk beside the running decodes.
What a step computed is read from the scheduler's own batch (`StepTimer` wraps `Scheduler.schedule`), never
assumed. Each composition is timed `repeats` times after `warmup` untimed steps; a sample is the median. The fit
(`StepModel.fit`) is written with the samples, the machine and the engine settings, so the simulator schedules its
instances as this engine did."""

from __future__ import annotations

import argparse
import datetime
import json
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

from sagellm.runtime.engine.llm_engine import LLMEngine
from sagellm.runtime.engine.sampling_params import SamplingParams
from sagellm.runtime.engine.scheduler import ScheduledBatch
from sagellm.simulator.step_model import COEFFICIENTS, StepModel, StepSample

KINDS = ("prefill", "decode", "mixed")
MIN_QUIET_SAMPLES = 8  # fewer samples timed while the machine was quiet: fit them all
log = structlog.get_logger("sagellm.bench.steps")
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # of /proc/stat's cpu line: user, nice, system, irq, softirq, steal (not idle, iowait)


class OtherLoad:
    """The cores the rest of the machine kept busy (other processes, the kernel, the hypervisor's steal) since it was
    made: on a shared 2-core machine another process's burst slows a step several-fold (torch's threads wait on the
    one that lost its core), so a measurement taken meanwhile is retried rather than believed. Reads /proc (Linux;
    elsewhere it reads 0). Ticks are 10 ms: judge windows of a few hundred ms."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        from sagellm.benchmarks.proc_stats import cpu_seconds

        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return 0.0, 0.0, time.perf_counter()
        busy = sum(int(fields[i]) for i in BUSY_FIELDS if i < len(fields)) / os.sysconf("SC_CLK_TCK")
        return busy, cpu_seconds(os.getpid()), time.perf_counter()

    def cores(self) -> float:
        """Busy cores of everything but this process, on average since it was made."""
        busy, own, now = self._read()
        busy0, own0, then = self._start
        return max(0.0, (busy - busy0) - (own - own0)) / (now - then) if now > then else 0.0


@dataclass(frozen=True)
class StepBenchConfig:
    model: str  # a path; the command resolves aliases
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    threads: int | None = None  # torch threads (None: every core, as an engine node without num_threads)
    context_lens: tuple[int, ...] = (64, 512, 1024)  # prompt lengths of the decoding requests
    chunk_sizes: tuple[int, ...] = (16, 32, 64, 128, 256, 384, 512)  # prefill chunks, capped by the token budget
    mixed_batch_sizes: tuple[int, ...] = (1, 4, 8, 15)  # running decodes beside which prefill chunks are timed
    mixed_chunk_sizes: tuple[int, ...] = (32, 128, 512)  # capped by what the decodes leave of the budget
    repeats: int = 5  # timed steps per composition: a sample is their median
    warmup: int = 1  # untimed steps before each decode timing (the first after a change re-reads the batch)
    window_s: float = 0.15  # a composition is timed for at least `repeats` steps and this long (the load's ticks)
    quiet_cores: float = 0.3  # a timing while the rest of the machine kept more cores busy is retried ...
    retries: int = 3  # ... this many times; the quietest is kept (and flagged when still not quiet)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.repeats) < 1 or self.warmup < 0:
            raise ValueError("max_num_seqs, max_num_batched_tokens and repeats must be >= 1, warmup >= 0")
        if not self.context_lens or min(self.context_lens) < 1 or not self.chunk_sizes or min(self.chunk_sizes) < 2:
            raise ValueError("context_lens must be >= 1 and chunk_sizes >= 2 tokens (a 1-token chunk is a decode)")


@dataclass
class Calibration:
    """What `calibrate` measured and fitted."""

    model: StepModel
    samples: list[StepSample]
    kinds: list[str]  # of each sample: prefill, decode or mixed
    other_cores: list[float]  # of each sample: the rest of the machine's busy cores while it was timed
    wall_s: float
    settings: dict[str, Any] = field(default_factory=dict)

    def busy(self, index: int) -> bool:
        """Sample `index` was timed while the rest of the machine was busy (left out of the fit)."""
        return self.other_cores[index] > self.settings["quiet_cores"]

    def errors(self, kind: str | None = None) -> np.ndarray:
        """The fit's relative error on the samples (of `kind`) it was fitted on."""
        chosen = [s for i, (s, k) in enumerate(zip(self.samples, self.kinds)) if kind in (None, k) and not self.busy(i)]
        return self.model.relative_errors(chosen) if chosen else np.array([])


class StepTimer:
    """Times `engine.step()` and reads what the step computed from the batch the scheduler returned: prompt tokens
    of the chunks, decode sequences, and the KV the decodes attend over (as the model runner counts them)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._schedule = engine.scheduler.schedule
        engine.scheduler.schedule = self._recording_schedule  # the one door every step goes through
        self._last: tuple[int, int, int] = (0, 0, 0)

    def _recording_schedule(self) -> ScheduledBatch:
        batch = self._schedule()
        decodes = batch.num_decodes  # single-token entries come first
        context = sum(seq.num_computed_tokens + 1 for seq in batch.seqs[:decodes])
        self._last = (sum(batch.num_new_tokens[decodes:]), decodes, context)
        return batch

    def step(self) -> StepSample:
        started = time.perf_counter()
        self.engine.step()
        seconds = time.perf_counter() - started
        return StepSample(*self._last, seconds)


def median_sample(samples: list[StepSample]) -> StepSample:
    """Each field's median: one composition timed several times (a decode's context grows a token per step)."""
    return StepSample(
        int(np.median([s.prefill_tokens for s in samples])),
        int(np.median([s.decode_seqs for s in samples])),
        int(np.median([s.context_tokens for s in samples])),
        float(np.median([s.seconds for s in samples])),
    )


class _Sweep:
    """One calibration run over an engine: fresh random prompts (no prefix-cache hits), samples as they come."""

    def __init__(self, engine: LLMEngine, config: StepBenchConfig, bar: tqdm) -> None:
        from sagellm.benchmarks.workloads import random_token_prompts

        self.engine, self.config, self.bar = engine, config, bar
        self.timer = StepTimer(engine)
        self.samples: list[StepSample] = []
        self.kinds: list[str] = []
        self.other_cores: list[float] = []
        self._count = 0
        self._prompt = lambda length: random_token_prompts(engine.tokenizer, 1, length, (config.seed, self._count))[0]

    def add(self, length: int, max_tokens: int | None) -> str:
        self._count += 1
        rid = f"step-{self._count}"
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.engine.add_request(rid, self._prompt(length), params)
        return rid

    def record(self, kind: str, measured: tuple[StepSample, float]) -> None:
        self.samples.append(measured[0])
        self.kinds.append(kind)
        self.other_cores.append(measured[1])
        self.bar.update(1)

    def timed(self, step: Callable[[], StepSample]) -> tuple[StepSample, float]:
        """The median of `step()` over at least `repeats` steps and `window_s`, with the rest of the machine's load
        meanwhile; retried while that load was not quiet, the quietest try kept."""
        c = self.config
        tries = []
        for _ in range(1 + c.retries):
            load, started, steps = OtherLoad(), time.perf_counter(), []
            while len(steps) < c.repeats or time.perf_counter() - started < c.window_s:
                steps.append(step())
            tries.append((median_sample(steps), load.cores()))
            if tries[-1][1] <= c.quiet_cores:
                break
        return min(tries, key=lambda t: t[1])

    def chunk(self, length: int) -> tuple[StepSample, float]:
        """A fresh prompt of `length` tokens beside whatever runs, once per step: it ends after that step."""

        def step() -> StepSample:
            self.add(length, max_tokens=1)
            return self.timer.step()

        return self.timed(step)

    def decodes(self) -> tuple[StepSample, float]:
        for _ in range(self.config.warmup):
            self.timer.step()
        return self.timed(self.timer.step)

    def decode_sweep(self, context_len: int) -> None:
        """Requests of `context_len` prompt tokens join one by one; at each batch size its decode steps (and at the
        mixed sizes, chunks beside them) are timed. All are aborted at the end."""
        c, engine = self.config, self.engine
        room = engine.max_model_len - context_len
        ids = []
        for size in range(1, c.max_num_seqs + 1):
            ids.append(self.add(context_len, max_tokens=room))
            while self.timer.step().prefill_tokens:  # its prompt, chunk by chunk beside the others' decodes
                pass
            if size in c.mixed_batch_sizes and size < c.max_num_seqs:  # a full batch admits no prompt
                for length in sorted({min(n, c.max_num_batched_tokens - size) for n in c.mixed_chunk_sizes}):
                    if length >= 2:
                        self.record("mixed", self.chunk(length))
            self.record("decode", self.decodes())
        for rid in ids:
            engine.abort_request(rid)

    def run(self) -> None:
        c = self.config
        self.add(c.max_num_batched_tokens, max_tokens=8)  # warm-up: first calls of each kernel, page faults
        while self.engine.has_unfinished_requests():
            self.timer.step()
        for length in sorted({min(n, c.max_num_batched_tokens) for n in c.chunk_sizes}):
            self.record("prefill", self.chunk(length))
        for context_len in c.context_lens:
            self.decode_sweep(context_len)


def planned_samples(config: StepBenchConfig) -> int:
    """How many samples `calibrate` takes: the progress bar's total."""
    chunks = len({min(n, config.max_num_batched_tokens) for n in config.chunk_sizes})
    mixed = sum(
        len({m for n in config.mixed_chunk_sizes if (m := min(n, config.max_num_batched_tokens - size)) >= 2})
        for size in config.mixed_batch_sizes
        if size < config.max_num_seqs
    )
    return chunks + len(config.context_lens) * (config.max_num_seqs + mixed)


def calibrate(config: StepBenchConfig, engine: LLMEngine | None = None) -> Calibration:
    """Loads the engine (unless given one built with `config`'s settings), measures every composition and fits."""
    from sagellm.benchmarks.vllm_results import cpu_description
    from sagellm.runtime.engine.config import EngineConfig
    from sagellm.runtime.parallel.engine import start_engine

    settings = {"max_num_seqs": config.max_num_seqs, "max_num_batched_tokens": config.max_num_batched_tokens}
    own = engine is None
    if engine is None:
        engine = start_engine(
            EngineConfig(model=config.model, num_threads=config.threads, seed=config.seed, **settings)
        )
    started = time.perf_counter()
    try:
        with tqdm(total=planned_samples(config), desc="step times", unit="sample", disable=not config.progress) as bar:
            sweep = _Sweep(engine, config, bar)
            sweep.run()
    finally:
        if own:
            engine.close()
    wall = time.perf_counter() - started
    source = {
        "cpu": cpu_description(),
        "cores": os.cpu_count(),
        "threads": config.threads,
        "model": config.model,
        "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "samples": len(sweep.samples),
    }
    quiet = [s for s, load in zip(sweep.samples, sweep.other_cores) if load <= config.quiet_cores]
    if len(quiet) < MIN_QUIET_SAMPLES:  # a machine never quiet: fit what there is, and say so
        log.warning("step_times_machine_busy", quiet=len(quiet), samples=len(sweep.samples))
        quiet = sweep.samples
    fitted = StepModel.fit(quiet, **settings, source=source)
    errors = fitted.relative_errors(quiet)
    source |= {"fitted_samples": len(quiet), "quiet_cores": config.quiet_cores}
    source |= {"fit_error_p50": float(np.median(errors)), "fit_error_p90": float(np.percentile(errors, 90))}
    return Calibration(fitted, sweep.samples, sweep.kinds, sweep.other_cores, wall, asdict(config))


def write_results(calibration: Calibration, model_path: Path, samples_path: Path) -> None:
    calibration.model.save(model_path)
    rows = [
        asdict(s) | {"kind": k, "other_cores": round(load, 3)}
        for s, k, load in zip(calibration.samples, calibration.kinds, calibration.other_cores)
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
    coefficients = Table("coefficient", "value", "unit", title=f"step model: {Path(str(m.source['model'])).name}")
    for name in COEFFICIENTS:
        unit, scale = units[name]
        coefficients.add_row(name, f"{scale * getattr(m, name):.2f}", unit)
    errors = Table(
        "steps", "fitted", "busy", "fit error p50", "fit error p90", "measured ms min–max", title="fit error"
    )
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
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (%(default)s)")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="timed steps per composition; medians")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the random prompts")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/step_model.json"), help="the model")
    parser.add_argument(
        "--samples-out", type=Path, default=Path("benchmarks/results/step_samples.json"), help="the measured steps"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", default="warning")


def config_from_args(args: argparse.Namespace) -> StepBenchConfig:
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

    return StepBenchConfig(
        model=str(resolve_model(args.model or DEFAULT_MODEL)),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        threads=args.threads,
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
