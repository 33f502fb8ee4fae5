"""`sagellm bench parallel`: one model split over processes (tensor, pipeline parallel) against one process, in one run.

Per split (default: 1x1, TP=2, PP=2) one `LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp)` measures,
after a warm-up: a 512-token prompt's prefill (time to its one token), one request's decode (ms per token over 64),
and a batch of 16 requests of 32 tokens (output tokens/s). Splits run in turn, `repeats` times, so a slow spell of the
machine hits all alike; the table shows medians with each split's ratio to one process, and the CPU. Greedy tokens of
every split are checked equal to one process's on the way (a split that drifts fails the run)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROMPT_LEN, DECODE_TOKENS, BATCH, BATCH_TOKENS = 512, 64, 16, 32
METRICS = {  # key -> (header, unit formatting, higher is better)
    "prefill_ms": ("prefill 512 tokens (ms)", "{:.0f}", False),
    "decode_ms": ("decode, 1 request (ms/token)", "{:.1f}", False),
    "batch_tok_s": (f"{BATCH} requests (tokens/s)", "{:.0f}", True),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default=None, help="path, .gguf or cache alias (default: SmolLM2-135M)")
    parser.add_argument("--splits", default="1x1,2x1,1x2", help="comma list of TPxPP (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every split, in turn; medians (default: 2)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/parallel.json"), help="JSON results")


def run(args: argparse.Namespace) -> int:
    from sagellm.benchmarks.vllm_results import cpu_description
    from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

    splits = [tuple(int(n) for n in split.lower().split("x")) for split in args.splits.split(",") if split.strip()]
    model = str(resolve_model(args.model or DEFAULT_MODEL))
    runs: dict[tuple[int, int], list[dict[str, float]]] = {split: [] for split in splits}
    reference: list[list[int]] | None = None
    for repeat in range(args.repeats):
        for tp, pp in splits:
            result, tokens = measure(model, tp, pp)
            if reference is None:
                reference = tokens
            elif tokens != reference:
                raise SystemExit(f"TP={tp} PP={pp} gave other greedy tokens than {splits[0]}: the split is not exact")
            runs[tp, pp].append(result)
            print(f"repeat {repeat + 1}/{args.repeats}: TP={tp} PP={pp} {result}", file=sys.stderr)
    medians = {
        split: {key: statistics.median(r[key] for r in results) for key in METRICS} for split, results in runs.items()
    }
    cpu = cpu_description()
    print(markdown(medians, splits[0]))
    print(f"\nCPU: {cpu}; model {model}; median of {args.repeats} run(s) per split, all in this run")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"tp": tp, "pp": pp, **values} for (tp, pp), values in medians.items()]
    args.out.write_text(
        json.dumps({"cpu": cpu, "model": model, "repeats": args.repeats, "rows": rows}, indent=2) + "\n"
    )
    print(f"results: {args.out}", file=sys.stderr)
    return 0


def measure(model: str, tp: int, pp: int) -> tuple[dict[str, float], list[list[int]]]:
    """One split's three numbers, and the greedy tokens of its batch."""
    from sagellm import LLM, SamplingParams

    llm = LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        prompt = [3 + (7 * i) % 97 for i in range(PROMPT_LEN)]  # ids any vocabulary has
        llm.generate([prompt[:8]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate([prompt[:8]], SamplingParams(max_tokens=DECODE_TOKENS + 1, temperature=0, ignore_eos=True))
        decode = (time.perf_counter() - start) / DECODE_TOKENS
        batch = [prompt[i : i + 8] for i in range(BATCH)]
        start = time.perf_counter()
        outs = llm.generate(batch, SamplingParams(max_tokens=BATCH_TOKENS, temperature=0, ignore_eos=True))
        elapsed = time.perf_counter() - start
    finally:
        llm.engine.close()
    result = {"prefill_ms": prefill * 1000, "decode_ms": decode * 1000, "batch_tok_s": BATCH * BATCH_TOKENS / elapsed}
    return result, [o.outputs[0].token_ids for o in outs]


def markdown(medians: dict[tuple[int, int], dict[str, float]], base: tuple[int, int]) -> str:
    """One row per split: each metric and its ratio to the first split (x: how many times better)."""
    headers = ["TP", "PP", *(header for header, _, _ in METRICS.values())]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for (tp, pp), values in medians.items():
        cells = []
        for key, (_, form, higher) in METRICS.items():
            better = values[key] / medians[base][key] if higher else medians[base][key] / values[key]
            cells.append(f"{form.format(values[key])} ({better:.2f}x)")
        lines.append(f"| {tp} | {pp} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
