"""Sleep mode (vLLM's `/sleep`, `/wake_up`, `/is_sleeping`) on SmolLM2 served colocated, its KV cache mapped whole
at start: level 1 gives the cache's memory back and level 2 the weights too (this process's RSS measured: the
engine runs in it), a request while asleep wakes the engine and gets the same greedy reply as before (after level 1
too, whose prefix cache is forgotten with the cache: the same prompt again reads no zeroed blocks), a sleep waits
for the stream in flight, a wake-up by tags loads the weights before the cache, and what is not served is refused
by name. Served through the PD graph, the prefill and decode workers sleep and wake alike (their processes' RSS
measured), by tags too."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from sagellm.common.memory import resident_bytes
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.network]

KV_GB = 0.25
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def gateway(smollm2_dir, tmp_path_factory):
    overrides = {"engine.kv_cache_memory_gb": KV_GB, "engine.max_num_seqs": 4, "engine.prefault_kv_cache": True,
                 "engine.enable_prefix_caching": True}  # fmt: skip
    config = tiny_config(tmp_path_factory.mktemp("sleep"))
    with running_gateway(GRAPHS / "colocated.yaml", config, smollm2_dir, **overrides) as gw:
        yield gw


@pytest.fixture(scope="module")
def admin(gateway) -> httpx.Client:
    headers = {"authorization": f"Bearer {gateway.gateway.admin_key}"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=REPLY_TIMEOUT_S * 2) as client:
        yield client


def _greedy(url: str, max_tokens: int = 12) -> str:
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S * 2)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def _settled_rss(pid: int | str = "self") -> int:
    """A process's resident memory (this one's by default) once the prefault thread has mapped what it maps."""
    time.sleep(1.0)
    return resident_bytes(pid=pid) or 0


def test_level_1_frees_the_kv_cache_and_a_request_wakes_the_engine_with_the_same_reply(gateway, admin):
    before = _greedy(gateway.url)
    assert _greedy(gateway.url) == before  # its prompt is in the prefix cache now
    awake = _settled_rss()
    assert admin.post("/sleep", params={"level": 1}).json() == {"is_sleeping": True, "level": 1}
    asleep = _settled_rss()
    assert awake - asleep > 0.8 * KV_GB * 2**30, (awake, asleep)  # the whole cache's pages went back
    assert admin.get("/is_sleeping").json() == {"is_sleeping": True, "level": 1}
    assert _greedy(gateway.url) == before  # woken by the request; the forgotten prefix is computed again
    assert admin.get("/is_sleeping").json() == {"is_sleeping": False, "level": 0}


def test_level_2_frees_the_weights_too_and_wake_up_loads_them_again(gateway, admin):
    before = _greedy(gateway.url)
    awake = _settled_rss()
    assert admin.post("/sleep", params={"level": 2}).json() == {"is_sleeping": True, "level": 2}
    asleep = _settled_rss()
    assert awake - asleep > KV_GB * 2**30 + 50 * 2**20, (awake, asleep)  # the cache and the weights
    assert admin.post("/wake_up").json() == {"is_sleeping": False, "level": 0}
    assert _greedy(gateway.url) == before


def test_wake_up_with_tags_loads_the_weights_first_and_the_kv_cache_after(gateway, admin):
    before = _greedy(gateway.url)
    assert admin.post("/sleep", params={"level": 2}).json() == {"is_sleeping": True, "level": 2}
    asleep = _settled_rss()
    early = admin.post("/wake_up", params={"tags": "kv_cache"})  # no cache without its weights
    assert early.status_code == 400 and "tags=weights" in early.json()["error"]["message"]
    weights = admin.post("/wake_up", params={"tags": "weights"})
    assert weights.json() == {"is_sleeping": True, "level": 1}  # vLLM's: still asleep, its cache freed
    loaded = _settled_rss()
    assert 50 * 2**20 < loaded - asleep < KV_GB * 2**30, (asleep, loaded)  # the weights back, not the cache
    assert admin.post("/wake_up", params={"tags": "kv_cache"}).json() == {"is_sleeping": False, "level": 0}
    assert _greedy(gateway.url) == before


def test_a_sleep_waits_for_the_stream_in_flight_which_runs_to_its_last_token(gateway, admin):
    body = {"prompt": PROMPT, "max_tokens": 96, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip

    def stream() -> int:
        tokens = 0
        with httpx.stream("POST", gateway.url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S) as reply:
            for line in reply.iter_lines():
                if '"usage":{' in line and '"completion_tokens"' in line:
                    tokens = httpx.Response(200, content=line[6:]).json()["usage"]["completion_tokens"]
        return tokens

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(stream)
        time.sleep(0.3)
        assert admin.post("/sleep", params={"level": 1}).status_code == 200
        assert running.done() and running.result() == 96  # the sleep came after its last token
    assert admin.post("/wake_up").status_code == 200


def test_what_sleep_mode_does_not_serve_is_refused_by_name(gateway, admin):
    assert httpx.post(gateway.url + "/sleep").status_code == 401  # admin only
    bad = admin.post("/sleep", params={"level": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "level"
    tags = admin.post("/wake_up", params={"tags": "weights,optimizer"})
    assert tags.status_code == 400 and "optimizer is not weights or kv_cache" in tags.json()["error"]["message"]


def test_the_prefill_and_decode_workers_of_a_pd_graph_sleep_and_wake_with_the_same_reply(smollm2_dir, tmp_path):
    overrides = {f"{node}.{name}": value for node in ("prefill", "decode") for name, value in
                 {"kv_cache_memory_gb": KV_GB, "max_num_seqs": 4, "prefault_kv_cache": True}.items()}  # fmt: skip
    with running_gateway(GRAPHS / "pd.yaml", tiny_config(tmp_path), smollm2_dir, **overrides) as gw:
        workers = gw.core.executor.pids
        headers = {"authorization": f"Bearer {gw.gateway.admin_key}"}
        with httpx.Client(base_url=gw.url, headers=headers, timeout=REPLY_TIMEOUT_S * 2) as admin:
            before = _greedy(gw.url)
            awake = {group: _settled_rss(pid) for group, pid in workers.items()}
            assert admin.post("/sleep", params={"level": 1}).json() == {"is_sleeping": True, "level": 1}
            asleep = {group: _settled_rss(pid) for group, pid in workers.items()}
            for group in ("prefill", "decode"):  # each worker gave its whole cache back
                assert awake[group] - asleep[group] > 0.8 * KV_GB * 2**30, (group, awake, asleep)
            assert _greedy(gw.url) == before  # woken by the request
            assert admin.get("/is_sleeping").json() == {"is_sleeping": False, "level": 0}
            assert admin.post("/sleep", params={"level": 2}).json() == {"is_sleeping": True, "level": 2}
            weights = admin.post("/wake_up", params={"tags": "weights"})
            assert weights.json() == {"is_sleeping": True, "level": 1}
            assert admin.post("/wake_up").json() == {"is_sleeping": False, "level": 0}
            assert _greedy(gw.url) == before
