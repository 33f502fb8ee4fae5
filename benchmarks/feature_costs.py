"""`sagellm bench feature-costs`: what each engine feature costs a W1-c16 decode step of requests that do not use it.

The goal (an open issue): guided masks, penalties, LoRA, speculation, state slots and the rest cost nothing
measurable to a request that does not use them. Three measurements of decode-only steps of W1-c16 (16 requests of
random 256-token prompts, greedy, EOS ignored, every prefill done before any step is timed):
1. wall time per step of the plain engine (median, p90);
2. the same engine under cProfile, each function's own time charged to a bucket by the file it is defined in
   (feature_costs_buckets.py): what a feature's code takes per step, and per request per step;
3. wall time per step of engines with one feature armed but used by no request (feature_costs_arms.py), against the
   baseline's. Their steps are timed in blocks, the engines in turn, so a burst of load elsewhere on the machine hits
   every engine alike rather than one.
The profiler adds to every Python call, so its shares are of the profiled step, not the wall step; and a feature's
wall difference counts only where its 95% bootstrap interval leaves out zero (the machine is shared: steps vary)."""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import pstats
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sagellm.benchmarks.feature_costs_arms import UNARMED, Arm, Unarmed, chosen_arms, state_slots_note
from sagellm.benchmarks.feature_costs_buckets import Bucket, attribute
from sagellm.common.errors import InvalidInput, users_file

BASELINE = "baseline"
RESAMPLES = 2000  # bootstrap resamples of each median difference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", "-m", default=None, help="path, .gguf file or cache alias (default: smollm2-135m-instruct)"
    )
    parser.add_argument("--batch", type=int, default=16, help="concurrent requests (W1-c16: %(default)s)")
    parser.add_argument("--input-len", type=int, default=256, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens, EOS ignored (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=48, help="decode steps timed, and as many profiled (default: 48)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed decode steps first (default: %(default)s)")
    parser.add_argument("--block", type=int, default=8, help="steps an engine runs per turn (default: %(default)s)")
    parser.add_argument("--arms", default="lora,kv-tiers,kv-events,step-trace",
                        help="engines with a feature armed, comma list, or none (default: %(default)s)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: the engine's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/feature_costs.json"), help="JSON file")


@dataclass
class Timed:
    """One engine's wall step times (seconds) and its arm (None: the baseline)."""

    name: str
    setting: str
    engine: Any
    arm: Arm | None = None
    seconds: list[float] = field(default_factory=list)

    def median_ms(self) -> float:
        return 1e3 * float(np.median(self.seconds))

    def p90_ms(self) -> float:
        return 1e3 * float(np.percentile(self.seconds, 90))

    def delta_interval_ms(self, baseline: Timed, seed: int) -> tuple[float, float]:
        """The 95% bootstrap interval of this engine's median step minus the baseline's, ms."""
        rng = np.random.default_rng(seed)
        mine, theirs = np.asarray(self.seconds), np.asarray(baseline.seconds)

        def medians(values: np.ndarray) -> np.ndarray:  # [RESAMPLES] medians of resamples of `values`
            return np.median(rng.choice(values, (RESAMPLES, values.size)), axis=1)

        low, high = np.percentile(medians(mine) - medians(theirs), [2.5, 97.5])
        return 1e3 * float(low), 1e3 * float(high)


def run(args: argparse.Namespace) -> int:
    from sagellm.benchmarks.vllm_results import cpu_description
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

    _check(args)
    arms = chosen_arms(args.arms)
    model = str(resolve_model(args.model or DEFAULT_MODEL))
    engines: list[Timed] = []
    with tempfile.TemporaryDirectory(prefix="feature-costs-") as work:
        try:
            for arm in (None, *arms):
                engines.append(_start(model, args, arm, Path(work)))
            for timed in engines:
                _fill(timed.engine, args)
            other_cores = _time_in_turns(engines, args)
            profiled_s, stats, profile_other_cores = _profile(engines[0].engine, args)
            notes = [*UNARMED, state_slots_note(engines[0].engine)]
        finally:
            for timed in engines:
                timed.engine.close()
    loads = {"other_cores_busy": round(other_cores, 3), "other_cores_busy_profiled": round(profile_other_cores, 3)}
    results = _results(args, model, engines, attribute(stats), profiled_s, notes, loads, cpu_description())
    print_tables(results)
    with users_file(args.out, "write the results"):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    print(f"results: {args.out}", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace) -> None:
    """Every timed and profiled step must decode all `batch` requests: none may reach its last token first."""
    needed = args.warmup + 2 * args.steps
    if min(args.batch, args.steps, args.block, args.input_len) < 1 or args.warmup < 0:
        raise InvalidInput("--batch, --steps, --block and --input-len must be >= 1, --warmup >= 0")
    if needed > args.output_len - 1:
        raise InvalidInput(f"--warmup + 2 x --steps = {needed} decode steps; --output-len {args.output_len} leaves "
                           f"{args.output_len - 1} after the prefill's token")  # fmt: skip


