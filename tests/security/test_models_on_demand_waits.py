"""Issue 62, item 4, replayed: with `--max-loaded-models 1`, requests for model b made while model a loads used to get
an immediate 503 (`1 of 1 models are loading`), and each refusal counted as a load (`model_loads_total{outcome=
"unloaded"}`). Now they wait their turn, up to `--retry-wait`, and are served; the load counter counts the two
loads alone, and no request is refused. Served through an API server (`--api-servers 1`), whose requests ask the core
to make their model ready (`ModelReady`) as the gateway's own routes do."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sagellm.gateway.config import FailoverPolicy, ModelsOnDemand
from sagellm.gateway.server import GatewayThread
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # two engine processes started, one stopped

WAITING = 8


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    tmp = tmp_path_factory.mktemp("on-demand-waits")
    models = {"a": str(make_tiny_llama(tmp / "a")), "b": str(make_tiny_llama(tmp / "b", seed=1))}
    on_demand = ModelsOnDemand(models, engine={"max_num_seqs": 8, "kv_cache_memory_gb": 0.05}, max_loaded=1)
    config = tiny_config(tmp, models_on_demand=on_demand, failover=FailoverPolicy(retry_wait_s=120))
    with running_gateway(GRAPHS / "control_plane.yaml", config, api_servers=1) as gw:
        yield gw


def _complete(url: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "x", "max_tokens": 4, "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S * 3)


def _status(url: str, model: str) -> dict:
    return next(card["status"] for card in httpx.get(url + "/v1/models").json()["data"] if card["id"] == model)


def test_requests_for_a_model_made_while_another_loads_wait_their_turn_and_are_served(gateway):
    with ThreadPoolExecutor(1 + WAITING) as threads:
        first = threads.submit(_complete, gateway.url, "a")
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while _status(gateway.url, "a") != {"value": "loading"}:
            assert time.monotonic() < deadline and not first.done(), "a never read loading"
            time.sleep(0.01)
        waiting = [threads.submit(_complete, gateway.url, "b") for _ in range(WAITING)]
        replies = [first.result()] + [w.result() for w in waiting]
    assert [r.status_code for r in replies] == [200] * (1 + WAITING), [r.text for r in replies if r.status_code != 200]
    pool = gateway.gateway.models
    assert pool is not None
    assert dict(pool.loads) == {("a", "loaded"): 1, ("b", "loaded"): 1}  # loads, not refusals
    assert not pool.lines.refusals and pool.lines.waits["b"] == WAITING
