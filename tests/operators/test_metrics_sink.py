"""metrics_sink and MetricsCollector: percentiles against numpy, SLO compliance, error counts, the fallback from
observed item times, throughput over a controlled clock, the Prometheus exposition and the end-of-run table."""

from __future__ import annotations

import io

import numpy as np
import pytest
from prometheus_client import generate_latest
from rich.console import Console
from structlog.testing import capture_logs

from sagellm.operators.metrics_sink import MetricsSink
from sagellm.runtime.engine.outputs import RequestMetrics
from sagellm.runtime.pipeline.messages import Request, RequestError, TokenDelta
from sagellm.runtime.pipeline.metrics import MetricsCollector, PipelineMetrics, render_metrics_table
from sagellm.runtime.pipeline.operator import get_operator


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _final(rid: str, *, time: float = 0.0, tokens: int = 1, reason: str = "stop", **metrics) -> TokenDelta:
    m = RequestMetrics(**metrics) if metrics else None
    return TokenDelta(request_id=rid, token_ids=[7] * tokens, time=time, finish_reason=reason, metrics=m)


def test_latency_percentiles_match_numpy_and_throughput_uses_the_wall_clock():
    clock = FakeClock()
    collector = MetricsCollector(clock=clock)
    rng = np.random.default_rng(0)
    ttft = rng.uniform(0.01, 2.0, 101)
    tpot = rng.uniform(0.01, 0.2, 101)
    for i, (t, p) in enumerate(zip(ttft, tpot)):
        clock.now = 100.0 + i * 0.1  # 101 items over 10 s
        m = dict(
            arrival_time=99.0,  # all arrived a second before the first item reached the sink
            first_scheduled_time=99.0 + t / 10,
            first_token_time=99.0 + t,
            finished_time=99.0 + t + 9 * p,
            num_prompt_tokens=20,
            num_output_tokens=10,
        )
        collector.observe(_final(f"r{i}", tokens=10, num_cached_tokens=5 if i % 2 else 0, **m))
    s = collector.snapshot()
    assert (s.total, s.completed, s.failed, s.active) == (101, 101, 0, 0)
    for stats, seconds in ((s.ttft, ttft), (s.tpot, tpot), (s.e2e, ttft + 9 * tpot), (s.queue, ttft / 10)):
        assert stats.count == 101
        assert stats.avg_ms == pytest.approx(np.mean(seconds) * 1000)
        for got, q in ((stats.p50_ms, 50), (stats.p95_ms, 95), (stats.p99_ms, 99)):
            assert got == pytest.approx(np.percentile(seconds * 1000, q))
    assert s.wall_s == pytest.approx(11.0)  # from the first arrival, not from the first item the sink saw
    assert s.output_tokens == 1010 and s.output_tokens_per_s == pytest.approx(1010 / 11)
    assert s.requests_per_s == pytest.approx(101 / 11)
    assert s.prompt_tokens == 2020 and s.cached_tokens == 250 and s.cache_hit_rate == pytest.approx(250 / 2020)


def test_slo_compliance_errors_by_code_and_active_requests():
    collector = MetricsCollector()
    collector.observe(_final("ok1", arrival_time=0.0, first_token_time=0.1, slo_met=True))
    collector.observe(_final("ok2", arrival_time=0.0, first_token_time=0.2, slo_met=True))
    collector.observe(_final("late", arrival_time=0.0, first_token_time=0.9, slo_met=False))
    collector.observe(_final("no-slo", arrival_time=0.0, first_token_time=0.3))
    collector.observe(RequestError(request_id="shed", code="overloaded", message="queue full"))
    collector.observe(
        RequestError(request_id="t1", code="timeout", message="deadline", metrics=RequestMetrics(slo_met=False))
    )
    collector.observe(RequestError(request_id="t2", code="timeout", message="deadline"))
    collector.observe(TokenDelta(request_id="running", token_ids=[1], text="x"))
    collector.observe(Request(request_id="waiting", prompt="hi"))
    s = collector.snapshot()
    assert (s.total, s.completed, s.failed, s.active) == (9, 4, 3, 2)
    assert s.errors == {"overloaded": 1, "timeout": 2}
    assert (s.slo_checked, s.slo_violations) == (4, 2) and s.slo_compliance == pytest.approx(0.5)
    assert s.ttft.count == 4  # latencies of completed requests only


