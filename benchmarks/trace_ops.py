"""`sagellm bench trace-ops`: where a server's time went, op by op, from a torch profiler trace, so another engine's
ops can sit beside `sagellm bench kernels --ops`.

vLLM writes such traces when started with `--profiler-config.profiler=torch
--profiler-config.torch_profiler_dir=DIR` and driven by `vllm bench serve --profile` (benchmarks/README.md has the
commands). Each op's self time is its span minus the spans of the ops it called on the same thread, so nothing is
counted twice; ops are summed by name over every thread of the trace, per kind of step they ran in: vLLM's worker
marks each step with its batch (`execute_context_0(0)_generation_16(16)`: 16 decodes and no prefill), so decode-only
and mixed steps get a table each, in milliseconds per step, as `bench kernels --ops` splits ours."""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path
from typing import Any

OP_CATEGORIES = ("cpu_op", "user_annotation", "kernel", "gpu_user_annotation")
# vLLM's worker names each step by its batch: execute_context_<prefill chunks>(<tokens>)_generation_<decodes>(<tokens>)
VLLM_STEP = re.compile(r"execute_context_(\d+)\(\d+\)_generation_\d+\(\d+\)")


def step_kind(name: str) -> str | None:
    """The kind of step a span marks: "decode" (decodes only), "mixed" (prefill chunks in it), "step" (a step of
    unknown batch), or None (not a step)."""
    if match := VLLM_STEP.fullmatch(name):
        return "decode" if match.group(1) == "0" else "mixed"
    return "step" if name in ("execute_model", "Worker.execute_model") else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("traces", nargs="+", type=Path, help="trace files (.json or .json.gz) or folders of them")
    parser.add_argument("--top", type=int, default=12, help="ops shown per kind of step (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    files = [f for path in args.traces for f in (sorted(path.glob("*.json*")) if path.is_dir() else [path])]
    if not files:
        print("no trace files found")
        return 1
    totals: collections.Counter[tuple[str, str]] = collections.Counter()
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    steps: collections.Counter[str] = collections.Counter()
    for file in files:
        spans = trace_spans(file)
        steps.update(kind for span in spans if (kind := step_kind(span["name"])))
        for key, (self_us, count) in self_times(spans).items():
            totals[key] += self_us
            counts[key] += count
    print(f"{len(files)} trace file(s); ops' self time {sum(totals.values()) / 1e3:.1f} ms in all")
    for kind in [*steps, "outside steps"]:
        ops = collections.Counter({name: us for (k, name), us in totals.items() if k == kind})
        if not ops:
            continue
        n = steps.get(kind, 0)
        title = f"{kind} steps: {n}, {sum(ops.values()) / 1e3 / n:.1f} ms each" if n else kind
        print(f"\n{title}\n| op | ms {'per step' if n else 'in all'} | share | calls |\n|---|---|---|---|")
        for name, self_us in ops.most_common(args.top):
            print(f"| {name[:60]} | {self_us / 1e3 / (n or 1):.2f} | {100 * self_us / sum(ops.values()):.1f}% | "
                  f"{counts[kind, name]} |")  # fmt: skip
    return 0


def self_times(spans: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[float, int]]:
    """Per (kind of the step it ran in, op name): summed self time (us) and calls. Spans on one thread nest (a
    profiler's do); an op's children are the spans inside it."""
    by_thread: dict[tuple[Any, Any], list[dict[str, Any]]] = collections.defaultdict(list)
    for span in spans:
        by_thread[span.get("pid"), span.get("tid")].append(span)
    result: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list[Any]] = []  # [end, (kind, name), self time so far]
        for span in thread:
            start, end = span["ts"], span["ts"] + span["dur"]
            while stack and stack[-1][0] <= start:
                _close(stack.pop(), result)
            if stack:
                stack[-1][2] -= min(end, stack[-1][0]) - start
            kind = step_kind(span["name"]) or (stack[-1][1][0] if stack else "outside steps")
            stack.append([end, (kind, span["name"]), float(span["dur"])])
        while stack:
            _close(stack.pop(), result)
    return {key: (us, int(count)) for key, (us, count) in result.items()}


def _close(frame: list[Any], result: dict[tuple[str, str], list[float]]) -> None:
    _, key, self_us = frame
    result[key][0] += max(self_us, 0.0)
    result[key][1] += 1


def trace_spans(file: Path) -> list[dict[str, Any]]:
    """The complete spans ("ph": "X") of ops and steps in a chrome trace file."""
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [
        e
        for e in events
        if e.get("ph") == "X" and "dur" in e and (e.get("cat") in OP_CATEGORIES or step_kind(e["name"]))
    ]
