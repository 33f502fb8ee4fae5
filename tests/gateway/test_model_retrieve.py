"""`GET /v1/models/{model}`, the openai SDK's `models.retrieve`: the card `/v1/models` lists for that name (the
graph's model, named by its path here, slashes and all, and the embedding model), OpenAI's 404 `model_not_found`
for a name not served, and the same key asked for as `/v1/models` asks."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.embedding.conftest import make_tiny_bert, write_sentence_transformers_files
from tests.gateway.conftest import GRAPHS, running_gateway, tiny_config

pytestmark = pytest.mark.slow

KEY = "sk-retrieve"


@pytest.fixture(scope="module")
def gateway(tiny_model, tmp_path_factory):
    bert = write_sentence_transformers_files(make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-st"))
    config = tiny_config(tmp_path_factory.mktemp("models"), api_keys=[KEY], embedding_model=str(bert))
    with running_gateway(GRAPHS / "colocated.yaml", config, tiny_model) as gw:
        yield gw


def client(gateway, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_retrieve_answers_the_listed_card(gateway) -> None:
    listed = {model.id: model for model in client(gateway).models.list()}
    assert set(listed) == {gateway.core.model_name, "tiny-st"}
    for name, card in listed.items():
        retrieved = client(gateway).models.retrieve(name)
        assert retrieved.model_dump() == card.model_dump() and retrieved.max_model_len is not None


def test_an_unknown_model_is_openais_404(gateway) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client(gateway).models.retrieve("gpt-4o")
    error = missing.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model", error
    assert "'gpt-4o'" in error["message"] and repr(gateway.core.model_name) in error["message"]


def test_it_asks_for_the_key_the_list_asks_for(gateway) -> None:
    for path in ("/v1/models", f"/v1/models/{gateway.core.model_name}"):
        assert httpx.get(gateway.url + path).status_code == 401
        assert httpx.get(gateway.url + path, headers={"authorization": "Bearer wrong"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(gateway, "wrong").models.retrieve(gateway.core.model_name)
