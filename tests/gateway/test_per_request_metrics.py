"""vLLM's per-request `metrics` (`--enable-per-request-metrics`), read with the openai SDK as vLLM's docs read them
(`model_extra["metrics"]`), through an API server process: a chat's, a completion's, a streamed chat's usage chunk
and a response's timings, consistent with each other and with the tokens; none for n > 1."""

from __future__ import annotations

import openai
import pytest

from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config

pytestmark = pytest.mark.slow
FIELDS = {"time_to_first_token_ms", "generation_time_ms", "queue_time_ms", "mean_itl_ms", "tokens_per_second"}
CHAT = [{"role": "user", "content": "Count to ten."}]


@pytest.fixture(scope="module")
def sdk(tiny_model, tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("metrics"), per_request_metrics=True)
    with running_gateway(GRAPHS / "colocated.yaml", config, model=tiny_model, api_servers=1) as gw:
        yield openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0), gw.core.model_name


def _check(metrics: dict, tokens: int) -> None:
    assert set(metrics) == FIELDS
    assert metrics["time_to_first_token_ms"] > 0 and metrics["queue_time_ms"] >= 0
    assert metrics["generation_time_ms"] > 0
    assert metrics["mean_itl_ms"] == pytest.approx(metrics["generation_time_ms"] / (tokens - 1), abs=0.01)
    inference_ms = metrics["time_to_first_token_ms"] + metrics["generation_time_ms"]
    assert metrics["tokens_per_second"] == pytest.approx(tokens / inference_ms * 1000, rel=0.01)


def test_each_reply_of_one_generation_carries_its_metrics(sdk):
    client, model = sdk
    tokens = {"max_tokens": 12, "extra_body": {"min_tokens": 12, "ignore_eos": True}}
    chat = client.chat.completions.create(model=model, messages=CHAT, **tokens)
    _check(chat.model_extra["metrics"], chat.usage.completion_tokens)
    completion = client.completions.create(model=model, prompt="Hello", **tokens)
    _check(completion.model_extra["metrics"], 12)
    stream = client.chat.completions.create(model=model, messages=CHAT, stream=True,
                                            stream_options={"include_usage": True}, **tokens)  # fmt: skip
    last = list(stream)[-1]
    assert last.usage.completion_tokens == 12
    _check(last.model_extra["metrics"], 12)
    response = client.responses.create(model=model, input="Count to ten.", max_output_tokens=12,
                                       extra_body={"min_tokens": 12, "ignore_eos": True})  # fmt: skip
    _check(response.model_extra["metrics"], response.usage.output_tokens)


def test_several_choices_have_no_metrics_of_one(sdk):
    client, model = sdk
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, n=2)
    assert chat.model_extra["metrics"] is None
