"""`sagellm bench serve`: a streaming load generator for any OpenAI-compatible server (ours, llama.cpp's, vLLM's),
measuring what `vllm bench serve` measures, with several servers compared in one run (workload W1).

Each request is one streamed POST (/v1/completions or /v1/chat/completions) over a kept-alive connection of the raw
HTTP/1.1 client on trio (`raw_http`, plain http only): a general client (httpx) costs several times the CPU per
streamed request, and on a shared 2-core machine a load generator that eats a core slows the server it measures and
reads worse than `vllm bench serve` (aiohttp) on the same server. TTFT is send →
first chunk with non-empty text; ITL the gaps between text chunks; e2e send → end of the stream; output tokens come
from the server's final `usage` when it sends one (llama.cpp's chunks can carry several tokens), else one per text
chunk; TPOT = (e2e - TTFT) / (output tokens - 1). Requests arrive as a Poisson process of `--request-rate` (all at
once by default), at most `--max-concurrency` in flight; a request waiting for a slot is not sent yet, so its TTFT
holds no client-side queueing (as in vLLM). A failed request (HTTP status, error event, broken stream) is recorded
with its error and the run goes on. Targets run one after another, never at once, on the same prompts, `--repeats`
times interleaved with fresh prompts each round; the tables show medians over repeats."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
import numpy as np
import trio

from sagellm.benchmarks.raw_http import ConnectionClosed, RawClient, drain, lines
from sagellm.benchmarks.serve_datasets import SampleRequest
from sagellm.common.errors import InvalidInput, Unavailable
from sagellm.runtime.engine.outputs import RequestMetrics

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_METRICS = ("ttft", "tpot", "e2el")
TABLE_PERCENTILES = (50.0, 99.0)
DEFAULT_NUM_PROMPTS = 64  # W1-c16's count
ERROR_CHARS = 300  # of an error body kept per failed request
# The first request to each target (a check and a warm-up) is none of the measured prompts, so no server's prefix
# cache holds a measured prompt before its run.
PROBE_PROMPT = "Hello! Please introduce yourself."


class TargetError(Unavailable):
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
    timeout_s: float = 600.0  # per request
    progress: bool = True
    # vLLM's --lora-modules: the requests name these models (LoRA adapters) in turn, in place of `model`
    lora_modules: tuple[str, ...] = ()


@dataclass
class RequestRecord:
    """What one request did, as the client saw it; times in seconds, None where they never happened."""

    prompt_len: int | None
    max_tokens: int
    start_s: float = 0.0  # when it was sent, from the start of its run
    ok: bool = False
    error: str | None = None
    # Sent, first text, end of stream and output tokens, in the client's `perf_counter` seconds: TTFT and TPOT come
    # from the same formulas as every server-side report.
    timeline: RequestMetrics = field(default_factory=RequestMetrics)
    itl_s: list[float] = field(default_factory=list)
    chunks: int = 0  # chunks with text
    usage: dict[str, Any] | None = None  # the server's own count, when it sent one

    @property
    def ttft_s(self) -> float | None:
        return self.timeline.ttft_s

    @property
    def tpot_s(self) -> float | None:
        return self.timeline.tpot_s

    @property
    def e2e_s(self) -> float | None:
        return self.timeline.e2e_s

    @property
    def output_tokens(self) -> int:
        return self.timeline.num_output_tokens

    def to_json(self) -> dict[str, Any]:
        """The record as the results file keeps it: latencies in seconds from the request's send, not stamps."""
        fields = {name: getattr(self, name) for name in ("prompt_len", "max_tokens", "start_s", "ok", "error")}
        latencies = {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s}
        rest = {"itl_s": self.itl_s, "chunks": self.chunks, "output_tokens": self.output_tokens, "usage": self.usage}
        return fields | latencies | rest

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
        raise InvalidInput(f"--request-rate must be > 0 (inf: all at once), got {request_rate}")
    if math.isinf(request_rate):
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=max(n - 1, 0))  # [n - 1]
    return [0.0, *np.cumsum(gaps).tolist()][:n]


