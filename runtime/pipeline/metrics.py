"""Serving metrics from the items that end requests: a summary for the CLI and Prometheus series for scraping.

`MetricsCollector.observe(item)` is fed every reply item (the `metrics_sink` operator in a graph; the gateway later).
At each request's terminal item it takes the engine's `RequestMetrics` and fills what the engine left unset (a None
timing, a 0 count) from what it saw itself: token stamps, and the request's arrival if the Request passed by.
Latency statistics cover completed requests; token counts, SLO checks and cache hits cover every finished one.
`PipelineMetrics` owns its own Prometheus registry (not the process-global one) so several graphs, and tests, never
collide on series. Names follow vLLM's `vllm:*` metrics with a `sagellm:` prefix, so dashboards map over by a rename."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter as CountByKey
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from sagellm.common.errors import InvalidInput
from sagellm.common.logging import logs
from sagellm.runtime.engine.outputs import LATENCIES, RequestMetrics
from sagellm.runtime.pipeline.messages import Embedding, Request, RequestError, TokenDelta, is_terminal

disable_created_metrics()  # no `*_created` series next to every counter and histogram (vLLM turns them off too)

if TYPE_CHECKING:
    from rich.table import Table

# Bucket edges in seconds, spanning a GPU's milliseconds to a CPU's minutes.
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

_log = structlog.get_logger("sagellm.runtime.pipeline.metrics")


class LatencyStats(msgspec.Struct, frozen=True, kw_only=True):
    """Mean and percentiles of one latency in milliseconds (None when nothing was measured)."""

    count: int = 0
    avg_ms: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None

    @classmethod
    def of(cls, seconds: Iterable[float]) -> LatencyStats:
        ms = sorted(s * 1000.0 for s in seconds)
        if not ms:
            return cls()
        return cls(
            count=len(ms),
            avg_ms=sum(ms) / len(ms),
            p50_ms=_percentile(ms, 50),
            p95_ms=_percentile(ms, 95),
            p99_ms=_percentile(ms, 99),
        )


def _percentile(ordered: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on an ascending non-empty list."""
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class MetricsSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """The pipeline's metrics at one moment; rates are None until there is something to divide by."""

    total: int  # requests seen
    completed: int
    failed: int
    active: int  # seen, not yet finished
    queue: LatencyStats
    ttft: LatencyStats
    tpot: LatencyStats
    e2e: LatencyStats
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    wall_s: float  # from the first request's arrival (or the first item observed) to the last item
    output_tokens_per_s: float | None
    requests_per_s: float | None  # completed requests per wall second
    slo_checked: int
    slo_violations: int
    slo_compliance: float | None  # met / checked
    cache_hit_rate: float | None  # cached prompt tokens / prompt tokens
    errors: dict[str, int]  # failed requests by error code


class PipelineMetrics:
    """The Prometheus series of one pipeline, in a registry of its own: expose it with
    `prometheus_client.generate_latest(metrics.registry)`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"sagellm:{name}", doc, buckets=buckets, registry=r)

        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled.", QUEUE_BUCKETS)
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first output token.", TTFT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Mean gap between later output tokens.", TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last output token.", E2E_BUCKETS)
        self.success = Counter("sagellm:request_success_total", "Requests completed.", ["finished_reason"], registry=r)
        self._success_by_reason: dict[str, Any] = {}
        self.failure = Counter("sagellm:request_failure_total", "Requests failed, by error code.", ["code"], registry=r)
        self.prompt_tokens = Counter("sagellm:prompt_tokens_total", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(
            "sagellm:generation_tokens_total", "Output tokens of finished requests.", registry=r
        )
        self.slo_checked = Counter("sagellm:slo_checked_total", "Finished requests that set an SLO.", registry=r)
        self.slo_violations = Counter(
            "sagellm:slo_violations_total", "Finished requests that missed their SLO.", registry=r
        )
        self.cache_hit_rate = Gauge(
            "sagellm:prefix_cache_hit_rate", "Cached prompt tokens / prompt tokens, since start.", registry=r
        )
        self.cached_by_tier = Counter(
            "sagellm:prefix_cache_hit_tokens_total",
            "Cached prompt tokens of finished requests by where they were: the KV cache (pages), a tier under it, or "
            "another instance (peer).",
            ["tier"],
            registry=r,
        )

    def record(
        self,
        m: RequestMetrics,
        latencies: tuple[float | None, ...],
        *,
        finish_reason: str | None,
        error_code: str | None,
        cache_hit_rate: float | None,
    ) -> None:
        """One finished request (`latencies`: its `_latencies`); latencies are observed for completed requests only,
        as in the snapshot. `cache_hit_rate` is the collector's running rate since start."""
        if error_code is not None:
            self.failure.labels(code=error_code).inc()
        else:
            reason = finish_reason or "unknown"
            success = self._success_by_reason.get(reason)
            if success is None:  # a labelled child is looked up once per reason, not per request
                success = self._success_by_reason[reason] = self.success.labels(finished_reason=reason)
            success.inc()
            for histogram, value in zip((self.queue_time, self.ttft, self.tpot, self.e2e), latencies):
                if value is not None:
                    histogram.observe(value)
        self.prompt_tokens.inc(m.num_prompt_tokens)
        self.generation_tokens.inc(m.num_output_tokens)
        if m.slo_met is not None:
            self.slo_checked.inc()
            if not m.slo_met:
                self.slo_violations.inc()
        if cache_hit_rate is not None:
            self.cache_hit_rate.set(cache_hit_rate)
        for tier, tokens in (m.cached_tokens_by_tier or {}).items():
            self.cached_by_tier.labels(tier=tier).inc(tokens)


