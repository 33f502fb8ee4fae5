"""A completion or chat that names the embedding model (Open WebUI offers it in its model picker, beside the models
that write text) is a 400 naming `model` on every generation route, in each API's error shape, pointing at
/v1/embeddings: not a 500 from the embedding node. Each is sent by the client that sends it (the openai SDK's
chats, streamed too, completions and responses; the anthropic SDK's messages); the embedding model still embeds."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from tests.embedding.conftest import make_tiny_bert, write_sentence_transformers_files
from tests.gateway.conftest import GRAPHS, running_gateway, sdk_client, tiny_config

pytestmark = pytest.mark.slow

EMBEDDER = "tiny-st"  # the served name of the embedding model below (its directory's name)
ASK = [{"role": "user", "content": "Hello?"}]


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    bert = write_sentence_transformers_files(make_tiny_bert(tmp_path_factory.mktemp("bert") / EMBEDDER))
    config = tiny_config(tmp_path_factory.mktemp("embed"), embedding_model=str(bert))
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as gw:
        yield gw


def _openai_requests() -> dict[str, Callable[[openai.OpenAI], Any]]:
    return {
        "chat": lambda c: c.chat.completions.create(model=EMBEDDER, messages=ASK, max_tokens=4),
        "chat streamed": lambda c: c.chat.completions.create(model=EMBEDDER, messages=ASK, max_tokens=4, stream=True),
        "completion": lambda c: c.completions.create(model=EMBEDDER, prompt="Hello", max_tokens=4),
        "response": lambda c: c.responses.create(model=EMBEDDER, input="Hello?", max_output_tokens=16),
    }


@pytest.mark.parametrize("route", list(_openai_requests()))
def test_the_openai_routes_point_at_embeddings(gateway, route: str) -> None:
    client = sdk_client(gateway)
    with pytest.raises(openai.BadRequestError) as refused:
        _openai_requests()[route](client)
    error = refused.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == "model", error
    assert f"'{EMBEDDER}' is an embedding model" in error["message"] and "/v1/embeddings" in error["message"]
    assert repr(gateway.core.model_name) in error["message"]  # the model that writes text here, named
    reply = client.chat.completions.create(model=gateway.core.model_name, messages=ASK, max_tokens=2)
    assert reply.choices[0].message.content is not None  # the gateway's own model writes


def test_the_messages_route_points_at_embeddings(gateway) -> None:
    client = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model=EMBEDDER, max_tokens=4, messages=ASK)
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert "is an embedding model" in refused.value.body["error"]["message"]


def test_the_embedding_model_still_embeds(gateway) -> None:
    vectors = sdk_client(gateway).embeddings.create(model=EMBEDDER, input=["one", "two"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) > 0
