"""The offline benchmark: sageLLM's `LLM.generate` against Hugging Face `transformers` `generate` in one process run.

The machine is shared and noisy, so only ratios measured side by side mean anything. Both engines get the same
token-id prompts, greedy decoding and exactly `output_len` new tokens (ignore_eos / min_new_tokens), the same number
of torch threads, and fp32 weights from the same file. Engines run one after the other, never at once, and each is
freed before the next loads. TTFT and TPOT are defined identically: TTFT from a request's arrival (the start of the
workload, or of its own call when requests go one at a time) to its first token; TPOT the mean gap after that."""

from __future__ import annotations

import gc
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from sagellm.benchmarks.errors import BenchmarkError
from sagellm.benchmarks.report import median_summary
from sagellm.benchmarks.workloads import Workload, random_token_prompts
from sagellm.common.errors import InvalidInput
from sagellm.runtime.engine.config import EngineConfig
from sagellm.runtime.models.loader import load_model

PEERS = ("transformers",)
KV_BLOCK_SIZE = 16
WARMUP_PROMPTS, WARMUP_TOKENS = 4, 4
DEFINITIONS = {
    "out_tok_s": "output tokens of all requests / wall time of the workload",
    "req_s": "requests / wall time of the workload",
    "ttft": "arrival (workload start; a one-at-a-time request's own call) to the first output token, per request",
    "tpot": "(last token time - first token time) / (output tokens - 1), per request",
    "median": "each metric is the median over repeats; every repeat has fresh random prompts, the same on each engine",
    "sagellm": "one LLM per workload: max_num_seqs = the workload's batch size, KV cache sized for the whole batch",
    "transformers": "generate on static left-padded batches of the workload's batch size, min_new_tokens = max",
}


@dataclass
class OfflineConfig:
    model: Path  # a .gguf file, a Hugging Face directory, or a directory holding one .gguf
    workloads: list[Workload]
    peers: tuple[str, ...] = PEERS
    repeats: int = 1
    seed: int = 0
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    backend: str = "cpu"
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens  # our engine's step budget: its own default
    progress: bool = True


@dataclass
class RequestTiming:
    ttft_s: float
    tpot_s: float  # nan with a single output token
    token_ids: list[int]


Prompts = list[list[int]]
Progress = Callable[[int], object]
Run = tuple[float, list[RequestTiming]]  # (wall seconds, per-request timings) of one repeat
# (workload, a prompt set per repeat, warm-up prompts, progress callback) -> one Run per repeat
WorkloadRunner = Callable[[Workload, list[Prompts], Prompts, Progress], list[Run]]
GroupGenerator = Callable[[Prompts, float], list[RequestTiming]]  # (a call's prompts, their arrival) -> timings


@dataclass
class Row:
    """One workload on one engine: the median over repeats of each metric, and every repeat's own numbers."""

    workload: str
    engine: str
    median: dict[str, float]
    repeats: list[dict[str, float]]
    token_ids: list[list[int]] = field(repr=False)  # the first repeat's outputs, to check the engines agree


@dataclass
class OfflineReport:
    model: str
    note: str
    machine: dict[str, object]
    workloads: list[Workload]
    rows: list[Row]
    repeats: int

    def row(self, workload: str, engine: str) -> Row | None:
        return next((r for r in self.rows if r.workload == workload and r.engine == engine), None)

    def agreement(self) -> dict[str, dict[str, float]]:
        """Per workload: the share of requests whose greedy outputs are identical across the two engines, and the
        mean length of their common prefix. fp32 rounding differs between kernels, so long outputs may part late."""
        result = {}
        for w in self.workloads:
            ours, peer = self.row(w.name, "sagellm"), self.row(w.name, "transformers")
            if ours is None or peer is None:
                continue
            prefixes = [_common_prefix(a, b) for a, b in zip(ours.token_ids, peer.token_ids, strict=True)]
            result[w.name] = {
                "identical": sum(p == w.output_len for p in prefixes) / len(prefixes),
                "mean_common_prefix": float(np.mean(prefixes)),
            }
        return result

    def to_json(self) -> dict[str, object]:
        return {
            "model": self.model,
            "note": self.note,
            "machine": self.machine,
            "repeats": self.repeats,
            "workloads": [asdict(w) for w in self.workloads],
            "results": [
                {
                    "workload": r.workload,
                    "engine": r.engine,
                    **_finite(r.median),
                    "runs": [_finite(s) for s in r.repeats],
                }
                for r in self.rows
            ],
            "agreement": self.agreement(),
            "definitions": DEFINITIONS,
        }


