"""Each API key's use in /metrics, by its name (never the key): requests, tokens, those in flight and the requests
its limits refused, as LiteLLM's proxy labels spend by key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sagellm.gateway.keys.tenants import Tenants


class KeyUsageMetrics:
    """A Prometheus collector over `Tenants.use`, read at each scrape."""

    def __init__(self, tenants: Tenants) -> None:
        self.tenants = tenants

    def collect(self) -> Iterator[Any]:
        requests = CounterMetricFamily("sagellm:key_requests", "Requests a key sent that were let in.", labels=["key"])
        prompt = CounterMetricFamily("sagellm:key_prompt_tokens", "Prompt tokens of a key's requests.", labels=["key"])
        completion = CounterMetricFamily(
            "sagellm:key_generation_tokens", "Tokens generated for a key's requests.", labels=["key"]
        )
        running = GaugeMetricFamily("sagellm:key_requests_running", "A key's requests in flight.", labels=["key"])
        refused = CounterMetricFamily(
            "sagellm:key_rate_limited", "A key's requests refused by one of its limits (429).", labels=["key", "limit"]
        )
        for name, use in self.tenants.use.items():
            requests.add_metric([name], use.requests_total)
            prompt.add_metric([name], use.prompt_tokens_total)
            completion.add_metric([name], use.completion_tokens_total)
            running.add_metric([name], use.running)
            for limit, count in use.refused_total.items():
                refused.add_metric([name, limit], count)
        yield from (requests, prompt, completion, running, refused)
