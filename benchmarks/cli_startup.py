"""`sagellm bench cli`: how long `sagellm --help` and every command's `--help` take, each in a fresh process, beside
the bare Python interpreter's own start-up measured in the same run.

A command must answer `--help` without importing torch or loading anything (the budget: 0.3 s on these machines); the
interpreter's row is the floor no command can go below. Medians of `--repeats` runs, the runs of all commands
interleaved so that a busy moment of the machine spreads over them all."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sagellm.benchmarks.errors import BenchmarkError
from sagellm.benchmarks.vllm_results import cpu_description
from sagellm.common.errors import InvalidInput

BUDGET_S = 0.3
COMMAND_LINE = re.compile(r"^    (\w[\w-]*)(?: |$)", re.M)  # a command in `sagellm --help`'s list


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (default: 5)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cli.json"), help="JSON results")


def commands() -> list[tuple[str, list[str]]]:
    """(label, argv) of every `--help` a user can ask for (the commands `sagellm --help` lists), and the
    interpreter's start-up for reference."""
    cli = [sys.executable, "-m", "sagellm.cli.main"]
    listing = subprocess.run([*cli, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    names = COMMAND_LINE.findall(listing.split("positional arguments:", 1)[1].split("options:", 1)[0])
    return [
        ("python -c pass (the floor)", [sys.executable, "-c", "pass"]),
        ("sagellm --help", [*cli, "--help"]),
        *((f"sagellm {name} --help", [*cli, name, "--help"]) for name in names),
    ]


def time_once(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=60)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchmarkError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return elapsed


def measure(runs: list[tuple[str, list[str]]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {label: [] for label, _ in runs}
    for _ in range(repeats):
        for label, argv in runs:
            times[label].append(time_once(argv))
    return times


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.repeats < 1:
        raise InvalidInput("--repeats must be >= 1")
    times = measure(commands(), args.repeats)
    cpu = cpu_description()
    table = Table("command", "median s", "min s", "max s", title="CLI start-up", caption=f"CPU: {cpu}")
    for label, samples in times.items():
        median = statistics.median(samples)
        mark = "" if label.startswith("python") or median <= BUDGET_S else f" (over {BUDGET_S} s)"
        table.add_row(label, f"{median:.3f}{mark}", f"{min(samples):.3f}", f"{max(samples):.3f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "repeats": args.repeats, "seconds": times}, indent=1) + "\n")
    print(f"results: {args.out}", file=sys.stderr)
    over = [label for label, s in times.items() if not label.startswith("python") and statistics.median(s) > BUDGET_S]
    return 1 if over else 0