def run_offline(config: OfflineConfig) -> OfflineReport:
    """Every workload on sageLLM, then every workload on each peer; `repeats` fresh prompt sets per workload."""
    unknown = set(config.peers) - set(PEERS)
    if unknown:
        raise InvalidInput(f"unknown peer(s) {sorted(unknown)}; choose from {', '.join(PEERS)} or none")
    if config.repeats < 1:
        raise InvalidInput(f"repeats must be >= 1, got {config.repeats}")
    # Our loader's view of the model: the exact file to hand transformers (a cache directory holds one .gguf among
    # tokenizer files), and the tokenizer both engines' prompts are drawn from.
    meta = load_model(config.model, load_weights=False)
    if meta.tokenizer is None:
        raise InvalidInput(f"{meta.source}: the model has no tokenizer, which the engines need")
    config = replace(config, model=meta.source)
    tokenizer = meta.tokenizer
    prompt_sets = {
        w.name: [
            random_token_prompts(tokenizer, w.num_prompts, w.input_len, (config.seed, i, r))
            for r in range(config.repeats)
        ]
        for i, w in enumerate(config.workloads)
    }
    warmup = random_token_prompts(
        tokenizer, WARMUP_PROMPTS, max(w.input_len for w in config.workloads), config.seed + 1
    )
    rows: list[Row] = []
    for engine in ("sagellm", *config.peers):
        run_workload = _sagellm_runner(config) if engine == "sagellm" else _transformers_runner(config, tokenizer)
        for w in config.workloads:
            total = w.num_prompts * config.repeats
            with tqdm(total=total, desc=f"{engine} {w.name}", unit="req", disable=not config.progress) as bar:
                runs = run_workload(w, prompt_sets[w.name], [p[: w.input_len] for p in warmup], bar.update)
            rows.append(_row(w, engine, runs))
            gc.collect()  # our engine is built per workload: reclaim the last one before the next
        del run_workload  # the runner's closure holds the engine: drop it before the next engine loads
        gc.collect()
    return OfflineReport(
        model=str(config.model),
        note=f"every engine runs fp32 weights {'dequantized ' if config.model.suffix == '.gguf' else ''}"
        f"from {config.model.name}",
        machine=machine_info(config.threads),
        workloads=config.workloads,
        rows=rows,
        repeats=config.repeats,
    )


def _sagellm_runner(config: OfflineConfig) -> WorkloadRunner:
    """One `LLM` per workload, since `max_num_seqs` is the workload's concurrency. The KV cache holds every
    in-flight sequence whole (as transformers' cache does), so the scheduler never preempts."""
    from sagellm import LLM, SamplingParams

    def run_workload(w: Workload, prompt_sets: list[Prompts], warmup: Prompts, progress: Progress) -> list[Run]:
        llm = LLM(
            str(config.model),
            backend=config.backend,
            max_num_seqs=w.batch_size,
            max_num_batched_tokens=config.max_num_batched_tokens,
            num_threads=config.threads,
            block_size=KV_BLOCK_SIZE,
            num_kv_blocks=w.batch_size * (math.ceil((w.input_len + w.output_len) / KV_BLOCK_SIZE) + 1),
        )
        params = SamplingParams(max_tokens=w.output_len, temperature=0, ignore_eos=True)

        def generate(group: Prompts, arrival: float) -> list[RequestTiming]:
            # The engine stamps arrival itself when the request is added, which is `arrival` here.
            outs = llm.generate(group, params)
            return [RequestTiming(o.metrics.ttft_s, _nan(o.metrics.tpot_s), list(o.outputs[0].token_ids)) for o in outs]

        llm.generate(warmup[: w.batch_size], SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0, ignore_eos=True))
        group_size = 1 if w.one_at_a_time else w.num_prompts  # all requests at once: the engine batches them
        return [_timed(w, prompts, generate, group_size, progress) for prompts in prompt_sets]

    return run_workload


