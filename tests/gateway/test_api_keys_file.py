"""API keys with policies (`--api-keys-file`) through a gateway with two API server processes in front of its core:
each key's requests per minute, tokens per minute and requests in flight hold whichever API server its requests
reach (the 429s carry Retry-After and OpenAI's x-ratelimit headers, and the openai SDK reads them as its
RateLimitError); a key's models are the only ones it sees and uses; its max_tokens bounds its requests' completions;
its cache salt keeps its prefix cache its own; its use shows in /metrics and /v1/management/usage; the file read
again as it changes reaches the API servers (a new key works, a dropped one is refused), and a wrong file changes
nothing."""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from sagellm.gateway.http.auth import owner_of
from sagellm.gateway.keys.tenants import Tenants
from sagellm.runtime.pipeline.messages import Request
from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config

pytestmark = pytest.mark.slow

KEYS_FILE = """
keys:
  - {name: per-minute, key: sk-per-minute, requests_per_minute: 12}
  - {name: one-at-a-time, key: sk-one-at-a-time, max_concurrent: 1}
  - {name: few-tokens, key: sk-few-tokens, tokens_per_minute: 60}
  - {name: narrow, key: sk-narrow-key, models: ["other-*"]}
  - {name: capped, key: sk-capped-key, max_tokens: 3}
  - {name: salted-a, key: sk-salted-a, cache_salt: team-a}
  - {name: salted-b, key_sha256: SALTED_B_DIGEST, cache_salt: team-b}
  - {name: plain, key: sk-plain-key}
""".replace("SALTED_B_DIGEST", hashlib.sha256(b"sk-salted-b").hexdigest())
# Several full KV blocks of the tiny model's (16 tokens each), a prompt no other test sends
PROMPT = "Keys of their own: " + " ".join(f"tenant {i} holds {i * 3 % 7};" for i in range(6))


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    keys_file = tmp / "keys.yaml"
    keys_file.write_text(KEYS_FILE)
    config = tiny_config(tmp, api_keys_file=keys_file)
    with running_gateway(GRAPHS / "colocated.yaml", config, model=tiny_model, api_servers=2) as gw:
        gw.keys_file = keys_file
        yield gw


def completion(gateway, key: str, **fields) -> httpx.Response:
    """A completion on a new connection (which the kernel gives either API server)."""
    body = {"model": gateway.core.model_name, "prompt": "Hello", "max_tokens": 1, "temperature": 0, **fields}
    with httpx.Client(timeout=REPLY_TIMEOUT_S) as client:
        return client.post(gateway.url + "/v1/completions", json=body, headers={"authorization": f"Bearer {key}"})


def usage(gateway) -> dict:
    headers = {"authorization": f"Bearer {gateway.gateway.admin_key}"}
    return httpx.get(gateway.url + "/v1/management/usage", headers=headers, timeout=30).json()["keys"]


def test_a_keys_requests_per_minute_hold_across_both_api_servers_and_the_429_says_the_limit(gateway):
    hub = gateway.gateway.hub
    before = dict(hub.submitted)
    replies = [completion(gateway, "sk-per-minute") for _ in range(18)]
    assert [r.status_code for r in replies] == [200] * 12 + [429] * 6
    refused = replies[-1]
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "rate_limit_error"
    assert "'per-minute'" in error["message"] and "requests per minute" in error["message"]
    assert refused.headers["x-ratelimit-limit-requests"] == "12"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    # the twelve let in came through both API servers (all through one: one chance in 2048)
    assert len([pid for pid, count in hub.submitted.items() if count > before.get(pid, 0)]) == 2
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-per-minute", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        sdk.completions.create(model=gateway.core.model_name, prompt="Hello", max_tokens=1)
    seen = usage(gateway)["per-minute"]
    assert seen["requests"] == 12 and seen["rate_limited"] == {"requests": 7} and seen["last_minute"]["requests"] == 12
    assert seen["limits"] == {"requests_per_minute": 12}
    metrics = httpx.get(gateway.url + "/metrics", timeout=30).text
    assert 'sagellm:key_requests_total{key="per-minute"} 12.0' in metrics
    assert 'sagellm:key_rate_limited_total{key="per-minute",limit="requests"} 7.0' in metrics


def test_a_key_with_one_request_in_flight_waits_for_it_to_end(gateway):
    """Eight arrivals at once, each of 100 tokens: while one runs, the others are refused."""
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: completion(gateway, "sk-one-at-a-time", max_tokens=100, min_tokens=100,
                                                     ignore_eos=True), range(8)))  # fmt: skip
    statuses = sorted(r.status_code for r in replies)
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["x-ratelimit-limit-concurrent"] == "1" and "in flight" in refused.json()["error"]["message"]
    assert usage(gateway)["one-at-a-time"]["running"] == 0
    assert completion(gateway, "sk-one-at-a-time").status_code == 200


