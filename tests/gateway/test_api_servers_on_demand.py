"""Models on demand and sleep mode behind an API server (`sagellm serve --api-servers 1 --model NAME=MODEL ...`):
requests answered by the API server process load their model in the core first (their replies the offline API's,
the model's status through `/v1/models`), one loaded at a time; a model that cannot load is a 503 naming it, an
unknown one a 404, none named a 400; and a request of a graph whose engines sleep wakes them and is answered as
before."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from sagellm import LLM, SamplingParams
from sagellm.gateway.config import FailoverPolicy, ModelsOnDemand
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config
from tests.tiny_models import make_tiny_llama

pytestmark = pytest.mark.slow  # engine processes started and stopped
ENGINE = {"max_num_seqs": 4, "kv_cache_memory_gb": 0.05}
PROMPT = "Count: one,"


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> dict[str, str]:
    other = make_tiny_llama(tmp_path_factory.mktemp("other") / "llama", seed=7)
    broken = tmp_path_factory.mktemp("broken")
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    return {"tiny": str(tiny_model), "other": str(other), "broken": str(broken)}


@pytest.fixture(scope="module")
def gateway(models, tmp_path_factory):
    on_demand = ModelsOnDemand(models, engine=ENGINE, max_loaded=1)
    config = tiny_config(tmp_path_factory.mktemp("on-demand"), models_on_demand=on_demand,
                         failover=FailoverPolicy(retry_wait_s=120))  # fmt: skip
    with running_gateway(GRAPHS / "control_plane.yaml", config, api_servers=1) as gw:
        yield gw


def _statuses(url: str) -> dict[str, str]:
    cards = httpx.get(url + "/v1/models").json()["data"]
    return {card["id"]: card["status"]["value"] for card in cards if "status" in card}


def _offline(model: str, max_tokens: int) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return LLM(model).generate([PROMPT], params)[0].outputs[0].text


def test_requests_through_the_api_server_load_their_model_one_at_a_time(gateway, models):
    hub = gateway.gateway.hub
    assert hub is not None and len(hub.serving) == 1
    assert _statuses(gateway.url) == {"tiny": "unloaded", "other": "unloaded", "broken": "unloaded"}
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0, timeout=REPLY_TIMEOUT_S)
    expected = {name: _offline(models[name], 12) for name in ("tiny", "other")}
    for name in ("tiny", "other", "tiny"):
        reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
        assert reply.choices[0].text == expected[name] and reply.model == name
        assert _statuses(gateway.url) == {"tiny": "unloaded", "other": "unloaded", "broken": "unloaded", name: "loaded"}
    streamed = client.completions.create(model="other", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})  # fmt: skip
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected["other"]
    assert sum(hub.submitted.values()) == 4  # every one came through the API server


def test_a_request_the_api_server_refuses_after_its_model_was_made_ready_holds_it_busy_no_longer(gateway):
    """The API server asked the core to make the model serve, which holds it busy for the request announced; the
    request refused before it was sent on (echo: the graph's own model only) tells the core, which lets it go."""
    echo = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "echo": True}
    assert httpx.post(gateway.url + "/v1/completions", json=echo, timeout=REPLY_TIMEOUT_S).status_code == 400
    deadline = time.monotonic() + 10  # (the API server's message crosses to the core)
    while gateway.call(gateway.core.readiness.requests_of, "tiny"):
        assert time.monotonic() < deadline, "the core still holds the model for a request that never came"
        time.sleep(0.02)


def test_the_api_server_says_why_a_model_is_not_served(gateway):
    body = {"prompt": PROMPT, "max_tokens": 2}
    broken = httpx.post(gateway.url + "/v1/completions", json={**body, "model": "broken"}, timeout=REPLY_TIMEOUT_S)
    assert broken.status_code == 503 and "'broken' failed to load" in broken.json()["error"]["message"]
    assert "retry-after" in broken.headers
    unknown = httpx.post(gateway.url + "/v1/completions", json={**body, "model": "nope"}, timeout=30)
    assert unknown.status_code == 404 and "'nope'" in unknown.json()["error"]["message"]
    unnamed = httpx.post(gateway.url + "/v1/completions", json=body, timeout=30)
    assert unnamed.status_code == 400 and "name the model" in unnamed.json()["error"]["message"]
    assert _statuses(gateway.url)["broken"] == "failed"


def test_a_request_through_the_api_server_wakes_the_sleeping_engines(tiny_model, tmp_path):
    with running_gateway(GRAPHS / "colocated.yaml", tiny_config(tmp_path), model=tiny_model, api_servers=1) as gw:
        headers = {"authorization": f"Bearer {gw.gateway.admin_key}"}
        body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        before = httpx.post(gw.url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S).json()
        for level in (1, 2):
            asleep = httpx.post(f"{gw.url}/sleep?level={level}", headers=headers, timeout=REPLY_TIMEOUT_S)
            assert asleep.json() == {"is_sleeping": True, "level": level}
            after = httpx.post(gw.url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S).json()
            assert after["choices"][0]["text"] == before["choices"][0]["text"]
            awake = httpx.get(gw.url + "/is_sleeping", headers=headers, timeout=30).json()
            assert awake == {"is_sleeping": False, "level": 0}
        assert sum(gw.gateway.hub.submitted.values()) == 3
