"""`sagellm bench pd-servers`: PD across two `sagellm serve` processes (vLLM's `kv_transfer_params`), what the split
costs a request's first token, by prompt length, with two proxies in front in the same run: our gateway (the
control plane's PREFILLING and DECODING instances) and vllm-router's vLLM PD mode, against the decode server alone.

Each request is streamed with a prompt of its own (no prefix hit anywhere), one at a time: the first token's time
is the prefill server's prefill, the KV's trip to the decode server (kept, fetched over HTTP, imported into its
paged cache) and the proxy's own work; alone it is the prefill. Medians of `--repeats` after one warm-up each."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from sagellm.benchmarks.gateway import _start
from sagellm.common.processes import python_module

WORDS = "river glacier valley stone water light mountain forest "  # eight words, about eight tokens
READY_TIMEOUT_S = 300


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="both servers' model (default: %(default)s)")
    parser.add_argument("--words", default="256,1024,2048", help="comma list of prompt lengths in words")
    parser.add_argument("--repeats", type=int, default=5, help="timed requests per path and length (default: 5)")
    parser.add_argument("--router", default=None, help="the vllm-router executable (default: on PATH or beside us)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    from sagellm.benchmarks.chaos_server import free_port
    from sagellm.benchmarks.vllm_results import cpu_description
    from sagellm.control_plane import ControlPlaneManager, ExecutionInstance, PDSeparationConfig

    router = args.router or shutil.which("vllm-router") or str(Path(sys.prefix) / "bin" / "vllm-router")
    if not Path(router).exists() and not shutil.which(router):
        print("vllm-router is not installed (pip install vllm-router): it is half of this comparison")
        return 2
    print(f"CPU: {cpu_description()}")
    ports = {"prefill": free_port(), "decode": free_port(), "router": free_port()}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    # each server's part in PD across servers: the decode server fetches KV from the prefill server alone
    peers = ["--kv-transfer-peers", f"127.0.0.1:{ports['prefill']}"]
    parts = {"prefill": ["--kv-transfer-role", "producer"], "decode": ["--kv-transfer-role", "consumer", *peers]}
    with ExitStack() as stack:
        for role in ("prefill", "decode"):
            state = stack.enter_context(tempfile.TemporaryDirectory(prefix="sagellm-bench-pd-servers-"))
            _start(stack, python_module("sagellm.cli.main", "serve", args.model, "--port", str(ports[role]),
                   "--state-dir", state, "--no-embedding", "--served-model-name", "model", "--max-num-seqs", "4",
                   "--kv-cache-memory-gb", "1", *parts[role]))  # fmt: skip
        for role in ("prefill", "decode"):
            _wait(urls[role])
        _start(stack, [router, "--vllm-pd-disaggregation", "--prefill", urls["prefill"], "--decode", urls["decode"],
               "--port", str(ports["router"]), "--prometheus-port", str(free_port())])  # fmt: skip
        _wait(urls["router"])
        split = PDSeparationConfig(enabled=True, routing_policy="threshold", prefilling_threshold_input_tokens=1)
        plane = stack.enter_context(ControlPlaneManager(enable_pd_separation=True, pd_config=split))
        for name, kind in (("prefill", "prefilling"), ("decode", "decoding")):
            plane.register_instance(ExecutionInstance(name, "127.0.0.1", ports[name], "model", instance_type=kind))
        paths = {
            "decode server alone": urls["decode"],
            "sagellm gateway PD": plane.url,
            "vllm-router PD": urls["router"],
        }
        rows = []
        for words in (int(w) for w in args.words.split(",")):
            row = {"prompt_words": words}
            for name, url in paths.items():
                print(f"{name}, {words} words ...", file=sys.stderr)
                times = [_ttft_s(url, f"{i} {name} " + WORDS * (words // 8)) for i in range(args.repeats + 1)][1:]
                row[name] = statistics.median(times) * 1000
            rows.append(row)
    print(f"\n{'prompt words':>12} | " + " | ".join(f"{name} TTFT ms" for name in paths))
    for row in rows:
        print(f"{row['prompt_words']:>12} | " + " | ".join(f"{row[n]:>{len(n) + 8}.0f}" for n in paths))
    if args.out is not None:
        args.out.write_text(json.dumps({"benchmark": "sagellm bench pd-servers", "cpu": cpu_description(),
                                        "model": args.model, "rows": rows}, indent=2))  # fmt: skip
    return 0


def _ttft_s(url: str, prompt: str) -> float:
    body = {"model": "model", "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}
    started = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or []
                if choices and choices[0].get("text"):
                    return time.perf_counter() - started
    raise RuntimeError(f"{url} streamed no text")


def _wait(url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer /health within {READY_TIMEOUT_S} s")
