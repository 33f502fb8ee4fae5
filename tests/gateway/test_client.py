"""`UnifiedInferenceClient` in its three modes against real gateways: found locally, at a given URL, and embedded."""

from __future__ import annotations

import pytest
import trio

from sagellm import SamplingParams, UnifiedInferenceClient
from sagellm.client import BadRequestError, GatewayNotFoundError, NotFoundError
from sagellm.gateway.state import GatewayRecord, write_record
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config

KEY = "sk-client"
CHAT = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("client"), api_keys=[KEY])
    with running_gateway(GRAPHS / "colocated.yaml", config, model=tiny_model) as gw:
        yield gw


def expected_reply(tiny_model) -> str:
    from sagellm import LLM

    return LLM(str(tiny_model)).chat(CHAT, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text


def test_url_mode_sync_and_async_calls_and_typed_errors(gateway, tiny_model):
    with UnifiedInferenceClient.create(control_plane_url=gateway.url, api_key=KEY) as client:
        reply = client.chat(CHAT, temperature=0, max_tokens=8)
        assert reply == expected_reply(tiny_model)
        assert "".join(client.stream_chat(CHAT, temperature=0, max_tokens=8)) == reply
        assert isinstance(client.generate("Once upon a time", max_tokens=4), str)
        with pytest.raises(BadRequestError) as raised:
            client.chat(CHAT, temperature=-1)
        assert raised.value.param == "temperature" and raised.value.status == 400
        with pytest.raises(NotFoundError):
            client.embed(["no embedding model here"])
    with UnifiedInferenceClient.create(control_plane_url=gateway.url + "/v1/", api_key=KEY) as client:
        assert client.chat(CHAT, temperature=0, max_tokens=8) == reply  # the URL OpenAI clients are given works too

        async def both() -> tuple[str, str]:
            text = await client.achat(CHAT, temperature=0, max_tokens=8)
            streamed = "".join([t async for t in client.astream_chat(CHAT, temperature=0, max_tokens=8)])
            return text, streamed

        assert trio.run(both) == (reply, reply)


def test_local_mode_finds_the_recorded_gateway_or_says_how_to_start_one(gateway, tmp_path):
    write_record(tmp_path, GatewayRecord(url=gateway.url, pid=0, started_at=0.0, log=""))
    with UnifiedInferenceClient.create(state_dir=tmp_path, api_key=KEY) as client:
        assert client.base_url == gateway.url and client.chat("Hi", max_tokens=2)
    write_record(tmp_path, GatewayRecord(url="http://127.0.0.1:9", pid=0, started_at=0.0, log=""))
    with pytest.raises(GatewayNotFoundError, match="sagellm gateway start"):
        UnifiedInferenceClient.create(state_dir=tmp_path)


@pytest.mark.slow
def test_embedded_mode_runs_the_pipeline_in_process(tiny_model, tmp_path):
    with UnifiedInferenceClient.create(embedded=True, model=str(tiny_model), embedding_model=None) as client:
        assert client.base_url.startswith("http://127.0.0.1:")
        assert client.chat(CHAT, temperature=0, max_tokens=8) == expected_reply(tiny_model)
        embedded = client._embedded
    assert not embedded.running.thread.is_alive()  # close() stopped the in-process gateway