def _latencies(m: RequestMetrics) -> tuple[float | None, ...]:
    return tuple(getattr(m, name) for name in LATENCIES)


class MetricsCollector:
    """Aggregates reply items into a `MetricsSnapshot` (and Prometheus series, when given `prometheus`).

    Latency samples are kept for the last `window` completed requests, so a long-running server's memory stays
    bounded; counts are totals since start."""

    def __init__(
        self, prometheus: PipelineMetrics | None = None, window: int = 100_000, clock: Callable[[], float] = time.time
    ) -> None:
        if window < 1:
            raise InvalidInput(f"window must be >= 1 (latency samples kept), got {window}")
        self.prometheus = prometheus
        self.clock = clock
        self._in_flight: dict[str, RequestMetrics] = {}  # what this collector saw of each request: stamps, counts
        self._samples: dict[str, deque[float]] = {name: deque(maxlen=window) for name in LATENCIES}
        self._errors: CountByKey[str] = CountByKey()
        self._totals: CountByKey[str] = CountByKey()  # completed, prompt_tokens, output_tokens, cached_tokens, slo_*
        self._first_time: float | None = None
        self._last_time = 0.0

    def observe(self, item: Any) -> None:
        """Takes one item of any kind; only Requests, TokenDeltas, Embeddings and RequestErrors count."""
        if not isinstance(item, (Request, TokenDelta, Embedding, RequestError)):
            return
        now = self.clock()
        self._started(now)
        self._last_time = now
        seen = self._in_flight.get(item.request_id)
        if seen is None:
            seen = self._in_flight[item.request_id] = RequestMetrics()
        if isinstance(item, Request):
            seen.arrival_time, seen.num_prompt_tokens = item.arrival_time, item.num_prompt_tokens
            self._started(item.arrival_time)
        elif isinstance(item, TokenDelta) and item.token_ids:
            seen.first_token_time = item.time if seen.first_token_time is None else seen.first_token_time
            seen.num_output_tokens += len(item.token_ids)
        if is_terminal(item):
            del self._in_flight[item.request_id]
            seen.finished_time = item.time
            self._finish(item, seen)

    def _finish(self, item: TokenDelta | Embedding | RequestError, seen: RequestMetrics) -> None:
        m = seen
        if item.metrics is not None:  # the engine's numbers win; ours fill only what it left unset
            m = item.metrics
            unset = {k: getattr(seen, k) for k in RequestMetrics.__struct_fields__ if _unset(getattr(m, k))}
            m = msgspec.structs.replace(m, **unset) if unset else m
        if m.arrival_time is not None:
            self._started(m.arrival_time)  # a sink after the engines sees a request first at its first token
        error_code = item.code if isinstance(item, RequestError) else None
        finish_reason = item.finish_reason if isinstance(item, TokenDelta) else None
        finish_reason = "embedding" if isinstance(item, Embedding) else finish_reason
        latencies = _latencies(m)
        if error_code is None:
            self._totals["completed"] += 1
            for name, value in zip(LATENCIES, latencies):
                if value is not None:
                    self._samples[name].append(value)
        else:
            self._errors[error_code] += 1
        self._totals.update(
            prompt_tokens=m.num_prompt_tokens, output_tokens=m.num_output_tokens, cached_tokens=m.num_cached_tokens
        )
        if m.slo_met is not None:
            self._totals["slo_checked"] += 1
            self._totals["slo_violations"] += int(not m.slo_met)
        if self.prometheus is not None:
            hit_rate = _ratio(self._totals["cached_tokens"], self._totals["prompt_tokens"])
            self.prometheus.record(
                m, latencies, finish_reason=finish_reason, error_code=error_code, cache_hit_rate=hit_rate
            )
        if not logs(logging.INFO):
            return
        timings_ms = {
            f"{name[:-2]}_ms": None if v is None else round(v * 1000.0, 3) for name, v in zip(LATENCIES, latencies)
        }
        _log.info(
            "request_finished",
            request_id=item.request_id,
            finish_reason=finish_reason,
            error=error_code,
            **timings_ms,
            prompt_tokens=m.num_prompt_tokens,
            output_tokens=m.num_output_tokens,
            cached_tokens=m.num_cached_tokens,
            slo_met=m.slo_met,
        )

    def _started(self, when: float) -> None:
        """The wall time rates are over starts at the first arrival seen, not at the first item to reach the sink."""
        self._first_time = when if self._first_time is None else min(self._first_time, when)

    def snapshot(self) -> MetricsSnapshot:
        t = self._totals
        failed = sum(self._errors.values())
        wall = 0.0 if self._first_time is None else self._last_time - self._first_time
        return MetricsSnapshot(
            total=t["completed"] + failed + len(self._in_flight),
            completed=t["completed"],
            failed=failed,
            active=len(self._in_flight),
            queue=LatencyStats.of(self._samples["queue_s"]),
            ttft=LatencyStats.of(self._samples["ttft_s"]),
            tpot=LatencyStats.of(self._samples["tpot_s"]),
            e2e=LatencyStats.of(self._samples["e2e_s"]),
            prompt_tokens=t["prompt_tokens"],
            output_tokens=t["output_tokens"],
            cached_tokens=t["cached_tokens"],
            wall_s=wall,
            output_tokens_per_s=_ratio(t["output_tokens"], wall),
            requests_per_s=_ratio(t["completed"], wall),
            slo_checked=t["slo_checked"],
            slo_violations=t["slo_violations"],
            slo_compliance=_ratio(t["slo_checked"] - t["slo_violations"], t["slo_checked"]),
            cache_hit_rate=_ratio(t["cached_tokens"], t["prompt_tokens"]),
            errors=dict(self._errors),
        )


