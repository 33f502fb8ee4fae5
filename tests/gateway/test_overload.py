"""Load shedding reaches HTTP clients as OpenAI's 429 with `Retry-After`, and the gateway keeps serving."""

from __future__ import annotations

import httpx
import openai

from tests.gateway.conftest import GRAPHS, REPLY_TIMEOUT_S, running_gateway, tiny_config


def test_a_full_admission_queue_answers_429_with_retry_after(tiny_model, tmp_path):
    config = tiny_config(tmp_path)
    with running_gateway(GRAPHS / "colocated.yaml", config, model=tiny_model, **{"admission.max_queue": 1}) as gw:
        body = {"prompt": "Hello", "max_tokens": 240, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", gw.url + "/v1/completions", json=body, timeout=REPLY_TIMEOUT_S) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # kept: a dropped line iterator closes the response (a disconnect)
            next(lines)  # the first request is in flight: the queue of one is full
            second = httpx.post(gw.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert second.status_code == 429 and second.headers["retry-after"] == "1"
            assert second.json()["error"]["code"] == "overloaded"
            assert second.json()["error"]["type"] == "rate_limit_error"
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=3)
        assert client.completions.create(model=gw.core.model_name, prompt="Hi", max_tokens=2).choices