def _start(model: str, args: argparse.Namespace, arm: Arm | None, work: Path) -> Timed:
    from sagellm import LLM

    settings: dict[str, Any] = {"max_num_seqs": args.batch, "max_model_len": args.input_len + args.output_len + 16}
    if args.threads:
        settings["num_threads"] = args.threads
    engine = LLM(model, **settings, **(arm.engine_args if arm else {})).engine
    if arm is not None and arm.prepare is not None:
        arm.prepare(engine, work)
    return Timed(arm.name if arm else BASELINE, arm.setting if arm else "nothing armed", engine, arm)


def _fill(engine: Any, args: argparse.Namespace) -> None:
    """The batch's requests added and stepped until every prompt is computed, then `warmup` decode steps."""
    from sagellm.benchmarks.workloads import random_token_prompts
    from sagellm.runtime.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(random_token_prompts(engine.tokenizer, args.batch, args.input_len, args.seed)):
        engine.add_request(f"w1-{i}", prompt, params)
    scheduler = engine.scheduler
    while scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in scheduler.running):
        engine.step()
    for _ in range(args.warmup):
        _decode_step(engine, args.batch)


def _decode_step(engine: Any, batch: int) -> float:
    """One engine step's wall seconds; it must have decoded every request and computed no prompt token."""
    started = time.perf_counter()
    engine.step()
    seconds = time.perf_counter() - started
    if engine.last_step_prompt_tokens or len(engine.scheduler.running) != batch:
        raise RuntimeError(f"a step was not decode-only: {engine.last_step_prompt_tokens} prompt tokens, "
                           f"{len(engine.scheduler.running)} of {batch} requests running")  # fmt: skip
    return seconds


def _time_in_turns(engines: list[Timed], args: argparse.Namespace) -> float:
    """`steps` decode steps of each engine, `block` at a time, the engines in turn; returns the cores the rest of
    the machine kept busy meanwhile (on average)."""
    from sagellm.benchmarks.step_timer import OtherLoad

    load = OtherLoad()
    while len(engines[0].seconds) < args.steps:
        for timed in engines:
            count = min(args.block, args.steps - len(timed.seconds))
            timed.seconds += [_decode_step(timed.engine, args.batch) for _ in range(count)]
    return load.cores()


def _profile(engine: Any, args: argparse.Namespace) -> tuple[float, pstats.Stats, float]:
    """`steps` more decode steps under cProfile: their wall seconds, the profile, and the cores the rest of the
    machine kept busy meanwhile."""
    from sagellm.benchmarks.step_timer import OtherLoad

    profiler, load = cProfile.Profile(), OtherLoad()
    started = time.perf_counter()
    profiler.enable()
    for _ in range(args.steps):
        _decode_step(engine, args.batch)
    profiler.disable()
    return time.perf_counter() - started, pstats.Stats(profiler), load.cores()