def _transformers_runner(config: OfflineConfig, tokenizer: PreTrainedTokenizerBase) -> WorkloadRunner:
    """Static batches of `batch_size` prompts, left-padded, greedy, `min_new_tokens = max_new_tokens` (the
    ignore_eos equivalent), on the device our engine's backend runs on (a GPU for cuda). A streamer stamps each
    decoding step as its tokens reach the host, which gives per-request TTFT and TPOT."""
    from transformers import AutoModelForCausalLM

    from sagellm.backends.registry import get_backend

    torch.set_num_threads(config.threads)
    root, kwargs = _hf_location(config.model)
    device = get_backend(config.backend).device
    model = AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32, **kwargs).to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate_fn(new_tokens: int) -> GroupGenerator:
        def generate(group: Prompts, arrival: float) -> list[RequestTiming]:
            width = max(len(p) for p in group)
            batch = {  # left padding, so every row's next token comes at the same position
                "input_ids": torch.tensor([[pad_id] * (width - len(p)) + p for p in group], device=device),
                "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device),
            }
            steps = _StepTimes()
            with torch.inference_mode():
                seqs = model.generate(
                    **batch,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                    streamer=steps,
                )
            new = seqs[:, batch["input_ids"].shape[1] :]  # [B, new_tokens]
            first, last = steps.times[0], steps.times[-1]
            tpot = (last - first) / (new_tokens - 1) if new_tokens > 1 else math.nan
            return [RequestTiming(first - arrival, tpot, ids) for ids in new.tolist()]

        return generate

    def run_workload(w: Workload, prompt_sets: list[Prompts], warmup: Prompts, progress: Progress) -> list[Run]:
        torch.set_num_threads(config.threads)
        generate_fn(WARMUP_TOKENS)(warmup[: w.batch_size], time.perf_counter())
        generate = generate_fn(w.output_len)
        return [_timed(w, prompts, generate, w.batch_size, progress) for prompts in prompt_sets]

    return run_workload


class _StepTimes(BaseStreamer):
    """Stamps the moment each decoding step's tokens reach the host. `generate` first puts the prompt itself."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._got_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self._got_prompt:
            self.times.append(time.perf_counter())
        self._got_prompt = True

    def end(self) -> None:
        pass


def _timed(w: Workload, prompts: Prompts, generate: GroupGenerator, group_size: int, progress: Progress) -> Run:
    """Runs the prompts in groups of `group_size` calls; returns the wall time and each request's timing."""
    start = time.perf_counter()
    timings: list[RequestTiming] = []
    for i in range(0, len(prompts), group_size):
        group = prompts[i : i + group_size]
        timings += generate(group, time.perf_counter() if w.one_at_a_time else start)
        progress(len(group))
    wall = time.perf_counter() - start
    wrong = [len(t.token_ids) for t in timings if len(t.token_ids) != w.output_len]
    if wrong:
        raise BenchmarkError(f"{w.name}: {len(wrong)} request(s) produced {wrong[0]} tokens, not {w.output_len}")
    return wall, timings


def _row(w: Workload, engine: str, runs: list[Run]) -> Row:
    summaries = [_summarize(wall, timings) for wall, timings in runs]
    median = {m: _nan(v) for m, v in median_summary(summaries).items()}
    return Row(w.name, engine, median, summaries, [t.token_ids for t in runs[0][1]])


def _summarize(wall: float, timings: Sequence[RequestTiming]) -> dict[str, float]:
    ttft_ms = [1000 * t.ttft_s for t in timings]
    tpot_ms = [1000 * t.tpot_s for t in timings if not math.isnan(t.tpot_s)]
    return {
        "out_tok_s": sum(len(t.token_ids) for t in timings) / wall,
        "req_s": len(timings) / wall,
        "ttft_p50_ms": _percentile(ttft_ms, 50),
        "ttft_p99_ms": _percentile(ttft_ms, 99),
        "tpot_p50_ms": _percentile(tpot_ms, 50),
        "tpot_p99_ms": _percentile(tpot_ms, 99),
        "wall_s": wall,
    }


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN: a metric that does not exist (TPOT of one-token outputs) is stored as null."""
    return {k: None if math.isnan(v) else v for k, v in metrics.items()}


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _hf_location(model: Path) -> tuple[Path, dict[str, str]]:
    """transformers loads a GGUF as (its folder, gguf_file=name) and dequantizes it; a directory as is."""
    return (model.parent, {"gguf_file": model.name}) if model.suffix == ".gguf" else (model, {})


def machine_info(threads: int) -> dict[str, object]:
    """What a reader needs to place the numbers: CPU, cores, memory, and the versions that did the work."""
    import transformers

    import sagellm

    cpu = platform.processor()
    meminfo: dict[str, str] = {}
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
        meminfo = dict(ln.split(":", 1) for ln in Path("/proc/meminfo").read_text().splitlines() if ":" in ln)
    mem_kb = meminfo.get("MemTotal", "0 kB").split()[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "memory_gib": round(int(mem_kb) / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "transformers": transformers.__version__,
        "sagellm": sagellm.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