def test_a_keys_tokens_per_minute_count_prompt_and_completion(gateway):
    first = completion(gateway, "sk-few-tokens", max_tokens=40, min_tokens=40, ignore_eos=True)
    assert first.status_code == 200
    spent = first.json()["usage"]["total_tokens"]
    assert usage(gateway)["few-tokens"]["last_minute"]["tokens"] == spent
    refused = completion(gateway, "sk-few-tokens", prompt="Hello " * 30)  # over what the minute has left
    assert refused.status_code == 429 and refused.headers["x-ratelimit-limit-tokens"] == "60"
    assert refused.headers["x-ratelimit-remaining-tokens"] == str(60 - spent)


def test_a_key_sees_and_uses_only_its_models(gateway):
    headers = {"authorization": "Bearer sk-narrow-key"}
    listed = httpx.get(gateway.url + "/v1/models", headers=headers, timeout=30).json()["data"]
    assert listed == []
    refused = completion(gateway, "sk-narrow-key")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    assert refused.json()["error"]["param"] == "model"
    plain = httpx.get(gateway.url + "/v1/models", headers={"authorization": "Bearer sk-plain-key"}, timeout=30)
    assert [card["id"] for card in plain.json()["data"]] == [gateway.core.model_name]


def test_a_keys_max_tokens_bounds_its_requests(gateway):
    for asked in (10, None):  # more than the key's, and the completions' default (16)
        reply = completion(gateway, "sk-capped-key", max_tokens=asked, min_tokens=5, ignore_eos=True)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"
    assert completion(gateway, "sk-capped-key", max_tokens=2, ignore_eos=True).json()["usage"]["completion_tokens"] == 2


def test_a_keys_cache_salt_keeps_its_prefix_cache_its_own(gateway):
    def cached(key: str) -> int:
        reply = completion(gateway, key, prompt=PROMPT)
        assert reply.status_code == 200, reply.text
        return reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached("sk-plain-key") == 0
    assert cached("sk-plain-key") > 0
    assert cached("sk-salted-a") == 0  # the same prompt, under team-a's salt
    assert cached("sk-salted-a") > 0
    assert cached("sk-salted-b") == 0  # team-b's (a key the file names by its digest) shares nothing with team-a's


def test_the_keys_file_read_again_reaches_the_api_servers_and_a_wrong_one_changes_nothing(gateway):
    keys_file: Path = gateway.keys_file
    assert completion(gateway, "sk-newcomer").status_code == 401
    keys_file.write_text(KEYS_FILE.replace("name: plain, key: sk-plain-key", "name: newcomer, key: sk-newcomer"))
    assert _eventually(lambda: completion(gateway, "sk-newcomer").status_code == 200)
    assert _eventually(lambda: completion(gateway, "sk-plain-key").status_code == 401)
    keys_file.write_text("keys: [{name: broken, requests_per_minute: -1}]\n")
    time.sleep(2.5)  # two checks of the file
    assert completion(gateway, "sk-newcomer").status_code == 200


def _eventually(check, timeout_s: float = 15) -> bool:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_keys_class_is_the_highest_its_requests_run_at(tmp_path):
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("keys: [{name: batchy, key: sk-batchy-key, priority: low}]\n")
    tenants = Tenants([], keys_file)
    owner = owner_of("sk-batchy-key")
    asked_high = Request(request_id="a", prompt="x", owner=owner, priority=0)
    asked_lower = Request(request_id="b", prompt="x", owner=owner, priority=5)
    tenants.admit([asked_high], "m")
    tenants.admit([asked_lower], "m")
    assert (asked_high.priority, asked_lower.priority) == (2, 5)


def test_a_batch_runs_within_its_keys_limits_rather_than_failing_on_them(gateway):
    """Four lines of a key that may have one request in flight: the Batch API sends them together, the key's limit
    refuses all but one, and each refused line goes again after its Retry-After: all four answered."""
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-one-at-a-time", max_retries=0, timeout=60)
    body = {"model": gateway.core.model_name, "prompt": "Hello", "max_tokens": 20, "min_tokens": 20,
            "ignore_eos": True}  # fmt: skip
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions", "body": body} for i in range(4)]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    file_id = sdk.files.create(file=("batch.jsonl", data), purpose="batch").id
    batch = sdk.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    assert _eventually(lambda: sdk.batches.retrieve(batch.id).status == "completed", timeout_s=60)
    done = sdk.batches.retrieve(batch.id)
    assert (done.request_counts.completed, done.request_counts.failed) == (4, 0)
    results = [json.loads(line) for line in sdk.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in results) == [f"line-{i}" for i in range(4)]
    assert {r["response"]["status_code"] for r in results} == {200}
    assert usage(gateway)["one-at-a-time"]["rate_limited"]["concurrent"] >= 1
