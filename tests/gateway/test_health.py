"""What /health and /ready say: whether some healthy engine can still run a request whole."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from sagellm.gateway.control.admin_routes import EngineGauges, service_status
from sagellm.runtime.pipeline.operator import InstanceStats


def pd(prefill_healthy: bool, decode_healthy: bool) -> list[InstanceStats]:
    return [
        InstanceStats("prefill", role="prefill", healthy=prefill_healthy),
        InstanceStats("decode", role="decode", healthy=decode_healthy),
    ]


def test_a_lost_prefill_worker_degrades_a_pd_graph_and_a_lost_decode_worker_stops_it() -> None:
    assert service_status(pd(True, True)) == "ok"
    assert service_status(pd(False, True)) == "degraded"  # pd_split keeps requests colocated on the decode worker
    assert service_status(pd(True, False)) == "unavailable"  # nothing can produce the tokens after the first
    assert service_status([]) == "unavailable"
    engines = [InstanceStats("a"), InstanceStats("b", healthy=False)]
    assert service_status(engines) == "degraded" and service_status(engines[1:]) == "unavailable"


def test_a_lost_engine_reports_no_load_any_more() -> None:
    stats = InstanceStats("e", running=10, waiting=3, queued_prefill_tokens=500, queued_decode_tokens=900)
    stats.kv_cache_usage = 0.7
    stats.lose()
    assert not stats.healthy and (stats.running, stats.waiting, stats.predicted_work, stats.kv_cache_usage) == (0,) * 4


def test_the_running_gauge_counts_what_the_engine_computes_not_what_waits_in_it() -> None:
    class Core:  # the part of the serving core the collector reads
        class registry:
            @staticmethod
            def instances() -> dict[str, InstanceStats]:
                return {"e": InstanceStats("e", running=17, waiting=4)}

        retries: dict = {}
        in_flight = 17

        @staticmethod
        def nodes_of(kind: str) -> dict:
            return {}

    registry = CollectorRegistry()
    registry.register(EngineGauges(Core()))
    text = generate_latest(registry).decode()
    assert 'sagellm:num_requests_running{engine="e"} 13.0' in text
    assert 'sagellm:num_requests_waiting{engine="e"} 4.0' in text
