"""`sagellm bench sim-check`: the cluster simulator against the real engine, at small scale, in one run.

Step times on a shared machine drift from run to run (and over minutes within one), so everything happens in one
process, one after another, the colocated engine's calibration and runs first, then the PD ones':
1. calibrate: `sagellm bench steps`' measurement of this engine's step times, fitted into a `StepModel`; by default
   in the serving pipeline on its own calibration trace (a closed loop of other lengths, another seed: nothing is
   fitted on the traces it is judged by), with `--bare` on the bare engine's grid of compositions. For the PD
   configuration also each worker's (the calibration trace served by the pd graph, each worker's steps timed in its
   own process: a core and a torch thread each, beside the other worker, behind its bridge to the main process; a
   model for each, the prefill worker's from its long prompts' chunks) and the KV hand-over (`kv_handover`: the
   real PD graph, one request at a time, its own prompts);
2. serve each workload's trace on the real engine through the W4 benchmark's graphs (`pd_split.run_config`): the
   colocated one in-process (replay_source → admission → policy_sort(fifo) → route → engine → metrics_sink) and, for
   W4, also the pd one (prefill and decode workers in two processes, a core each, pd_split keeping prompts under 512
   tokens colocated on decode), so TTFT and TPOT are measured exactly as `sagellm bench pd` measures them (from the
   request's intended arrival);
3. simulate the same trace (the real arrivals and lengths, `traces.from_rows`) on the same cluster: one instance with
   the engine's settings and the calibrated model, or a prefill and a decode worker, each with its own model, the
   real pd_split deciding and the hand-over model between them; compare TTFT and TPOT (p50, p99, mean) request set
   against request set. Twice: with the models rescaled to the speed the run's own steps went at (their decode and
   their prompt work's time over the model's, `fit_speed`, from the steps the engines timed as the calibration
   times them), which the verdict is on, and as calibrated. This machine's speed moves by 10-20% within a minute
   (other tenants of its host: a short probe served just before a run is as far from the run's speed as the
   calibration is), and a W6 trace's queue doubles any error in it, so only the first tells the simulator's error
   (batching, chunking, scheduling, queueing, the PD split and hand-over, the model's relative costs of unlike
   steps) from the machine's drift; the second is what a user of a calibration taken minutes before gets here;
4. `repeats` times, each repeat a fresh seed of each trace: the table shows each metric's median over repeats, measured
   and simulated, and the median over repeats of its relative error on the same trace (each repeat's simulation
   against its own measurement: the medians of measured and simulated may come from different traces).
Workloads: W4-sized (Poisson at 0.7× the colocated capacity, 80% 64-token and 20% 1,024-token prompts, 64 output
tokens, max_num_seqs 16; colocated and PD) and W6-sized (Poisson at 2× capacity, as W6: a queue that grows, 64-token
prompts, 16 output tokens, max_num_seqs 4, the real W6's engine). Capacity is the step model's
(`simulator.capacity.capacity_rps`), so the rates are fixed before anything is served. A real run during which other
processes kept more than `quiet_cores` busy (/proc/stat, `step_timer.OtherLoad`, the run's own workers not counted)
is run again, twice at most, and the quietest kept; its load is in the table. A metric passes when the simulator is
within `tolerance` (15%) of the measurement. The verdict is on p50 and mean: a p99 of ~40 requests is one or two
requests, which moves by more than 15% between repeats of the real engine
alone, so p99s are shown and judged only when they pass anyway ("noisy" otherwise).

The parts: what is checked and compared (`sim_check_cases`), the calibrations and the real and simulated runs
(`sim_check_run`), the table, JSON and plot (`sim_check_report`); this module is the command line."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from sagellm.benchmarks.report import write_json_and_plot
from sagellm.benchmarks.sim_check_cases import WORKLOADS, SimCheckConfig
from sagellm.benchmarks.sim_check_report import plot, print_check, print_handover, report_json
from sagellm.benchmarks.sim_check_run import run_check
from sagellm.benchmarks.step_times import print_table


# -- command line (`sagellm bench sim-check`, wired by the CLI) -------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SimCheckConfig(model="")
    parser.add_argument(
        "--model", "-m", default=None, help="path, .gguf or cache alias (default: smollm2-135m-instruct)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens, help="per step")
    parser.add_argument("--w4-requests", type=int, default=WORKLOADS[0].requests, help="W4-sized trace's requests")
    parser.add_argument("--w6-requests", type=int, default=WORKLOADS[1].requests, help="W6-sized trace's requests")
    parser.add_argument("--tolerance", type=float, default=d.tolerance, help="pass within (%(default)s)")
    parser.add_argument("--repeats", type=int, default=d.repeats, help="fresh seeds of each trace (%(default)s)")
    parser.add_argument("--bare", action="store_true", help="calibrate on the bare engine, not in the pipeline")
    parser.add_argument("--calibration-repeats", type=int, default=d.calibration_repeats, help="--bare: steps each")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of prompts, arrivals and calibration prompts")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sim_check"), help="writes OUT.json/.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--log-level", default="warning", help="debug, info, warning or error (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

    w4, w6 = WORKLOADS
    config = SimCheckConfig(
        model=str(resolve_model(args.model or DEFAULT_MODEL)),
        threads=args.threads or os.cpu_count() or 1,
        max_num_batched_tokens=args.max_num_batched_tokens,
        workloads=(
            dataclasses.replace(w4, requests=args.w4_requests),
            dataclasses.replace(w6, requests=args.w6_requests),
        ),
        tolerance=args.tolerance,
        calibration_repeats=args.calibration_repeats,
        bare=args.bare,
        repeats=args.repeats,
        seed=args.seed,
        progress=not args.no_progress,
    )
    started = time.perf_counter()
    models, checks = run_check(config)
    wall = time.perf_counter() - started
    for calibration in (models.colocated, *models.workers.values()):
        if calibration is not None:
            print_table(calibration)
    if models.handover is not None:
        print_handover(models.handover)
    print_check(checks, config.tolerance)
    report = report_json(config, models, checks, wall)
    print(f"sim-check: {wall:.0f} s, calibration {report['calibration_wall_s']:.0f} s", file=sys.stderr)
    for path in write_json_and_plot(args.out, report, lambda png: plot(checks, png)):
        print(f"results: {path}", file=sys.stderr)
    return 0