def test_missing_engine_metrics_fall_back_to_observed_item_times():
    collector = MetricsCollector()
    collector.observe(Request(request_id="r", prompt_token_ids=[1, 2, 3, 4], arrival_time=10.0))
    collector.observe(TokenDelta(request_id="r", token_ids=[5], time=10.5))
    collector.observe(TokenDelta(request_id="r", token_ids=[6, 7], time=10.7))
    # The engine reported only when it scheduled the request and the cache: the rest comes from what the collector saw.
    collector.observe(_final("r", time=10.9, first_scheduled_time=10.2, num_cached_tokens=2))
    s = collector.snapshot()
    assert s.queue.avg_ms == pytest.approx(200.0)
    assert s.ttft.avg_ms == pytest.approx(500.0)
    assert s.tpot.avg_ms == pytest.approx((10.9 - 10.5) / 3 * 1000)
    assert s.e2e.avg_ms == pytest.approx(900.0)
    assert (s.output_tokens, s.prompt_tokens, s.cache_hit_rate) == (4, 4, 0.5)  # counts the engine left at 0

    other = MetricsCollector()
    other.observe(Request(request_id="q", prompt_token_ids=[1, 2], arrival_time=1.0))
    other.observe(_final("q", time=3.0, tokens=2, num_output_tokens=9))  # the engine's non-zero count wins
    s = other.snapshot()
    assert (s.e2e.avg_ms, s.prompt_tokens, s.output_tokens) == (pytest.approx(2000.0), 2, 9)


def test_empty_snapshot_has_no_rates():
    s = MetricsCollector().snapshot()
    assert (s.total, s.wall_s, s.output_tokens_per_s, s.slo_compliance, s.cache_hit_rate) == (0, 0.0, None, None, None)
    assert s.ttft.count == 0 and s.ttft.p99_ms is None


def test_metrics_sink_passes_items_through_and_exposes_prometheus_series():
    sink = get_operator("metrics_sink")()
    other = MetricsSink()  # a second graph's sink: its own registry, no duplicate-series error
    items = [
        Request(request_id="a", prompt="hi"),
        TokenDelta(request_id="a", token_ids=[1], text="x"),
        # a: TTFT 1/32 s, TPOT 1/64 s over 6 tokens, queued 1/128 s (binary fractions: the sums print exactly)
        _final("a", arrival_time=0.0, first_scheduled_time=0.0078125, first_token_time=0.03125, finished_time=0.109375,
               num_prompt_tokens=8, num_output_tokens=6, num_cached_tokens=4, slo_met=False),
        _final("b", time=2.0, reason="length", arrival_time=0.0, first_token_time=1.5, num_prompt_tokens=8,
               num_output_tokens=2, slo_met=True),
        RequestError(request_id="c", code="rate_limited", message="slow down"),
    ]  # fmt: skip
    with capture_logs() as logs:
        for item in items:
            assert sink.execute(item) is item
    s = sink.get_metrics()
    assert (s.completed, s.failed, s.errors, s.slo_violations) == (2, 1, {"rate_limited": 1}, 1)
    assert other.get_metrics().total == 0

    finished = [e for e in logs if e["event"] == "request_finished"]
    assert [e["request_id"] for e in finished] == ["a", "b", "c"]
    assert finished[0]["ttft_ms"] == 31.25 and finished[0]["slo_met"] is False
    assert finished[2]["error"] == "rate_limited"

    text = generate_latest(sink.prometheus.registry).decode()
    for line in (
        'sagellm:request_success_total{finished_reason="stop"} 1.0',
        'sagellm:request_success_total{finished_reason="length"} 1.0',
        'sagellm:request_failure_total{code="rate_limited"} 1.0',
        "sagellm:time_to_first_token_seconds_count 2.0",
        'sagellm:time_to_first_token_seconds_bucket{le="0.05"} 1.0',
        "sagellm:time_per_output_token_seconds_sum 0.515625",  # a's 1/64, b's (2.0 - 1.5) / 1
        "sagellm:e2e_request_latency_seconds_count 2.0",
        "sagellm:request_queue_time_seconds_count 1.0",
        "sagellm:prompt_tokens_total 16.0",
        "sagellm:generation_tokens_total 8.0",
        "sagellm:slo_checked_total 2.0",
        "sagellm:slo_violations_total 1.0",
        "sagellm:prefix_cache_hit_rate 0.25",
    ):
        assert line in text, line
    assert (
        "sagellm:request_success_total" not in generate_latest(other.prometheus.registry).decode().split("# TYPE")[-1]
    )


def test_render_metrics_table_shows_the_snapshot():
    collector = MetricsCollector(prometheus=PipelineMetrics())
    collector.observe(
        _final(
            "a",
            arrival_time=0.0,
            first_token_time=0.25,
            slo_met=True,
            num_prompt_tokens=10,
            num_cached_tokens=5,
            num_output_tokens=3,
        )
    )
    collector.observe(RequestError(request_id="b", code="timeout", message="late"))
    out = io.StringIO()
    Console(file=out, width=140).print(render_metrics_table(collector.snapshot()))
    text = out.getvalue()
    for fragment in ("2 total, 1 completed, 1 failed, 0 active", "TTFT ms", "p99 250.0", "50.0%", "timeout 1",
                     "compliance 100.0%"):  # fmt: skip
        assert fragment in text, fragment
