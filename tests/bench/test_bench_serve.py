"""`sagellm bench serve` against a real HTTP server on 127.0.0.1: the SSE fixture (on the gateway's HTTP server)
streaming known replies with fixed delays. Checks what the client counts and times, that it holds the concurrency
limit and the arrival schedule, that failures are reported and never raised, and the CLI end to end (table, JSON,
PNG). No assert depends on this machine's speed beyond loose bounds; the real numbers come from the command itself."""

from __future__ import annotations

import json
import math
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio

from sagellm.benchmarks.report import median_summary
from sagellm.benchmarks.serve import (
    PROBE_PROMPT,
    RequestRecord,
    ServeConfig,
    Target,
    arrival_times,
    benchmark,
    goodput,
    meets_slos,
    summarize,
)
from sagellm.benchmarks.serve_cli import parse_goodput, parse_targets
from sagellm.benchmarks.serve_datasets import DatasetError, SampleRequest, jsonl_requests, random_requests
from sagellm.benchmarks.sse_fixture import StreamingFixture, serve, serving_in_thread
from sagellm.cli.main import main
from sagellm.runtime.engine.outputs import RequestMetrics
from tests.tiny_models import make_tiny_llama, make_tokenizer


@asynccontextmanager
async def fixture_server(app: StreamingFixture) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        yield await nursery.start(serve, app)
        nursery.cancel_scope.cancel()


