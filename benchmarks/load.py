"""`sagellm bench load`: how long a cached model takes to load cold, stage by stage, each in a fresh process.

Every process of a pipeline pays the load (the main one reads the metadata and tokenizer, each engine worker the whole
model), so cold start is these stages, not one. Per repeat, in turn and each in a new interpreter: the imports the
loader needs, `load_model(path, load_weights=False)` (metadata + tokenizer), `load_model(path)` (weights too),
`LLMEngine(EngineConfig(model=path))`, and a whole `sagellm run GRAPH --prompt Hi --max-tokens 4 --temperature 0`
(its own "ready in X s" line, and spawn to exit). In-process stages are timed inside the child, after interpreter
start. Prints a markdown table (median, min, max over repeats) with the CPU, and writes JSON."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sagellm.benchmarks.errors import BenchmarkError
from sagellm.common.processes import python_module

MODULE = "sagellm.benchmarks.load"  # this file, run as the child that times one in-process stage
IN_PROCESS = ("metadata", "weights", "engine")  # the child's stages, by the call they time
READY = re.compile(r"ready in ([0-9.]+) s")
LABELS = {
    "import": "imports: torch, loader, engine (a child's)",
    "metadata": "load_model(load_weights=False)",
    "weights": "load_model()",
    "engine": "LLMEngine(EngineConfig(model))",
    "run_ready": "sagellm run: its 'ready in' line",
    "run_exit": "sagellm run: spawn to exit",
}


@dataclass(frozen=True)
class Row:
    stage: str
    median_s: float
    min_s: float
    max_s: float
    runs_s: list[float]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="path, .gguf or cache alias (default: SmolLM2-135M)")
    parser.add_argument("--graph", default="graphs/pd.yaml", help="graph `sagellm run` starts (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per stage; medians (default: 3)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/load.json"), help="JSON results")


def run(args: argparse.Namespace) -> int:
    from sagellm.benchmarks.vllm_results import cpu_description
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    model = Path(resolve_model(args.model or DEFAULT_MODEL))
    runs: dict[str, list[float]] = {stage: [] for stage in LABELS}
    for repeat in range(args.repeats):  # stages in turn, so a slow spell of the machine hits all alike
        for stage in IN_PROCESS:
            timing = _child(stage, model)
            if stage == "metadata":
                runs["import"].append(timing["import_s"])
            runs[stage].append(timing["call_s"])
        ready, wall = _sagellm_run(args.graph, args.model)
        runs["run_ready"].append(ready)
        runs["run_exit"].append(wall)
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    rows = summarize(runs)
    cpu = cpu_description()
    print(markdown(rows))
    print(f"\nCPU: {cpu}; model {model}; median of {args.repeats} fresh process(es) per stage")
    payload = {"cpu": cpu, "model": str(model), "graph": args.graph, "repeats": args.repeats}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload | {"stages": [asdict(r) for r in rows]}, indent=2) + "\n")
    print(f"results: {args.out}", file=sys.stderr)
    return 0


def summarize(runs: dict[str, list[float]]) -> list[Row]:
    """One row per stage that has timings, in the order given."""
    return [
        Row(stage, round(statistics.median(times), 3), round(min(times), 3), round(max(times), 3), rounded)
        for stage, times in runs.items()
        if (rounded := [round(t, 3) for t in times])
    ]


def markdown(rows: list[Row]) -> str:
    lines = ["| stage | median s | min s | max s |", "|---|---|---|---|"]
    lines += [f"| {LABELS.get(r.stage, r.stage)} | {r.median_s:.2f} | {r.min_s:.2f} | {r.max_s:.2f} |" for r in rows]
    return "\n".join(lines)


def ready_seconds(stderr: str) -> float:
    """The startup time `sagellm run` reports on stderr ("ready in 4.2 s")."""
    found = READY.search(stderr)
    if found is None:
        raise BenchmarkError(f"sagellm run printed no 'ready in X s' line; its stderr ends:\n{stderr[-2000:]}")
    return float(found.group(1))


def _child(stage: str, model: Path) -> dict[str, float]:
    done = subprocess.run(python_module(MODULE, stage, str(model)), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchmarkError(f"the {stage} stage failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def _sagellm_run(graph: str, model: str | None) -> tuple[float, float]:
    """(the run's own ready time, spawn to exit) of one cold `sagellm run`."""
    command = python_module("sagellm.cli.main", "run", graph, "--prompt", "Hi", "--max-tokens", "4")
    command += ["--temperature", "0", *(["--model", model] if model else [])]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchmarkError(f"sagellm run failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return ready_seconds(done.stderr), wall


def _time_stage(stage: str, model: str) -> dict[str, float]:
    """The child's work: imports, then the one call `stage` names, each timed."""
    start = time.perf_counter()
    from sagellm.runtime.engine.config import EngineConfig
    from sagellm.runtime.engine.llm_engine import LLMEngine
    from sagellm.runtime.models.loader import load_model

    imported = time.perf_counter()
    if stage == "metadata":
        load_model(model, load_weights=False)
    elif stage == "weights":
        load_model(model)
    else:
        LLMEngine(EngineConfig(model=model))
    return {"import_s": imported - start, "call_s": time.perf_counter() - imported}


if __name__ == "__main__":
    print(json.dumps(_time_stage(*sys.argv[1:3])))
