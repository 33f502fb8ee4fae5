"""`sagellm bench lora`: what LoRA adapters and models on demand cost, each against its baseline in one run.

1. Adapters: one `sagellm serve MODEL --enable-lora --max-loras 4 --max-lora-rank 16 --lora-modules a0=... a3=...`
   (four random rank-16 adapters on all seven projections, written here in PEFT's format) under W1-c16 (64 random
   256-token prompts, 128 tokens out, `ignore_eos`, greedy, 16 at once), the requests naming the base model, then
   spread over the four adapters in turn (as `vllm bench serve --lora-modules` spreads them), alternating per repeat.
   The overhead is the adapters' output tok/s against the base's (the issue's goal: at most 15%).
2. A model on demand: `sagellm serve --model NAME=MODEL --max-loaded-models 1`; per repeat the model is unloaded
   (`POST /models/unload`), then one streamed request's time to its first token (cold: the load included), then
   another's (warm).
Medians over repeats; a table on stdout with the CPU, JSON and a PNG."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import trio
from safetensors.torch import save_file

from sagellm.benchmarks.chaos_report import progress
from sagellm.benchmarks.chaos_server import Server
from sagellm.benchmarks.report import write_json_and_plot
from sagellm.benchmarks.serve import ServeConfig, Target, benchmark, summarize
from sagellm.benchmarks.serve_datasets import load_tokenizer, random_requests
from sagellm.benchmarks.vllm_results import cpu_description
from sagellm.common.errors import InvalidInput
from sagellm.gateway.config import DEFAULT_GRAPH

ADAPTERS, RANK = 4, 16
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--model", default="smollm2-135m-instruct", help="the base model (default: %(default)s)")
    a("--num-prompts", type=int, default=64, help="requests per W1 run (default: %(default)s)")
    a("--max-concurrency", type=int, default=16, help="(default: %(default)s)")
    a("--repeats", type=int, default=3, help="runs of each arm, alternating; medians (default: %(default)s)")
    a("--out", type=Path, default=Path("benchmarks/results/lora"), help="JSON and PNG stem (default: %(default)s)")
    a("--log-level", default="warning", help="debug, info, warning or error (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.num_prompts < 1:
        raise InvalidInput("--repeats and --num-prompts must be >= 1")
    return trio.run(_run, args)


async def _run(args: argparse.Namespace) -> int:
    from sagellm.runtime.models.model_cache import resolve_model

    model = str(resolve_model(args.model))
    cpu = cpu_description()
    with tempfile.TemporaryDirectory(prefix="sagellm-bench-lora-") as work:
        adapters = write_random_adapters(model, Path(work) / "adapters")
        arms = await _adapters_arms(args, model, adapters, Path(work))
        cold_warm = await _cold_and_warm(args, model, Path(work))
    base, lora = arms["base"], arms["4 adapters"]
    overhead = 100 * (1 - lora["out_tok_s"] / base["out_tok_s"]) if base["out_tok_s"] else None
    print(f"\nLoRA: W1-c{args.max_concurrency}, {args.num_prompts} requests, medians of {args.repeats}; CPU: {cpu}")
    print("| requests | out tok/s | TTFT p50 ms | TPOT p50 ms |\n|---|---|---|---|")
    for name, row in arms.items():
        print(f"| {name} | {row['out_tok_s']:.1f} | {row['ttft_p50_ms']:.0f} | {row['tpot_p50_ms']:.1f} |")
    print(f"overhead of the adapters: {overhead:.1f}% of the base's output tok/s (goal: <= 15%)")
    print(f"\nA model on demand ({args.model}), time to first token, medians of {args.repeats}:")
    print("| | TTFT ms |\n|---|---|")
    print(f"| cold (loaded on demand) | {cold_warm['cold_ms']:.0f} |\n| warm | {cold_warm['warm_ms']:.0f} |")
    shape = {"num_prompts": args.num_prompts, "max_concurrency": args.max_concurrency, "repeats": args.repeats}
    payload = {"cpu": cpu, "model": args.model, "arms": arms, "overhead_pct": overhead, "on_demand": cold_warm, **shape}
    paths = write_json_and_plot(args.out, payload, lambda png: _plot(arms, cold_warm, png, cpu))
    print(f"results: {paths[0]}\nchart: {paths[1]}", file=sys.stderr)
    return 0


def write_random_adapters(model: str, folder: Path) -> dict[str, Path]:
    """ADAPTERS random rank-RANK adapters of `model` on every projection, as PEFT saves them."""
    from sagellm.runtime.models.loader import load_model
    from sagellm.runtime.models.lora_adapter import lora_target_shapes

    shapes = lora_target_shapes(load_model(model, load_tokenizer=False, load_weights=False).config)
    if shapes is None:
        raise InvalidInput(f"{model}: the benchmark writes adapters for a dense decoder of full attention layers")
    made = {}
    for index in range(ADAPTERS):
        generator = torch.Generator().manual_seed(index)
        tensors = {}
        for weight, (rows, columns) in shapes.items():
            module = "base_model.model." + weight.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = torch.randn(RANK, columns, generator=generator) * 0.01
            tensors[f"{module}.lora_B.weight"] = torch.randn(rows, RANK, generator=generator) * 0.01
        directory = folder / f"a{index}"
        directory.mkdir(parents=True)
        save_file(tensors, directory / "adapter_model.safetensors")
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK, "bias": "none",
                  "target_modules": list(MODULES), "base_model_name_or_path": model}  # fmt: skip
        (directory / "adapter_config.json").write_text(json.dumps(config))
        made[f"a{index}"] = directory
    return made


async def _adapters_arms(args: argparse.Namespace, model: str, adapters: dict[str, Path], work: Path) -> dict:
    modules = [f"{name}={path}" for name, path in adapters.items()]
    extra = ("--enable-lora", "--max-loras", str(ADAPTERS), "--max-lora-rank", str(RANK), "--max-num-seqs",
             str(args.max_concurrency), "--lora-modules", *modules)  # fmt: skip
    server = Server(work / "lora", "colocated", model, extra, bench="lora")
    tokenizer = load_tokenizer(model)
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "4 adapters": []}
    try:
        await server.start()
        for repeat in range(args.repeats):
            prompts = random_requests(tokenizer, args.num_prompts, 256, 128, seed=(0, repeat))
            for arm, names in (("base", ()), ("4 adapters", tuple(adapters))):
                progress(f"W1 run {repeat + 1}/{args.repeats}: {arm}", "lora")
                config = ServeConfig((Target(arm, server.url),), max_concurrency=args.max_concurrency,
                                     ignore_eos=True, progress=False, lora_modules=names)  # fmt: skip
                result = await benchmark(config, [prompts])
                if result.errors:
                    raise InvalidInput(f"{arm}: {result.errors}")
                runs[arm].append(summarize(result.runs[0].records, result.runs[0].wall_s))
    finally:
        server.stop()
    keys = ("out_tok_s", "ttft_p50_ms", "tpot_p50_ms")
    return {arm: {k: statistics.median(r[k] for r in rows) for k in keys} for arm, rows in runs.items()}


async def _cold_and_warm(args: argparse.Namespace, model: str, work: Path) -> dict[str, float]:
    extra = ("--model", f"smol={model}", "--max-loaded-models", "1", "--max-num-seqs", "4")
    server = Server(work / "on-demand", str(DEFAULT_GRAPH), None, extra, bench="lora")
    cold, warm = [], []
    try:
        await server.start()
        admin = {"authorization": f"Bearer {(server.state / 'admin.key').read_text().strip()}"}
        async with httpx.AsyncClient(base_url=server.url, timeout=600, headers=admin) as client:
            for repeat in range(args.repeats):
                progress(f"cold and warm TTFT {repeat + 1}/{args.repeats}", "lora")
                await client.post("/models/unload", json={"model": "smol"})
                while (await client.get("/v1/models")).json()["data"][0]["status"]["value"] != "unloaded":
                    await trio.sleep(0.1)
                cold.append(await _ttft_ms(client))
                warm.append(await _ttft_ms(client))
    finally:
        server.stop()
    return {"cold_ms": statistics.median(cold), "warm_ms": statistics.median(warm)}


async def _ttft_ms(client: httpx.AsyncClient) -> float:
    body = {"model": "smol", "prompt": "Tell me about the sea.", "max_tokens": 4, "stream": True, "temperature": 0}
    started = time.perf_counter()
    said = []
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                return 1000 * (time.perf_counter() - started)
            said.append(line)
    raise InvalidInput(f"no token from the model on demand ({reply.status_code}: {' '.join(said)[:500]})")


def _plot(arms: dict, cold_warm: dict, path: Path, cpu: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(list(arms), [row["out_tok_s"] for row in arms.values()], color=["#888", "#3a7"])
    left.set_title("W1-c16 output tok/s")
    right.bar(["cold", "warm"], [cold_warm["cold_ms"], cold_warm["warm_ms"]], color=["#c63", "#3a7"])
    right.set_title("TTFT of a model on demand, ms")
    figure.suptitle(f"LoRA adapters and models on demand; {cpu[:90]}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