def _unset(value: object) -> bool:
    """A timing of None or a token count of 0 (RequestMetrics' defaults); `slo_met=False` is a value, not unset."""
    return value is None or (type(value) is int and value == 0)


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def render_metrics_table(s: MetricsSnapshot) -> Table:
    """The end-of-run summary the CLI prints."""
    from rich.table import Table

    def num(value: float | None, fmt: str = ".1f") -> str:
        return "-" if value is None else format(value, fmt)

    table = Table("metric", "value", title="pipeline metrics")
    table.add_row("requests", f"{s.total} total, {s.completed} completed, {s.failed} failed, {s.active} active")
    for label, stats in (("queue ms", s.queue), ("TTFT ms", s.ttft), ("TPOT ms", s.tpot), ("e2e ms", s.e2e)):
        values = (stats.avg_ms, stats.p50_ms, stats.p95_ms, stats.p99_ms)
        table.add_row(label, "  ".join(f"{k} {num(v)}" for k, v in zip(("avg", "p50", "p95", "p99"), values)))
    table.add_row("tokens", f"{s.prompt_tokens} prompt ({s.cached_tokens} cached), {s.output_tokens} output")
    table.add_row("throughput", f"{num(s.output_tokens_per_s)} output tok/s, {num(s.requests_per_s, '.2f')} req/s")
    table.add_row("wall s", num(s.wall_s, ".2f"))
    table.add_row("SLO", f"{s.slo_violations}/{s.slo_checked} violated, compliance {num(s.slo_compliance, '.1%')}")
    table.add_row("prefix cache hit rate", num(s.cache_hit_rate, ".1%"))
    table.add_row("errors", ", ".join(f"{code} {n}" for code, n in sorted(s.errors.items())) or "-")
    return table