@contextmanager
def refused_url() -> Iterator[str]:
    """A URL on 127.0.0.1 whose port is held but not listening: connecting is refused."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{held.getsockname()[1]}"


def requests(n: int, output_len: int = 8) -> list[SampleRequest]:
    return [SampleRequest(f"prompt number {i} here", None, output_len) for i in range(n)]


def config(url: str, **overrides: object) -> ServeConfig:
    return ServeConfig((Target("fixture", url),), progress=False, **overrides)  # type: ignore[arg-type]


async def test_counts_tokens_from_usage_and_times_the_stream() -> None:
    app = StreamingFixture(first_delay_s=0.02, delay_s=0.002, tokens_per_chunk=2)  # 2 tokens per chunk, as llama.cpp
    async with fixture_server(app) as url:
        result = await benchmark(config(url, ignore_eos=True, temperature=0.5), [requests(6)])

    assert result.errors == {} and result.models == {"fixture": "fixture"}  # the model came from GET /v1/models
    (run,) = result.runs
    assert len(run.records) == 6 and len(app.bodies) == 1 + 6  # the first request checks and warms the target
    for record in run.records:
        assert record.ok and record.error is None
        assert record.chunks == 4 and record.output_tokens == 8  # usage wins over the chunk count
        assert record.usage == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}
        assert 0.02 <= record.ttft_s <= record.e2e_s and len(record.itl_s) == record.chunks - 1
        assert record.tpot_s == pytest.approx((record.e2e_s - record.ttft_s) / 7)
    body = app.bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 8 and body["temperature"] == 0.5
    assert body["model"] == "fixture" and body["prompt"].startswith("prompt number")
    summary = summarize(run.records, run.wall_s)
    assert summary["completed"] == 6 and summary["failed"] == 0 and summary["output_tokens"] == 48
    assert summary["input_tokens"] == 24 and summary["out_tok_s"] == pytest.approx(48 / run.wall_s)


async def test_chat_endpoint_without_usage_counts_text_chunks() -> None:
    app = StreamingFixture(usage=False)
    async with fixture_server(app) as url:
        cfg = config(url, endpoint="/v1/chat/completions", model="given")
        result = await benchmark(cfg, [requests(3, output_len=5)])

    assert result.models == {"fixture": "given"}
    for record in result.runs[0].records:
        assert record.ok and record.usage is None
        assert record.chunks == 5 and record.output_tokens == 5  # the empty role chunk is not a token
    assert app.bodies[-1]["messages"][0]["role"] == "user"
    assert sorted(b["messages"][0]["content"] for b in app.bodies[1:]) == [r.prompt for r in requests(3)]


async def test_concurrency_limit_is_held() -> None:
    app = StreamingFixture(first_delay_s=0.03, delay_s=0.001)
    async with fixture_server(app) as url:
        result = await benchmark(config(url, max_concurrency=3), [requests(12, output_len=4)])

    assert summarize(result.runs[0].records, result.runs[0].wall_s)["completed"] == 12
    assert app.max_in_flight == 3


async def test_the_api_key_goes_with_every_request() -> None:
    app = StreamingFixture()
    async with fixture_server(app) as url:
        cfg = ServeConfig((Target("fixture", url),), api_key="sk-test", max_concurrency=4, progress=False)
        result = await benchmark(cfg, [requests(8)])
    assert all(r.ok for r in result.runs[0].records)
    assert app.authorizations == ["Bearer sk-test"] * 9  # the warm-up and the eight


def test_arrival_times_are_a_seeded_poisson_process() -> None:
    assert arrival_times(4, math.inf, 0) == [0.0] * 4
    offsets = arrival_times(4000, 50.0, seed=1)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert offsets[0] == 0.0 and min(gaps) >= 0.0 and offsets == arrival_times(4000, 50.0, seed=1)
    assert 0.018 < sum(gaps) / len(gaps) < 0.022  # mean gap 1 / rate
    with pytest.raises(ValueError, match="request-rate"):
        arrival_times(3, 0.0, 0)


async def test_request_rate_spreads_arrivals() -> None:
    app = StreamingFixture()
    rate, n = 40.0, 12
    async with fixture_server(app) as url:
        await benchmark(config(url, request_rate=rate, seed=3), [requests(n, output_len=2)])

    planned = arrival_times(n, rate, seed=3)  # run 0 uses the config's seed
    span = app.arrivals[-1] - app.arrivals[1]  # arrivals[0] is the warm-up request
    assert 0.8 * planned[-1] <= span <= planned[-1] + 2.0  # never early; late only by scheduling


async def test_failures_are_recorded_not_raised() -> None:
    app = StreamingFixture(failures={2: "429", 4: "500", 6: "error-event"})  # POST 0 is the warm-up
    async with fixture_server(app) as url:
        with refused_url() as down:
            targets = (Target("down", down), Target("fixture", url))
            cfg = ServeConfig(targets, max_concurrency=1, progress=False)
            result = await benchmark(cfg, [requests(8)])

    assert set(result.errors) == {"down"} and "GET /v1/models" in result.errors["down"]
    records = result.runs[0].records
    failed = {i: r.error for i, r in enumerate(records) if not r.ok}
    assert set(failed) == {1, 3, 5}  # one at a time: request i is POST i + 1
    assert failed[1].startswith("HTTP 429") and failed[3].startswith("HTTP 500")
    assert failed[5].startswith("error event") and "mid-stream" in failed[5] and records[5].chunks == 4
    summary = summarize(records, result.runs[0].wall_s)
    assert summary["completed"] == 5 and summary["failed"] == 3 and summary["output_tokens"] == 40


def record(ttft: float, e2e: float, tokens: int, ok: bool = True) -> RequestRecord:
    timeline = RequestMetrics(arrival_time=0.0, first_token_time=ttft, finished_time=e2e, num_output_tokens=tokens)
    return RequestRecord(None, tokens, ok=ok, timeline=timeline)


def test_goodput_counts_requests_within_every_slo() -> None:
    records = [
        record(0.1, 1.1, 11),  # tpot 100 ms
        record(0.3, 1.3, 11),  # ttft over 200 ms
        record(0.1, 3.1, 11),  # tpot 300 ms
        record(0.1, 0.1, 1),  # one token: tpot undefined, counts as met
        record(0.1, 1.1, 11, ok=False),  # failed requests never count
    ]
    slos = parse_goodput(["ttft:200", "tpot:150"])
    assert slos == {"ttft": 200.0, "tpot": 150.0}
    assert [meets_slos(r, slos) for r in records] == [True, False, False, True, False]
    assert goodput(records, slos, wall_s=4.0) == pytest.approx(0.5)
    assert goodput(records, {"e2el": 2000.0}, wall_s=2.0) == pytest.approx(1.5)
    summary = summarize(records, 4.0, percentiles=(50,), slos_ms=slos)
    assert summary["goodput_req_s"] == pytest.approx(0.5) and summary["tpot_p50_ms"] == pytest.approx(100.0)
    for bad in (["ttft"], ["itl:5"], ["ttft:-1"], ["tpot:x"]):
        with pytest.raises(ValueError, match="--goodput"):
            parse_goodput(bad)


def test_median_summary_and_targets() -> None:
    runs = [{"completed": 4, "failed": 0, "ttft_p50_ms": v} for v in (10.0, 30.0, 20.0)]
    assert median_summary(runs) == {"completed": 12, "failed": 0, "ttft_p50_ms": 20.0}
    assert parse_targets([], "http://127.0.0.1:8000/") == (Target("127.0.0.1:8000", "http://127.0.0.1:8000"),)
    assert parse_targets(["a=http://h:1", "b=http://h:2/"], "ignored")[1] == Target("b", "http://h:2")
    for bad in (["a"], ["a=h:1"], ["a=http://h:1", "a=http://h:2"]):
        with pytest.raises(ValueError, match="--target"):
            parse_targets(bad, "http://x")


def test_random_prompts_have_their_lengths_and_shared_prefix() -> None:
    tokenizer = make_tokenizer()
    reqs = random_requests(tokenizer, 8, 32, 8, range_ratio=0.5, prefix_len=16, seed=1)
    assert reqs == random_requests(tokenizer, 8, 32, 8, range_ratio=0.5, prefix_len=16, seed=1)
    assert reqs != random_requests(tokenizer, 8, 32, 8, range_ratio=0.5, prefix_len=16, seed=2)
    prefix = reqs[0].prompt[:10]
    for r in reqs:
        assert r.prompt.startswith(prefix) and 4 <= r.output_len <= 12
        assert r.prompt_len == len(tokenizer.encode(r.prompt, add_special_tokens=False))
        assert 16 + 16 - 2 <= r.prompt_len <= 16 + 48 + 2  # re-encoding may merge across the prefix boundary
    assert len({r.output_len for r in reqs}) > 1 and len({r.prompt for r in reqs}) == 8
    with pytest.raises(DatasetError, match="range-ratio"):
        random_requests(tokenizer, 1, 4, 4, range_ratio=1.0)


def test_jsonl_requests(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello world", "output_len": 3}\n\n{"prompt": "hi", "max_tokens": 5}\n')
    reqs = jsonl_requests(path, 5, default_output_len=7)
    assert [(r.prompt, r.output_len) for r in reqs] == [("hello world", 3), ("hi", 5)] * 2 + [("hello world", 3)]
    tokenizer = make_tokenizer()
    assert reqs[0].prompt_len is None
    assert jsonl_requests(path, None, 7, tokenizer)[1].prompt_len == len(
        tokenizer.encode("hi", add_special_tokens=False)
    )
    path.write_text('{"text": "no prompt"}\n')
    with pytest.raises(DatasetError, match=":1: need a JSON object"):
        jsonl_requests(path, None, 7)


def test_cli_compares_two_targets_and_writes_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = make_tiny_llama(tmp_path / "tiny-llama")
    out = tmp_path / "results" / "serve.json"
    app = StreamingFixture(first_delay_s=0.005, delay_s=0.001)
    with serving_in_thread(app) as url:
        argv = ["bench", "serve", "--target", f"x={url}", "--target", f"y={url}", "--tokenizer", str(model)]
        argv += ["--num-prompts", "6", "--random-input-len", "16", "--random-output-len", "4", "--ignore-eos"]
        argv += ["--max-concurrency", "2", "--repeats", "2", "--goodput", "ttft:60000", "--metric-percentiles", "50,95"]
        argv += ["--save-result", "--result-filename", str(out), "--no-progress"]
        assert main(argv) == 0

    printed = capsys.readouterr().out
    assert "│ x " in printed and "│ y " in printed and "12/0" in printed and "p95 ms" in printed
    results = json.loads(out.read_text())
    assert [(r["target"], r["repeat"]) for r in results["runs"]] == [("x", 0), ("y", 0), ("x", 1), ("y", 1)]
    for name in ("x", "y"):
        summary = results["summary"][name]
        assert summary["completed"] == 12 and summary["failed"] == 0 and summary["mean_output_tokens"] == 4
        assert summary["goodput_req_s"] == pytest.approx(summary["req_s"]) and summary["ttft_p95_ms"] > 0
    assert all(len(r["requests"]) == 6 and r["requests"][0]["ok"] for r in results["runs"])
    assert results["config"]["request_rate"] == "inf" and results["targets"][0]["model"] == "fixture"
    prompts = [b["prompt"] for b in app.bodies]
    assert prompts[:2] == [PROBE_PROMPT] * 2  # no measured prompt reaches a server's prefix cache before its run
    runs = [prompts[2 + 6 * i : 2 + 6 * (i + 1)] for i in range(4)]  # after the two warm-ups: x0, y0, x1, y1
    assert sorted(runs[0]) == sorted(runs[1]) and set(runs[0]).isdisjoint(runs[2])  # same per round, fresh per round
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_cli_reports_failures_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"question {i}", "output_len": 3}) + "\n" for i in range(4)))
    app = StreamingFixture(failures={2: "500"})
    with serving_in_thread(app) as url, refused_url() as down:
        argv = ["bench", "serve", "--target", f"ok={url}", "--target", f"down={down}"]
        argv += ["--endpoint", "/v1/chat/completions", "--dataset-name", "jsonl", "--dataset-path", str(dataset)]
        assert main([*argv, "--max-concurrency", "1", "--no-progress"]) == 1

    printed = capsys.readouterr().out
    assert "3/1" in printed and "not run" in printed
    assert f"not benchmarked: down ({down})" in printed and "ok: 1 request(s) failed: HTTP 500" in printed
    assert [b["messages"][0]["content"] for b in app.bodies[1:]] == [f"question {i}" for i in range(4)]
