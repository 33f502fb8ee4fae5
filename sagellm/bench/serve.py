"""`sagellm bench serve`: a streaming load generator for any OpenAI-compatible server (ours, llama.cpp's, vLLM's),
measuring what `vllm bench serve` measures, with several servers compared in one run (workload W1).

Each request is one streamed POST (/v1/completions or /v1/chat/completions) sent with httpx on trio. TTFT is send →
first chunk with non-empty text; ITL the gaps between text chunks; e2e send → end of the stream; output tokens come
from the server's final `usage` when it sends one (llama.cpp's chunks can carry several tokens), else one per text
chunk; TPOT = (e2e - TTFT) / (output tokens - 1). Requests arrive as a Poisson process of `--request-rate` (all at
once by default), at most `--max-concurrency` in flight; a request waiting for a slot is not sent yet, so its TTFT
holds no client-side queueing (as in vLLM). A failed request (HTTP status, error event, broken stream) is recorded
with its error and the run goes on. Targets run one after another, never at once, on the same prompts, `--repeats`
times interleaved with fresh prompts each round; the tables show medians over repeats."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from sagellm.bench.serve_datasets import SampleRequest

if TYPE_CHECKING:
    import httpx

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")
TABLE_PERCENTILES = (50.0, 99.0)
DEFAULT_NUM_PROMPTS = 64  # W1-c16's count
ERROR_CHARS = 300  # of an error body kept per failed request
# The first request to each target (a check and a warm-up) is none of the measured prompts, so no server's prefix
# cache holds a measured prompt before its run.
PROBE_PROMPT = "Hello! Please introduce yourself."
COLUMNS = (  # (summary key, header, format); every request count is summed over repeats, the rest are medians
    ("out_tok_s", "out tok/s", "{:.1f}"),
    ("req_s", "req/s", "{:.3f}"),
    ("mean_output_tokens", "tok/req", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
    ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"),
    ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
    ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"),
    ("itl_p50_ms", "ITL p50 ms", "{:.1f}"),
    ("e2el_p50_ms", "e2e p50 ms", "{:.0f}"),
    ("goodput_req_s", "goodput req/s", "{:.3f}"),
)
DEFINITIONS = {
    "ttft": "request sent → first streamed chunk with non-empty text",
    "itl": "gaps between consecutive text chunks, all requests pooled",
    "tpot": "(e2e - ttft) / (output tokens - 1), per request with more than one output token",
    "e2el": "request sent → end of its stream",
    "output_tokens": "usage.completion_tokens of the stream's final chunk, else the number of text chunks",
    "req_s / out_tok_s": "completed requests / output tokens over the run's wall time (first send → last end)",
    "goodput_req_s": "completed requests meeting every --goodput SLO, per second of wall time",
    "repeats": "table values are medians over repeats; request counts are summed",
}


class TargetError(RuntimeError):
    """A target could not be benchmarked at all: no model list, or its first request failed."""


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str  # without /v1, as in vLLM: http://127.0.0.1:8000


@dataclass(frozen=True)
class ServeConfig:
    """How the load is sent; the prompts come separately, one list per repeat."""

    targets: tuple[Target, ...]
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: each target's first entry of GET /v1/models
    api_key: str | None = None
    max_concurrency: int | None = None
    request_rate: float = math.inf  # requests/s of a Poisson process; inf sends all at once
    seed: int = 0
    ignore_eos: bool = False
    temperature: float = 0.0
    timeout_s: float = 600.0  # per network read
    progress: bool = True


@dataclass
class RequestRecord:
    """What one request did, as the client saw it; times in seconds, None where they never happened."""

    prompt_len: int | None
    max_tokens: int
    start_s: float = 0.0  # when it was sent, from the start of its run
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunks: int = 0  # chunks with text
    output_tokens: int = 0
    usage: dict[str, Any] | None = None  # the server's own count, when it sent one

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def input_tokens(self) -> int:
        reported = (self.usage or {}).get("prompt_tokens")
        return int(reported) if reported is not None else self.prompt_len or 0


@dataclass
class RunResult:
    target: str
    repeat: int
    wall_s: float
    records: list[RequestRecord]


@dataclass
class BenchResult:
    runs: list[RunResult]
    models: dict[str, str]  # target name → model it served
    errors: dict[str, str]  # target name → why it was not benchmarked


def arrival_times(n: int, request_rate: float, seed: int) -> list[float]:
    """Send offsets in seconds: all 0 for an infinite rate, else a Poisson process (exponential gaps) from 0."""
    if request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0 (inf: all at once), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=max(n - 1, 0))  # [n - 1]
    return [0.0, *np.cumsum(gaps).tolist()][:n]


async def benchmark(config: ServeConfig, request_sets: Sequence[list[SampleRequest]]) -> BenchResult:
    """Each target checked with one request (also a warm-up), then every prompt set run on each in turn."""
    import httpx

    if config.endpoint not in ENDPOINTS:
        raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {config.endpoint}")
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = httpx.Timeout(config.timeout_s, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    result = BenchResult([], {}, {})
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
        for target in config.targets:
            try:
                result.models[target.name] = config.model or await _served_model(client, target)
                probe = RequestRecord(None, min(4, request_sets[0][0].output_len))
                body = _body(config, result.models[target.name], PROBE_PROMPT, probe.max_tokens)
                await _send(client, target.base_url + config.endpoint, body, probe)
                if not probe.ok:
                    raise TargetError(f"the first request failed: {probe.error}")
            except TargetError as error:
                result.errors[target.name] = f"{target.name} ({target.base_url}): {error}"
        for repeat, requests in enumerate(request_sets):
            for target in config.targets:
                if target.name not in result.errors:
                    run = await _run(client, config, target, result.models[target.name], requests, repeat)
                    result.runs.append(run)
    return result


async def _served_model(client: httpx.AsyncClient, target: Target) -> str:
    import httpx

    try:
        response = await client.get(target.base_url + "/v1/models")
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as error:
        raise TargetError(f"GET /v1/models gave no model ({_describe(error)}); pass --model") from error


async def _run(
    client: httpx.AsyncClient,
    config: ServeConfig,
    target: Target,
    model: str,
    requests: list[SampleRequest],
    repeat: int,
) -> RunResult:
    from tqdm import tqdm

    url = target.base_url + config.endpoint
    records = [RequestRecord(r.prompt_len, r.output_len) for r in requests]
    slots = trio.CapacityLimiter(config.max_concurrency or len(requests))  # FIFO: requests go in arrival order
    offsets = arrival_times(len(requests), config.request_rate, config.seed + repeat)
    desc = f"{target.name} run {repeat + 1}"
    with tqdm(total=len(requests), desc=desc, unit="req", disable=not config.progress, file=sys.stderr) as bar:
        start, t0 = time.perf_counter(), trio.current_time()

        async def one(request: SampleRequest, record: RequestRecord) -> None:
            async with slots:
                record.start_s = time.perf_counter() - start
                await _send(client, url, _body(config, model, request.prompt, request.output_len), record)
            bar.update(1)

        async with trio.open_nursery() as nursery:
            for request, record, offset in zip(requests, records, offsets):
                await trio.sleep_until(t0 + offset)
                nursery.start_soon(one, request, record)
        wall = time.perf_counter() - start
    return RunResult(target.name, repeat, wall, records)


def _body(config: ServeConfig, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": config.temperature}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    if config.ignore_eos:
        body["ignore_eos"] = True  # not OpenAI's, but vLLM and llama.cpp both take it
    if config.endpoint.endswith("chat/completions"):
        return body | {"messages": [{"role": "user", "content": prompt}]}
    return body | {"prompt": prompt}


async def _send(client: httpx.AsyncClient, url: str, body: dict[str, Any], record: RequestRecord) -> None:
    """One streamed request into `record`; every failure ends up in `record.error`, never raised."""
    import httpx

    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:ERROR_CHARS]}"
                return
            event = ""
            async for line in response.aiter_lines():
                name, _, data = line.partition(":")
                data = data.strip()
                if not line or name == "event":
                    event = data  # an `event:` line names the next data line's event; a blank line ends it
                    continue
                if name == "error" or event == "error":  # llama.cpp: `error: {...}`; OpenAI: `event: error`
                    record.error = f"error event: {data[:ERROR_CHARS]}"
                    return
                if name != "data" or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if not isinstance(chunk, dict) or "error" in chunk or chunk.get("object") == "error":
                    record.error = f"error event: {data[:ERROR_CHARS]}"
                    return
                record.usage = chunk.get("usage") or record.usage
                if _text(chunk):
                    now = time.perf_counter()
                    if record.chunks == 0:
                        record.ttft_s = now - start
                    else:
                        record.itl_s.append(now - last)
                    last, record.chunks = now, record.chunks + 1
        record.e2e_s = time.perf_counter() - start
    except (httpx.HTTPError, OSError, ValueError) as error:  # ValueError: a data line that is not JSON
        record.error = _describe(error)[:ERROR_CHARS]
        return
    reported = (record.usage or {}).get("completion_tokens")
    record.output_tokens = int(reported) if reported is not None else record.chunks
    record.ok = record.chunks > 0
    record.error = None if record.ok else "the stream ended without any text"


def _text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or [{}]
    choice = choices[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """A completed request within every SLO; TPOT, undefined with one output token, counts as met then."""
    values = {"ttft": record.ttft_s, "tpot": record.tpot_s, "e2el": record.e2e_s}
    return record.ok and all(values[m] is None or 1000 * values[m] <= limit for m, limit in slos_ms.items())


def goodput(records: Iterable[RequestRecord], slos_ms: dict[str, float], wall_s: float) -> float:
    """Requests per second that completed within every SLO (vLLM's goodput)."""
    return sum(meets_slos(r, slos_ms) for r in records) / wall_s


def summarize(
    records: list[RequestRecord],
    wall_s: float,
    *,
    metrics: Sequence[str] = METRICS,
    percentiles: Sequence[float] = TABLE_PERCENTILES,
    slos_ms: dict[str, float] | None = None,
) -> dict[str, float | None]:
    """One run's numbers; None where nothing was measured (JSON has no NaN)."""
    ok = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, float | None] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "input_tokens": sum(r.input_tokens for r in ok),
        "output_tokens": output_tokens,
        "wall_s": wall_s,
        "req_s": len(ok) / wall_s,
        "out_tok_s": output_tokens / wall_s,
        "mean_output_tokens": output_tokens / len(ok) if ok else None,
        "goodput_req_s": goodput(records, slos_ms, wall_s) if slos_ms else None,
    }
    for metric in metrics:
        ms = [1000 * v for v in _values(ok, metric)]
        summary[f"{metric}_mean_ms"] = float(np.mean(ms)) if ms else None
        for q in percentiles:
            summary[f"{metric}_p{q:g}_ms"] = float(np.percentile(ms, q)) if ms else None
    return summary


