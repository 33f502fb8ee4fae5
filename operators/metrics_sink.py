"""Measures the replies flowing past it and hands every item on unchanged, so it sits just before the real sink.

The aggregation lives in `sagellm.runtime.pipeline.metrics.MetricsCollector` (the gateway reuses it); this
operator is its place in a graph. Its numbers are read in the process that runs the node: the CLI's end-of-run
table calls `get_metrics()`, and `prometheus.registry` is what a `/metrics` endpoint exposes."""

from __future__ import annotations

from typing import Any, ClassVar

from sagellm.runtime.pipeline.messages import Embedding, Request, RequestError, TokenDelta
from sagellm.runtime.pipeline.metrics import MetricsCollector, MetricsSnapshot, PipelineMetrics
from sagellm.runtime.pipeline.operator import MapOperator, register_operator


@register_operator
class MetricsSink(MapOperator):
    """Records each request's timings, tokens, SLO outcome and errors; passes every item through."""

    name = "metrics_sink"
    # Requests too: their arrival and prompt size back up timings.
    accepts = (Request, TokenDelta, Embedding, RequestError)
    parameter_help: ClassVar[dict[str, str]] = {"window": "latency samples kept: the last this many requests'"}

    def __init__(self, window: int = 100_000) -> None:
        self.prometheus = PipelineMetrics()
        self.collector = MetricsCollector(prometheus=self.prometheus, window=window)

    def execute(self, item: Any) -> Any:
        self.collector.observe(item)
        return item

    def get_metrics(self) -> MetricsSnapshot:
        return self.collector.snapshot()
