"""What /health and /ready say: whether some healthy engine can still run a request whole."""

from __future__ import annotations

from sagellm.gateway.control.admin_routes import service_status
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