def _values(records: list[RequestRecord], metric: str) -> list[float]:
    if metric == "itl":
        return [gap for r in records for gap in r.itl_s]
    values = {"ttft": lambda r: r.ttft_s, "tpot": lambda r: r.tpot_s, "e2el": lambda r: r.e2e_s}[metric]
    return [v for v in map(values, records) if v is not None]


def median_summary(summaries: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Each number's median over repeats (None where no repeat measured it); request counts summed."""
    merged: dict[str, float | None] = {}
    for key in summaries[0]:
        values = [s[key] for s in summaries if s[key] is not None]
        merged[key] = sum(values) if key in ("completed", "failed") else float(np.median(values)) if values else None
    return merged


def parse_targets(specs: Sequence[str], base_url: str) -> tuple[Target, ...]:
    """`--target NAME=BASE_URL` entries (unique names), or the lone `--base-url` named by its host:port."""
    if not specs:
        return (Target(base_url.rstrip("/").split("://")[-1], base_url.rstrip("/")),)
    targets = []
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"--target {spec!r}: expected NAME=http://HOST:PORT")
        targets.append(Target(name, url.rstrip("/")))
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"--target names must differ, got {', '.join(names)}")
    return tuple(targets)


def parse_goodput(specs: Sequence[str]) -> dict[str, float]:
    """`--goodput ttft:MS tpot:MS e2el:MS` as {metric: milliseconds}."""
    slos = {}
    for spec in specs:
        metric, _, ms = spec.partition(":")
        try:
            limit = float(ms)
        except ValueError:
            limit = math.nan
        if metric not in SLO_METRICS or not limit > 0:
            raise ValueError(f"--goodput {spec!r}: expected METRIC:MS with METRIC in {', '.join(SLO_METRICS)}, MS > 0")
        slos[metric] = limit
    return slos


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1 (default: %(default)s)")
    a("--target", action="append", default=[], metavar="NAME=BASE_URL", help="a server to compare (repeatable)")
    a("--endpoint", default=ENDPOINTS[0], choices=ENDPOINTS, help="(default: %(default)s)")
    a("--model", default=None, help="model name to send (default: each server's first of GET /v1/models)")
    a("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    a("--dataset-name", default="random", choices=("random", "jsonl"), help="(default: %(default)s)")
    a("--dataset-path", type=Path, default=None, help='JSONL file, per line {"prompt": ..., "output_len": N}')
    a("--tokenizer", default=None, help="model path or alias whose tokenizer makes random prompts (default model)")
    a("--num-prompts", type=int, default=None, help=f"requests per run (default: {DEFAULT_NUM_PROMPTS}; jsonl: all)")
    a("--random-input-len", type=int, default=256, help="unique prompt tokens (default: %(default)s)")
    a("--random-output-len", type=int, default=128, help="max_tokens; also for JSONL lines without one (128)")
    a("--random-range-ratio", type=float, default=0.0, help="lengths uniform in len*(1±ratio) (default: 0)")
    a("--random-prefix-len", type=int, default=0, help="tokens of a prefix shared by every prompt (default: 0)")
    a("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    a("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default: inf, all at once)")
    a("--seed", type=int, default=0, help="seed of the prompts and arrivals (default: 0)")
    a("--ignore-eos", action="store_true", help="ask for exactly max_tokens tokens (vLLM and llama.cpp honour it)")
    a("--temperature", type=float, default=0.0, help="(default: 0, greedy)")
    a("--percentile-metrics", default=",".join(METRICS), help="comma list of %(default)s")
    a("--metric-percentiles", default="50,90,99", help="comma list (default: %(default)s)")
    a("--goodput", nargs="+", default=[], metavar="METRIC:MS", help="SLOs, e.g. ttft:2000 tpot:200 e2el:30000")
    a("--repeats", type=int, default=1, help="runs per target, interleaved; tables show medians (default: 1)")
    a("--timeout", type=float, default=600.0, help="seconds one network read may take (default: %(default)s)")
    a("--save-result", action="store_true", help="write the JSON results and a PNG chart")
    a("--result-filename", type=Path, default=Path("benchmarks/results/serve.json"), help="(PNG: same stem)")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--log-level", default="warning")


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark; 0 when every target completed requests in every run, else 1 (reasons are printed)."""
    from sagellm.bench.report import write_json_and_plot

    targets = parse_targets(args.target, args.base_url)
    metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    if not set(metrics) <= set(METRICS):
        raise ValueError(f"--percentile-metrics: choose from {', '.join(METRICS)}, got {args.percentile_metrics}")
    percentiles = [float(q) for q in args.metric_percentiles.split(",") if q.strip()]
    if not all(0 < q <= 100 for q in percentiles):
        raise ValueError(f"--metric-percentiles must be in (0, 100], got {args.metric_percentiles}")
    slos = parse_goodput(args.goodput)
    for flag in ("repeats", "max_concurrency", "num_prompts"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    config = ServeConfig(
        targets, args.endpoint, args.model, args.api_key, args.max_concurrency, args.request_rate, args.seed,
        args.ignore_eos, args.temperature, args.timeout, not args.no_progress,
    )  # fmt: skip
    result = trio.run(benchmark, config, _request_sets(args))
    every_q = sorted({*percentiles, *TABLE_PERCENTILES})
    summaries = [summarize(r.records, r.wall_s, percentiles=every_q, slos_ms=slos) for r in result.runs]
    medians = {
        t.name: median_summary([s for r, s in zip(result.runs, summaries) if r.target == t.name])
        for t in targets
        if t.name not in result.errors
    }
    title = _title(args)
    _print_tables(result, medians, metrics, percentiles, title, args.repeats)
    if args.save_result:
        payload = _payload(args, targets, result, summaries, medians)
        paths = write_json_and_plot(args.result_filename, payload, lambda png: _plot(medians, png, title))
        print(f"results: {paths[0]}\nchart: {paths[1]}", file=sys.stderr)
    return 0 if not result.errors and all(s["completed"] for s in summaries) else 1


def _request_sets(args: argparse.Namespace) -> list[list[SampleRequest]]:
    """One prompt list per repeat: fresh random prompts each round (no prefix-cache hits across rounds); a JSONL
    file's lines every round."""
    from sagellm.bench.serve_datasets import jsonl_requests, load_tokenizer, random_requests

    if args.dataset_name == "jsonl":
        if args.dataset_path is None:
            raise ValueError("--dataset-name jsonl needs --dataset-path")
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        return [jsonl_requests(args.dataset_path, args.num_prompts, args.random_output_len, tokenizer)] * args.repeats
    tokenizer = load_tokenizer(args.tokenizer)
    shape = (args.num_prompts or DEFAULT_NUM_PROMPTS, args.random_input_len, args.random_output_len)
    ratio, prefix = args.random_range_ratio, args.random_prefix_len
    return [
        random_requests(tokenizer, *shape, range_ratio=ratio, prefix_len=prefix, seed=(args.seed, r))
        for r in range(args.repeats)
    ]


def _title(args: argparse.Namespace) -> str:
    shape = f"{args.random_input_len} in / {args.random_output_len} out" if args.dataset_name == "random" else "jsonl"
    rate = "all at once" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s Poisson"
    return f"{args.endpoint}, {shape}, concurrency {args.max_concurrency or 'unlimited'}, {rate}"


def _fmt(value: float | None, spec: str = "{:.1f}") -> str:
    return "–" if value is None else spec.format(value)


def _print_tables(
    result: BenchResult,
    medians: dict[str, dict[str, float | None]],
    metrics: list[str],
    percentiles: list[float],
    title: str,
    repeats: int,
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)  # piped: no 80-column squeeze
    caption = f"medians of {repeats} run(s); ok/failed summed over runs"
    table = Table("target", "ok/failed", *(header for _, header, _ in COLUMNS), title=title, caption=caption)
    for name, m in medians.items():
        table.add_row(name, f"{m['completed']:.0f}/{m['failed']:.0f}", *(_fmt(m[k], f) for k, _, f in COLUMNS))
    for name in result.errors:
        table.add_row(name, "not run", *("–" for _ in COLUMNS))
    console.print(table)
    detail = Table("target", "metric", "mean ms", *(f"p{q:g} ms" for q in percentiles), title="latency percentiles")
    for name, m in medians.items():
        for metric in metrics:
            keys = [f"{metric}_mean_ms", *(f"{metric}_p{q:g}_ms" for q in percentiles)]
            detail.add_row(name, metric, *(_fmt(m[k]) for k in keys))
    console.print(detail)
    for error in result.errors.values():
        console.print(f"not benchmarked: {error}", markup=False)
    for name in medians:
        failures = Counter(r.error for run in result.runs if run.target == name for r in run.records if not r.ok)
        for error, count in failures.most_common():
            console.print(f"{name}: {count} request(s) failed: {error}", markup=False)


def _payload(
    args: argparse.Namespace,
    targets: tuple[Target, ...],
    result: BenchResult,
    summaries: list[dict[str, float | None]],
    medians: dict[str, dict[str, float | None]],
) -> dict[str, Any]:
    from sagellm.bench.offline import machine_info

    options = {k: _jsonable(v) for k, v in vars(args).items() if not callable(v)}
    options["api_key"] = options["api_key"] and "(set, not stored)"
    return {
        "benchmark": "sagellm bench serve",
        "config": options,
        "machine": {k: v for k, v in machine_info(1).items() if k != "torch_threads"},  # a client: no torch work
        "targets": [
            {
                "name": t.name,
                "base_url": t.base_url,
                "model": result.models.get(t.name),
                "error": result.errors.get(t.name),
            }
            for t in targets
        ],
        "summary": medians,
        "runs": [
            {"target": r.target, "repeat": r.repeat, "summary": s, "requests": [asdict(x) for x in r.records]}
            for r, s in zip(result.runs, summaries)
        ],
        "definitions": DEFINITIONS,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value) if isinstance(value, Path) else value


def _plot(medians: dict[str, dict[str, float | None]], path: Path, title: str) -> None:
    """Bars per target: output tok/s, TTFT, TPOT/ITL and e2e percentiles (medians over repeats)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("output tokens/s (higher is better)", (("", "out_tok_s"),)),
        ("TTFT ms", (("p50", "ttft_p50_ms"), ("p99", "ttft_p99_ms"))),
        ("TPOT / ITL ms", (("TPOT p50", "tpot_p50_ms"), ("TPOT p99", "tpot_p99_ms"), ("ITL p50", "itl_p50_ms"))),
        ("e2e ms", (("p50", "e2el_p50_ms"), ("p99", "e2el_p99_ms"))),
    )
    widths = [max(len(series), 2) for _, series in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 + 1.5 * sum(widths), 4.5), width_ratios=widths, squeeze=False)
    bar = 0.8 / max(len(medians), 1)
    for ax, (panel_title, series) in zip(axes[0], panels):
        for i, (name, m) in enumerate(medians.items()):
            values = [m[key] or 0.0 for _, key in series]
            xs = [x + (i - (len(medians) - 1) / 2) * bar for x in range(len(series))]
            bars = ax.bar(xs, values, bar, label=name, color=f"C{i}")
            ax.bar_label(bars, fmt="%.0f" if max(values) >= 100 else "%.1f", fontsize=7, padding=2)
        ax.set_xticks(range(len(series)), [label for label, _ in series])
        ax.set_title(panel_title, fontsize=10)
        ax.margins(y=0.15)
    if medians:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(f"sagellm bench serve: {title}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
