"""Where a decode step's time goes: the host (Python scheduling, sampling, launching kernels) or the device.

`python -m sagellm.benchmarks.step_profile --backend cuda --out profile.txt` (scripts/gpu_check.sh's `profile`
stage). On the W1 model (SmolLM2-135M's shape, random weights: benchmarks/gpu_w1.py) it keeps `batch` sequences
decoding and times `steps` engine steps three ways: wall time per step; under torch's profiler, the host time of
each op and the device's kernel time; and the share of a step the device is busy. A step whose kernels take a
tenth of its wall time is bound by the host, and the fix is fewer launches (fused kernels, CUDA graphs), not
faster kernels. The tables are torch's own `key_averages()`, the top rows by host and by device time."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sagellm import LLM, SamplingParams
from sagellm.benchmarks.gpu_w1 import make_random_model, sync


def decode_steps(llm: LLM, device: torch.device, batch: int, prompt_len: int, steps: int) -> tuple[float, object]:
    """Wall ms per decode step of `batch` sequences (after their prefills and a warm-up), and a profile of `steps`
    more."""
    engine = llm.engine
    params = SamplingParams(max_tokens=3 * steps + 64, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"p{i}", [3 + (i * 7 + j) % 40000 for j in range(prompt_len)], params)
    for _ in range(steps):  # prefills and warm-up
        engine.step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    wall_ms = (time.perf_counter() - started) * 1000 / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    for i in range(batch):
        engine.abort_request(f"p{i}")
    return wall_ms, prof


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sagellm.benchmarks.step_profile",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--layers", type=int, default=30, help="model depth (SmolLM2-135M: 30)")
    parser.add_argument("--batches", default="1,16", help="decode batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=32, help="steps timed and profiled per batch size")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--rows", type=int, default=15, help="rows of each op table")
    parser.add_argument("--out", type=Path, default=None, help="write the report here too")
    args = parser.parse_args(argv)
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    from sagellm.backends.registry import get_backend

    device = get_backend(args.backend).device
    with tempfile.TemporaryDirectory(prefix="step-profile-") as tmp:
        model_dir = make_random_model(Path(tmp) / "smollm2-shaped", args.layers)
        llm = LLM(str(model_dir), backend=args.backend, max_num_seqs=16, max_model_len=2048)
        for batch in (int(b) for b in args.batches.split(",")):
            wall_ms, prof = decode_steps(llm, device, batch, args.prompt_len, args.steps)
            events = prof.key_averages()
            host_ms = sum(e.self_cpu_time_total for e in events) / 1000 / args.steps
            device_ms = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1000 / args.steps
            say(f"\n## batch {batch}: {wall_ms:.2f} ms a decode step unprofiled; profiled: ops' host time "
                f"{host_ms:.2f} ms, device kernels {device_ms:.2f} ms a step ({100 * device_ms / wall_ms:.0f}% of "
                f"the unprofiled step)")  # fmt: skip
            say(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
            if device_ms:
                say(events.table(sort_by="self_device_time_total", row_limit=args.rows))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