async def benchmark(config: ServeConfig, request_sets: Sequence[list[SampleRequest]]) -> BenchResult:
    """Each target checked with one request (also a warm-up), then every prompt set run on each in turn."""
    if config.endpoint not in ENDPOINTS:
        raise InvalidInput(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {config.endpoint}")
    result = BenchResult([], {}, {})
    pools = {target.name: _Connections(config, target) for target in config.targets}
    try:
        for target in config.targets:
            pool = pools[target.name]
            try:
                result.models[target.name] = config.model or await _served_model(pool)
                probe = RequestRecord(None, min(4, request_sets[0][0].output_len))
                body = _body(config, result.models[target.name], PROBE_PROMPT, probe.max_tokens)
                await pool.send(body, probe)
                if not probe.ok:
                    raise TargetError(f"the first request failed: {probe.error}")
            except TargetError as error:
                result.errors[target.name] = f"{target.name} ({target.base_url}): {error}"
        for repeat, requests in enumerate(request_sets):
            for target in config.targets:
                if target.name not in result.errors:
                    run = await _run(pools[target.name], config, target, result.models[target.name], requests, repeat)
                    result.runs.append(run)
    finally:
        for pool in pools.values():
            await pool.aclose()
    return result


class _Connections:
    """Kept-alive connections to one target, one per request in flight, reused by the next request."""

    def __init__(self, config: ServeConfig, target: Target) -> None:
        url = urlsplit(target.base_url)
        if url.scheme != "http" or not url.hostname:
            raise InvalidInput(f"bench serve speaks plain http://HOST:PORT, not {target.base_url!r}")
        self._address = url.hostname, url.port or 80
        self._prefix = url.path.rstrip("/")
        self._headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self._endpoint = self._prefix + config.endpoint
        self._timeout_s = config.timeout_s
        self._idle: list[RawClient] = []
        self._all: list[RawClient] = []

    def _take(self) -> RawClient:
        if not self._idle:
            self._all.append(RawClient(*self._address, headers=self._headers))
            return self._all[-1]
        return self._idle.pop()

    async def get_json(self, path: str) -> Any:
        client = self._take()
        try:
            with trio.fail_after(self._timeout_s):
                reply, body = await client.get(self._prefix + path)
            if reply.status != 200:
                raise ValueError(f"HTTP {reply.status}")
            return msgspec.json.decode(body)
        finally:
            self._idle.append(client)

    async def send(self, body: dict[str, Any], record: RequestRecord) -> None:
        """One streamed request into `record`; every failure ends up in `record.error`, never raised."""
        client = self._take()
        try:
            with trio.fail_after(self._timeout_s):
                await _stream(client, self._endpoint, body, record)
        except (ConnectionClosed, OSError, ValueError, trio.TooSlowError) as error:  # ValueError: not JSON
            record.error = (f"no reply within {self._timeout_s:g} s" if isinstance(error, trio.TooSlowError)
                            else _describe(error))[:ERROR_CHARS]  # fmt: skip
            await client.aclose()  # wherever the reply stopped, the connection is not at a request's start
        finally:
            self._idle.append(client)

    async def aclose(self) -> None:
        for client in self._all:
            await client.aclose()


async def _served_model(pool: _Connections) -> str:
    try:
        return str((await pool.get_json("/v1/models"))["data"][0]["id"])
    except (ConnectionClosed, OSError, ValueError, KeyError, IndexError, TypeError, trio.TooSlowError) as error:
        raise TargetError(f"GET /v1/models gave no model ({_describe(error)}); pass --model") from error


async def _run(
    pool: _Connections,
    config: ServeConfig,
    target: Target,
    model: str,
    requests: list[SampleRequest],
    repeat: int,
) -> RunResult:
    from tqdm import tqdm

    records = [RequestRecord(r.prompt_len, r.output_len) for r in requests]
    slots = trio.CapacityLimiter(config.max_concurrency or len(requests))  # FIFO: requests go in arrival order
    offsets = arrival_times(len(requests), config.request_rate, config.seed + repeat)
    desc = f"{target.name} run {repeat + 1}"
    with tqdm(total=len(requests), desc=desc, unit="req", disable=not config.progress, file=sys.stderr) as bar:
        start, t0 = time.perf_counter(), trio.current_time()

        async def one(request: SampleRequest, record: RequestRecord, named: str) -> None:
            async with slots:
                record.start_s = time.perf_counter() - start
                await pool.send(_body(config, named, request.prompt, request.output_len), record)
            bar.update(1)

        adapters = config.lora_modules
        async with trio.open_nursery() as nursery:
            for i, (request, record, offset) in enumerate(zip(requests, records, offsets)):
                await trio.sleep_until(t0 + offset)
                nursery.start_soon(one, request, record, adapters[i % len(adapters)] if adapters else model)
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


async def _stream(client: RawClient, path: str, body: dict[str, Any], record: RequestRecord) -> None:
    """Sends one streamed request and reads its events into `record`; a refusal or an error event is recorded,
    a broken connection or a reply that is not JSON raised."""
    record.timeline.arrival_time = last = time.perf_counter()
    reply, chunks = await client.post(path, body)
    if reply.status != 200:
        text = b"".join([chunk async for chunk in chunks]).decode(errors="replace")
        record.error = f"HTTP {reply.status}: {text[:ERROR_CHARS]}"
        return
    event = ""
    async for line in lines(chunks):
        name, _, data = line.partition(":")
        data = data.strip()
        if not line or name == "event":
            event = data  # an `event:` line names the next data line's event; a blank line ends it
            continue
        if name == "error" or event == "error":  # llama.cpp: `error: {...}`; OpenAI: `event: error`
            record.error = f"error event: {data[:ERROR_CHARS]}"
            await drain(chunks)
            return
        if name != "data" or data == "[DONE]":
            continue
        chunk = _decode(data)
        if not isinstance(chunk, dict) or "error" in chunk or chunk.get("object") == "error":
            record.error = f"error event: {data[:ERROR_CHARS]}"
            await drain(chunks)
            return
        record.usage = chunk.get("usage") or record.usage
        if chunk_text(chunk):
            now = time.perf_counter()
            if record.chunks == 0:
                record.timeline.first_token_time = now
            else:
                record.itl_s.append(now - last)
            last, record.chunks = now, record.chunks + 1
    record.timeline.finished_time = time.perf_counter()
    reported = (record.usage or {}).get("completion_tokens")
    record.timeline.num_output_tokens = int(reported) if reported is not None else record.chunks
    record.ok = record.chunks > 0
    record.error = None if record.ok else "the stream ended without any text"


def _decode(data: str) -> Any:
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError as error:
        raise ValueError(f"a data line that is not JSON: {data[:80]!r}") from error


def chunk_text(chunk: dict[str, Any]) -> str:
    """The text a streamed completion or chat chunk carries ("" for a role or finish event)."""
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
