"""One GGUF loaded and run by `LLM.generate` in this (fresh) process, for `sagellm bench kquant`: load seconds,
prefill and decode tokens/s per batch size, and VmRSS / VmHWM, printed as one JSON line.

A fresh process per file, so the memory figures are that model's alone (not what an earlier model in the same
interpreter left behind) and a 7B that does not fit fails this child, not the benchmark. Prompts are random token
ids (as llama-bench's), greedy, EOS ignored; the first token's time is the prefill's and the rest the decode's:
prefill tok/s = prompt tokens of the batch / (last first token - arrival), decode tok/s = tokens after each first /
(last finish - last first token)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sagellm.common.memory import resident_bytes

MODULE = "sagellm.benchmarks.kquant_load"


def measure(
    path: Path,
    *,
    kv_gb: float,
    prompt_len: int,
    output_len: int,
    batches: list[int],
    repeats: int,
    seed: int = 0,
    int8_activations: bool = False,
) -> dict[str, Any]:
    import numpy as np

    from sagellm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(str(path), kv_cache_memory_gb=kv_gb, max_num_seqs=max(batches), int8_activations=int8_activations)
    loaded = {"load_s": time.perf_counter() - start, "rss_loaded_gib": _gib(resident_bytes())}
    vocab = llm.engine.model.config.vocab_size
    rng = np.random.default_rng(seed)
    greedy = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate([rng.integers(100, vocab - 100, 16).tolist()], SamplingParams(max_tokens=4, temperature=0))  # warm
    runs: dict[str, dict[str, float]] = {}
    for batch in batches:
        prefill, decode = [], []
        for _ in range(repeats):
            prompts = [rng.integers(100, vocab - 100, prompt_len).tolist() for _ in range(batch)]
            outs = llm.generate(prompts, greedy)
            metrics = [o.metrics for o in outs]
            arrival = min(m.arrival_time for m in metrics)
            first = max(m.first_token_time for m in metrics)
            finished = max(m.finished_time for m in metrics)
            prefill.append(batch * prompt_len / (first - arrival))
            decode.append(sum(m.num_output_tokens - 1 for m in metrics) / (finished - first))
            print(f"kquant: batch {batch}: prefill {prefill[-1]:.1f}, decode {decode[-1]:.2f} tok/s", file=sys.stderr)
        runs[str(batch)] = {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode)}
    from sagellm.runtime.engine.memory_report import memory_report

    said = memory_report([llm.engine.runner]).line()
    return loaded | {
        "file_gib": path.stat().st_size / 2**30,
        "kv_gib": kv_gb,
        "rss_gib": _gib(resident_bytes()),
        "hwm_gib": _gib(resident_bytes(field="VmHWM")),
        "memory": said,
        "int8_activations": int8_activations,
        "batches": runs,
    }


def _gib(nbytes: int | None) -> float:
    return float("nan") if nbytes is None else nbytes / 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=MODULE, description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--kv-gb", type=float, default=0.25)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batches", default="1,4", help="comma list of batch sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int8-activations", action="store_true", help="the linears on x rounded to int8")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    result = measure(args.path, kv_gb=args.kv_gb, prompt_len=args.prompt_len, output_len=args.output_len,
                     batches=batches, repeats=args.repeats, int8_activations=args.int8_activations)  # fmt: skip
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