def _results(
    args: argparse.Namespace,
    model: str,
    engines: list[Timed],
    buckets: list[Bucket],
    profiled_s: float,
    notes: list[Unarmed],
    loads: dict[str, float],
    cpu: str,
) -> dict[str, Any]:
    import torch

    baseline = engines[0]
    total = sum(b.seconds for b in buckets)
    per_step = 1e6 / args.steps
    rows = [
        {"bucket": b.name, "kind": b.kind, "us_per_step": b.seconds * per_step,
         "share": b.seconds / total if total else 0.0, "us_per_request_per_step": b.seconds * per_step / args.batch,
         "top_functions": [{"function": f, "us_per_step": s * per_step} for f, s in b.top if s > 0]}
        for b in buckets
    ]  # fmt: skip
    arms = [
        {"arm": t.name, "feature": t.arm.feature if t.arm else None, "setting": t.setting, "median_ms": t.median_ms(),
         "p90_ms": t.p90_ms(), "delta_ms": t.median_ms() - baseline.median_ms(),
         "delta_pct": 100 * (t.median_ms() / baseline.median_ms() - 1),
         "delta_ci95_ms": None if t is baseline else list(t.delta_interval_ms(baseline, args.seed)),
         "steps": len(t.seconds)}
        for t in engines
    ]  # fmt: skip
    return {
        "command": _command(args),
        "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            **loads,
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "run"}
        | {"model": model},
        "baseline": {"median_ms": baseline.median_ms(), "p90_ms": baseline.p90_ms(), "steps": len(baseline.seconds)},
        "profile": {
            "steps": args.steps,
            "wall_ms_per_step": 1e3 * profiled_s / args.steps,
            "total_us_per_step": total * per_step,
            "buckets": rows,
        },
        "arms": arms,
        "not_timed": [asdict(n) for n in notes],
    }


def _command(args: argparse.Namespace) -> str:
    parts = ["sagellm", "bench", "feature-costs"]
    for flag in ("model", "batch", "input_len", "output_len", "steps", "warmup", "block", "arms", "threads", "seed"):
        value = getattr(args, flag)
        if value is not None:
            parts += ["--" + flag.replace("_", "-"), str(value)]
    return " ".join(parts)


def print_tables(results: dict[str, Any]) -> None:
    """The profile's buckets and the armed engines' step times, as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    p, b, m = results["profile"], results["baseline"], results["machine"]
    batch = results["settings"]["batch"]
    title = (f"{Path(results['settings']['model']).name}: W1-c{batch} decode step, {b['median_ms']:.2f} ms median "
             f"(p90 {b['p90_ms']:.2f}); under cProfile {p['wall_ms_per_step']:.2f} ms, {p['steps']} steps")  # fmt: skip
    table = Table("bucket", "kind", "µs/step (profiled)", "share", "µs/request/step", "most of it", title=title)
    for row in p["buckets"]:
        top = row["top_functions"][0] if row["top_functions"] else None
        most = f"{top['function']} {top['us_per_step']:.1f} µs" if top else ""
        table.add_row(row["bucket"], row["kind"], f"{row['us_per_step']:.1f}", f"{100 * row['share']:.2f}%",
                      f"{row['us_per_request_per_step']:.2f}", most)  # fmt: skip
    table.add_row("total", "", f"{p['total_us_per_step']:.1f}", "100%", f"{p['total_us_per_step'] / batch:.2f}")
    table.caption = (f"{m['cpu']}; {m['cores']} cores, {m['torch_threads']} torch threads; other processes kept "
                     f"{m['other_cores_busy_profiled']:.2f} cores busy while it was profiled")  # fmt: skip
    console.print(table)
    arms = Table("engine", "armed, used by no request", "median ms", "p90 ms", "Δ median", "95% interval", "steps",
                 title="wall decode step: features armed but unused, against the baseline")  # fmt: skip
    for row in results["arms"]:
        base = row["arm"] == BASELINE
        delta = "" if base else f"{row['delta_ms']:+.2f} ms ({row['delta_pct']:+.1f}%)"
        low, high = row["delta_ci95_ms"] or (0.0, 0.0)
        interval = "" if base else f"{low:+.2f} … {high:+.2f} ms" + (" (noise)" if low <= 0 <= high else "")
        arms.add_row(row["arm"], row["setting"], f"{row['median_ms']:.2f}", f"{row['p90_ms']:.2f}", delta, interval,
                     str(row["steps"]))  # fmt: skip
    arms.caption = f"other processes kept {m['other_cores_busy']:.2f} cores busy on average while these were timed"
    console.print(arms)
    for note in results["not_timed"]:
        console.print(f"[bold]{note['feature']}[/bold]: {note['why']}")
    console.print(f"command: {results['command']}")
